"""Auxiliary training terms for top-k SAEs: the AuxK dead-latent loss and the dead-latent tracker.

Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv:2406.04093), section 2.4 and
appendix A.2: a latent is *dead* when it has not fired for a number of training tokens (10M in the
paper); the AuxK loss asks the top-``k_aux`` dead latents to reconstruct the main model's residual
error, which gives them gradient again. Used with ``loss = recon + α·auxk`` (``α = 1/32``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["auxk_loss", "DeadLatentTracker"]


def auxk_loss(
    pre: Tensor,
    residual: Tensor,
    W_dec: Tensor,
    dead_mask: Tensor,
    k_aux: int,
    valid: Tensor | None = None,
) -> Tensor:
    """AuxK loss of Gao et al. 2024 (arXiv:2406.04093, section 2.4), normalised as in their code.

    With ``e = x − x̂`` the main reconstruction error (a constant target: it is detached here) and
    ``ê = W_decᵀ · relu(TopK_{k_aux}(pre restricted to dead latents))`` (no decoder bias), returns

        ``mean_t ‖e_t − ê_t‖² / mean_t ‖e_t − ē‖²``  (``ē`` the mean of ``e`` over the valid tokens)

    which is ``normalized_mse(ê, e)`` of openai/sparse_autoencoder (``kernels.py``, used for AuxK in
    ``train.py``), i.e. the fraction of the residual's variance that the dead latents fail to explain.
    Gradients reach ``pre`` (the encoder) at the chosen dead latents and the rows of ``W_dec`` of those
    latents.

    Args:
        pre: pre-activations ``[..., d_sae]``.
        residual: ``x − x̂`` ``[..., d_in]`` (same leading dims as ``pre``).
        W_dec: decoder ``[d_sae, d_in]``.
        dead_mask: bool ``[d_sae]``, True for dead latents (:meth:`DeadLatentTracker.dead_mask`).
        k_aux: how many dead latents each token may use (``min(k_aux, n_dead)`` are used); the paper
            takes a power of two near ``d_in / 2``.
        valid: bool mask of the leading dims; invalid tokens take no part.

    Returns:
        a float32 scalar; exactly ``0`` (a constant, no graph) when no latent is dead or no token is
        valid, and ``0`` when the residual has no variance over the batch.
    """
    d_sae, d_in = W_dec.shape
    if isinstance(k_aux, bool) or not isinstance(k_aux, int) or k_aux <= 0:
        raise ValueError(f"k_aux must be a positive integer, got {k_aux!r}")
    if pre.shape[-1] != d_sae or residual.shape[-1] != d_in or pre.shape[:-1] != residual.shape[:-1]:
        raise ValueError(
            f"shapes do not fit: pre {tuple(pre.shape)}, residual {tuple(residual.shape)}, "
            f"W_dec {tuple(W_dec.shape)}"
        )
    if dead_mask.shape != (d_sae,) or dead_mask.dtype != torch.bool:
        raise ValueError(
            f"dead_mask must be a bool tensor [{d_sae}], got {dead_mask.dtype} {tuple(dead_mask.shape)}"
        )
    if valid is not None and valid.shape != pre.shape[:-1]:
        raise ValueError(f"valid mask {tuple(valid.shape)} does not match {tuple(pre.shape[:-1])}")
    zero = torch.zeros((), dtype=torch.float32, device=pre.device)
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return zero

    pre_ND = pre.reshape(-1, d_sae)
    e_ND = residual.detach().reshape(-1, d_in).float()
    if valid is not None:
        keep = valid.reshape(-1)
        pre_ND, e_ND = pre_ND[keep], e_ND[keep]
    if pre_ND.shape[0] == 0:
        return zero

    k = min(k_aux, n_dead)
    dead_pre = pre_ND.masked_fill(~dead_mask, float("-inf"))
    vals, idx = dead_pre.topk(k, dim=-1, sorted=False)  # [N, k], all dead latents (k <= n_dead)
    # sparse decode: Σ_j relu(vals_j) · W_dec[idx_j]  (cost N·k·d_in, not N·d_sae·d_in)
    e_hat = F.embedding_bag(idx, W_dec, per_sample_weights=torch.relu(vals).to(W_dec.dtype), mode="sum")

    num = (e_ND - e_hat.float()).pow(2).sum(-1).mean()
    den = (e_ND - e_ND.mean(0)).pow(2).sum(-1).mean()
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), zero)


class DeadLatentTracker(nn.Module):
    """Counts, per latent, the valid training tokens seen since it last fired (``f > 0``).

    The count is a buffer, so it is saved in checkpoints and restored on resume. Under
    ``torch.distributed`` :meth:`update` sums the token counts and ORs the "fired" flags over ranks in
    one all-reduce (so every rank must call it, at the same steps), making the count global as in
    OpenAI's implementation (which all-reduces its statistic with MIN).

    Args:
        d_sae: number of latents.
    """

    tokens_since_fired: Tensor

    def __init__(self, d_sae: int) -> None:
        super().__init__()
        if d_sae <= 0:
            raise ValueError(f"d_sae must be positive, got {d_sae}")
        self.d_sae = d_sae
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))

    @torch.no_grad()
    def update(self, f: Tensor, valid: Tensor | None = None) -> None:
        """Account for one batch of codes ``f: [..., d_sae]`` (``valid`` masks the leading dims)."""
        if f.shape[-1] != self.d_sae:
            raise ValueError(f"expected codes [..., {self.d_sae}], got {tuple(f.shape)}")
        if valid is not None and valid.shape != f.shape[:-1]:
            raise ValueError(f"valid mask {tuple(valid.shape)} does not match {tuple(f.shape[:-1])}")
        fired_ND = f.reshape(-1, self.d_sae) > 0
        if valid is None:
            n_tokens = torch.tensor(fired_ND.shape[0], device=f.device)
        else:
            keep = valid.reshape(-1)
            fired_ND = fired_ND & keep.unsqueeze(-1)
            n_tokens = keep.sum()
        fired = fired_ND.any(0).long()  # [d_sae]
        n_tokens = n_tokens.long().reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # one collective per step: the "fired" flags are summed with the token counts (a latent
            # fired somewhere iff its sum over ranks is > 0)
            both = torch.cat([fired, n_tokens.to(fired.device)])
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
            fired, n_tokens = both[:-1] > 0, both[-1:]
        counts = self.tokens_since_fired
        counts.add_(n_tokens.to(counts.device))
        counts.masked_fill_(fired.to(counts.device).bool(), 0)

    def dead_mask(self, threshold_tokens: int) -> Tensor:
        """Bool ``[d_sae]``: latents that have not fired in the last ``threshold_tokens`` valid tokens."""
        if threshold_tokens <= 0:
            raise ValueError(f"threshold_tokens must be positive, got {threshold_tokens}")
        return self.tokens_since_fired >= threshold_tokens

    def reset(self) -> None:
        """Forget the history (every latent counts as just fired)."""
        self.tokens_since_fired.zero_()

    def extra_repr(self) -> str:
        return f"d_sae={self.d_sae}"
