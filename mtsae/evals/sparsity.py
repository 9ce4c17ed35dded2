"""Feature sparsity: the fraction of valid tokens (BOS/EOS/PAD excluded) on which each feature fires.

Used by the unlearning feature selection (:mod:`mtsae.evals.unlearning.selection`) and by the
disentanglement density (:mod:`mtsae.evals.disentanglement`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SparsityAccumulator", "feature_sparsity", "round_sparsity"]


def _active_and_mask(f: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(active [..., d_sae] bool, valid [...] bool)`` with shape checks."""
    if valid is None:
        valid = torch.ones(f.shape[:-1], dtype=torch.bool, device=f.device)
    if valid.shape != f.shape[:-1]:
        raise ValueError(f"valid mask {tuple(valid.shape)} does not match codes {tuple(f.shape)}[:-1]")
    valid = valid.to(device=f.device, dtype=torch.bool)
    return (f > 0) & valid.unsqueeze(-1), valid


def feature_sparsity(f: Tensor, valid: Tensor | None = None) -> Tensor:
    """Fraction of valid tokens on which each feature fires (``f > 0``), as SAEBench computes it.

    Args:
        f: feature codes ``[..., d_sae]`` (e.g. ``[B, T, d_sae]``).
        valid: boolean mask over the leading dims (``[B, T]``); False at BOS/EOS/PAD. ``None``: all valid.

    Returns:
        ``[d_sae]`` float32 in ``[0, 1]``.

    Raises:
        ValueError: if no token is valid (the fraction is undefined).
    """
    acc = SparsityAccumulator(f.shape[-1], device=f.device)
    acc.update(f, valid)
    return acc.compute()


class SparsityAccumulator:
    """Streaming :func:`feature_sparsity`: sum active counts and valid tokens over batches.

    Under DDP, all-reduce (sum) :attr:`active_counts` and :attr:`n_tokens` before :meth:`compute`.

    Args:
        d_sae: number of features.
        device: where the counts live (that of the codes passed to :meth:`update`).
    """

    def __init__(self, d_sae: int, device: torch.device | str | None = None) -> None:
        if d_sae <= 0:
            raise ValueError(f"d_sae must be positive, got {d_sae}")
        self.d_sae = d_sae
        self.active_counts = torch.zeros(d_sae, dtype=torch.int64, device=device)  # [d_sae]
        self.n_tokens = torch.zeros((), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.active_counts.zero_()
        self.n_tokens.zero_()

    @torch.no_grad()
    def update(self, f: Tensor, valid: Tensor | None = None) -> None:
        """Add a batch of codes ``f: [..., d_sae]`` with mask ``valid: [...]``."""
        if f.shape[-1] != self.d_sae:
            raise ValueError(f"expected codes [..., {self.d_sae}], got {tuple(f.shape)}")
        active, valid = _active_and_mask(f, valid)
        self.active_counts += active.reshape(-1, self.d_sae).sum(0).to(self.active_counts.device)
        self.n_tokens += valid.sum().to(self.n_tokens.device)

    def compute(self, saebench: bool = False) -> Tensor:
        """Sparsity ``[d_sae]`` (float32): active count / number of valid tokens.

        ``saebench``: as SAEBench computes it (a float32 division, then :func:`round_sparsity` to 6
        decimals; float64 result). Otherwise the division is exact in float64, then cast to float32.
        """
        n = int(self.n_tokens)
        if n == 0:
            raise ValueError("feature sparsity is undefined: no valid token was seen")
        if saebench:
            return round_sparsity(self.active_counts.float() / n)
        return (self.active_counts.double() / n).float()


def round_sparsity(sparsity: Tensor, decimals: int = 6) -> Tensor:
    """Sparsities rounded as SAEBench's files round them (``np.savetxt(fmt="%f")``, 6 decimals, then read
    back): the decimal rounding of each value, returned as float64 ``[d_sae]``.

    SAEBench selects features from the values read back, so features that differ below the 6th decimal
    tie (then lower index first here) and a retain sparsity just under a threshold can round onto it.
    """
    values = [float(f"{v:.{decimals}f}") for v in sparsity.detach().double().cpu().tolist()]
    return torch.tensor(values, dtype=torch.float64)
