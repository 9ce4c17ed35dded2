"""Feature disentanglement diagnostics (docs/design.md §6): pure functions, tensors in, floats/tensors out.

What is measured, for an SAE with decoder rows ``w_i = W_dec[i]`` and codes ``f [B, T, d_sae]``:

* **decoder coherence** (:func:`decoder_coherence`): over the ``P = d_sae (d_sae - 1) / 2`` unordered pairs
  ``i < j`` of distinct rows, ``c_ij = |cos(w_i, w_j)|``; reported are ``max c_ij``, ``mean c_ij`` and the
  fraction of pairs with ``c_ij > threshold`` (0.9: near-duplicate features). Computed in row blocks, so
  the ``d_sae x d_sae`` matrix never exists at once (16384 features: blocks of ``1024 x 16384``).
* **feature density** (:class:`mtsae.evals.sparsity.SparsityAccumulator`, reused): ``rho_i`` = fraction of valid
  tokens on which ``f_i > 0``; :func:`density_summary` gives the dead fraction (``rho_i = 0``), the dense
  fraction (``rho_i > dense_threshold``, 0.1) and the median ``log10 rho_i`` of live features;
  :func:`log10_density_histogram` the histogram of ``log10 rho_i`` over live features.
* **scale attribution** (:func:`scale_attribution`): for an MTSAE ``W_enc`` is ``[S * d_in, d_sae]`` with
  block ``s`` (rows ``s*d_in .. (s+1)*d_in``) reading dilation branch ``s``. The share of feature ``i`` in
  scale ``s`` is the share of *squared* norm (energy) ``a_si = ||W_enc[s-block, i]||^2 / ||W_enc[:, i]||^2``
  (sums to 1 over ``s``); its normalised entropy ``H_i = -sum_s a_si log a_si / log S`` is 0 for a feature
  that reads one scale only and 1 for one that reads all equally. The branches' conv gains are not folded
  in: this is the encoder's attribution over branch outputs, as docs/design.md §6 defines it. A per-token SAE
  (``dilations=[]``) has no scales: the functions return ``None``.
* **temporal persistence** (:class:`PersistenceAccumulator`): for lag ``k`` and feature ``i``, the Pearson
  correlation of ``a = f_i[b, t]`` and ``c = f_i[b, t + k]`` over all pairs ``(b, t)`` with both positions
  valid and in the same sequence, pooled over sequences (one mean over all pairs, not per sequence)::

      r_ik = (n S_ac - S_a S_c) / sqrt((n S_aa - S_a^2) (n S_cc - S_c^2))

  with ``n`` pairs and ``S_a = sum a``, ``S_ac = sum a c``, ... (float64 sums, so it streams over batches
  and all-reduces under DDP). ``r_ik`` is undefined (``nan``) when either variance is 0 (a feature that
  never fires on those pairs); the summary is the mean of ``r_ik`` over features where it is defined.
* **ground truth**: MMCS and recovery per group come from :func:`mtsae.training.metrics.ground_truth_recovery`.

:func:`evaluate_disentanglement` runs all of it over batches of activations (used by ``mtsae eval
disentanglement``); :func:`disentanglement_results` turns accumulated statistics into results (used by the
``Disentanglement`` callback); :func:`mtsae.evals.disentanglement_figures.figures` draws them with matplotlib's Agg canvas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mtsae.evals.ground_truth import GroundTruth
from mtsae.evals.sparsity import SparsityAccumulator
from mtsae.sae.positions import sae_valid_positions
from mtsae.training.metrics import RECOVERY_THRESHOLD

__all__ = [
    "DisentanglementConfig",
    "COHERENCE_THRESHOLD",
    "DENSE_THRESHOLD",
    "DEFAULT_LAGS",
    "Coherence",
    "decoder_coherence",
    "density_summary",
    "log10_density_histogram",
    "scale_attribution",
    "scale_entropy",
    "scale_attribution_summary",
    "PersistenceAccumulator",
    "DisentanglementAccumulator",
    "disentanglement_results",
    "evaluate_disentanglement",
    "results_to_json",
]

COHERENCE_THRESHOLD = 0.9
DENSE_THRESHOLD = 0.1
DEFAULT_LAGS = (1, 4, 16)


@dataclass
class DisentanglementConfig:
    """Settings of the disentanglement diagnostics: one object for ``callbacks.Disentanglement(config=...)``
    and the options of ``mtsae eval disentanglement``."""

    max_batches: int | None = 32
    """validation batches (per rank) to encode; None: all"""
    lags: list[int] = field(default_factory=lambda: list(DEFAULT_LAGS))
    """lags k of the persistence (lag-k autocorrelation of feature activations)"""
    coherence_threshold: float = COHERENCE_THRESHOLD
    """|cos| above which a pair of decoder rows counts as near-duplicate"""
    dense_threshold: float = DENSE_THRESHOLD
    """density above which a feature counts as dense"""

    def __post_init__(self) -> None:
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {self.max_batches}")
        if not self.lags or min(self.lags) < 1:
            raise ValueError(f"lags must be positive ints, got {self.lags}")


# ---------------------------------------------------------------------------------------------- coherence
class Coherence(NamedTuple):
    """Decoder coherence: statistics of ``|cos|`` between distinct decoder rows."""

    max: float
    """``max_{i<j} |cos(w_i, w_j)|``"""
    mean: float
    """``mean_{i<j} |cos(w_i, w_j)|`` over the ``d_sae (d_sae - 1) / 2`` pairs"""
    frac_above: float
    """fraction of pairs ``i<j`` with ``|cos| > threshold``"""
    per_feature_max: Tensor
    """``[d_sae]``: ``max_{j != i} |cos(w_i, w_j)|`` (on CPU)"""


@torch.no_grad()
def decoder_coherence(
    W_dec: Tensor, threshold: float = COHERENCE_THRESHOLD, block_size: int = 1024
) -> Coherence:
    """Max / mean ``|cos|`` between distinct decoder rows and the fraction of pairs above ``threshold``.

    Rows are normalised, then ``|W[lo:hi] @ W[lo:]^T|`` is computed for blocks of ``block_size`` rows
    (memory ``block_size x d_sae``): each unordered pair ``i < j`` is computed and counted once.

    Args:
        W_dec: decoder ``[d_sae, d_in]`` (``d_sae >= 2``).
        threshold: ``|cos|`` above which a pair counts as a near-duplicate.
        block_size: rows per block.
    """
    n = W_dec.shape[0]
    if W_dec.dim() != 2 or n < 2:
        raise ValueError(f"need a decoder [d_sae >= 2, d_in], got {tuple(W_dec.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    w = W_dec.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [d_sae, d_in]
    total, above, best = 0.0, 0, 0.0
    per_feature = torch.full((n,), -1.0, device=w.device)
    for lo in range(0, n, block_size):
        hi = min(n, lo + block_size)
        # rows lo..hi against columns lo..n: every pair i < j appears in exactly one block
        c = (w[lo:hi] @ w[lo:].t()).abs()  # [blk, d_sae - lo]; column j is feature lo + j
        square = c[:, : hi - lo]  # [blk, blk]: keep its strict upper triangle only
        square.masked_fill_(~torch.ones_like(square, dtype=torch.bool).triu(1), -1.0)
        total += c.clamp_min(0).double().sum().item()
        above += int((c > threshold).sum())
        best = max(best, c.max().item())
        # the pair (i, j) is the partner of both i (a row here) and j (a column here)
        per_feature[lo:hi] = torch.maximum(per_feature[lo:hi], c.max(dim=1).values)
        per_feature[lo:] = torch.maximum(per_feature[lo:], c.max(dim=0).values)
    n_pairs = n * (n - 1) // 2
    return Coherence(best, total / n_pairs, above / n_pairs, per_feature.cpu())


# ---------------------------------------------------------------------------------------------- density
def density_summary(density: Tensor, dense_threshold: float = DENSE_THRESHOLD) -> dict[str, float]:
    """Summary of per-feature firing fractions ``rho [d_sae]`` (from :class:`SparsityAccumulator`).

    Returns ``dead_fraction`` (``rho = 0``), ``dense_fraction`` (``rho > dense_threshold``),
    ``median_log10`` and ``mean_log10`` of ``log10 rho`` over live features (``nan`` if none is live).
    """
    rho = density.detach().double().flatten().cpu()
    live = rho[rho > 0]
    logs = live.log10()
    return {
        "dead_fraction": (rho == 0).double().mean().item(),
        "dense_fraction": (rho > dense_threshold).double().mean().item(),
        "median_log10": logs.median().item() if live.numel() else math.nan,
        "mean_log10": logs.mean().item() if live.numel() else math.nan,
    }


def log10_density_histogram(
    density: Tensor, bins: int = 40, lo: float | None = None, hi: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Histogram of ``log10 rho_i`` over live features (dead ones, ``log10 0 = -inf``, are left out).

    Args:
        density: ``[d_sae]`` firing fractions in ``[0, 1]``.
        bins: number of bins.
        lo: left edge; default ``floor(min log10 rho)`` (or -1 if no feature is live).
        hi: right edge (0: a feature firing on every token).

    Returns:
        ``(counts [bins], edges [bins + 1])`` (float64, CPU).
    """
    rho = density.detach().double().flatten().cpu()
    logs = rho[rho > 0].log10()
    if lo is None:
        lo = math.floor(logs.min().item()) if logs.numel() else -1.0
        lo = min(lo, hi - 1.0)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    counts = torch.histc(logs.clamp(lo, hi), bins=bins, min=lo, max=hi) if logs.numel() else torch.zeros(bins)
    return counts.double(), edges


# ---------------------------------------------------------------------------------------------- scales
def scale_attribution(W_enc: Tensor, n_scales: int) -> Tensor | None:
    """Share of each feature's encoder energy in each dilation block: ``[n_scales, d_sae]`` (or ``None``).

    ``a_si = ||W_enc[s*d_in:(s+1)*d_in, i]||^2 / sum_s' ||W_enc[s'-block, i]||^2``; a feature whose
    encoder column is zero gets the uniform share ``1 / n_scales``.

    Args:
        W_enc: ``[n_scales * d_in, d_sae]`` (row ``s*d_in + c`` reads channel ``c`` of branch ``s``,
            the layout of ``z.flatten(2)`` in :class:`mtsae.MTSAE`).
        n_scales: number of dilation branches; 0 (a per-token SAE) returns ``None``.
    """
    if n_scales == 0:
        return None
    rows, d_sae = W_enc.shape
    if n_scales < 0 or rows % n_scales:
        raise ValueError(f"W_enc has {rows} rows, not a multiple of n_scales={n_scales}")
    energy = W_enc.detach().double().reshape(n_scales, rows // n_scales, d_sae).pow(2).sum(1)  # [S, d_sae]
    total = energy.sum(0, keepdim=True)
    share = torch.where(total > 0, energy / total.clamp_min(1e-300), torch.full_like(energy, 1 / n_scales))
    return share.float()


def scale_entropy(share: Tensor) -> Tensor:
    """Normalised entropy ``H_i = -sum_s a_si log a_si / log S`` in ``[0, 1]`` per feature: ``[d_sae]``.

    ``share`` is ``[S, d_sae]`` from :func:`scale_attribution`; with ``S = 1`` the entropy is 0.
    """
    S = share.shape[0]
    if S == 1:
        return torch.zeros(share.shape[1])
    p = share.double()
    h = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(0) / math.log(S)
    return h.clamp(0, 1).float()


def scale_attribution_summary(
    share: Tensor, dilations: Sequence[int], mask: Tensor | None = None
) -> dict[str, float]:
    """Mean share per scale, fraction of features with a majority in each scale, mean entropy.

    Keys: ``share/dilation_<r>`` (mean ``a_si``), ``majority/dilation_<r>`` (fraction of features with
    ``a_si > 1/2``: at most one scale per feature, so these sum to at most 1), ``entropy`` (mean ``H_i``).
    Averages are over the features in ``mask`` (``[d_sae]`` bool, e.g. live features; ``None`` or none
    selected: all features).
    """
    if share.shape[0] != len(dilations):
        raise ValueError(f"share has {share.shape[0]} scales, dilations {list(dilations)}")
    if mask is not None and bool(mask.any()):
        share = share[:, mask.to(share.device)]
    ent = scale_entropy(share)
    out = {f"share/dilation_{r}": share[s].mean().item() for s, r in enumerate(dilations)}
    out |= {f"majority/dilation_{r}": (share[s] > 0.5).float().mean().item() for s, r in enumerate(dilations)}
    out["entropy"] = ent.mean().item()
    return out


# ---------------------------------------------------------------------------------------------- persistence
class PersistenceAccumulator:
    """Streaming lag-``k`` autocorrelation of feature codes along time (see the module docstring).

    For each lag it keeps the pair count ``n_k`` and the float64 sums ``S_a, S_c, S_aa, S_cc, S_ac`` per
    feature (``a = f[:, t]``, ``c = f[:, t + k]``, both valid). Under DDP, all-reduce (sum) the tensors
    of :meth:`state_tensors` before :meth:`compute`.

    Args:
        d_sae: number of features.
        lags: the lags ``k >= 1``.
        device: where the sums live.
    """

    def __init__(
        self, d_sae: int, lags: Sequence[int] = DEFAULT_LAGS, device: torch.device | str | None = None
    ) -> None:
        lags = [int(k) for k in lags]
        if not lags or any(k < 1 for k in lags):
            raise ValueError(f"lags must be a non-empty list of integers >= 1, got {lags}")
        self.d_sae, self.lags = d_sae, lags
        self.sums = torch.zeros(len(lags), 5, d_sae, dtype=torch.float64, device=device)  # [L, 5, d_sae]
        self.n_pairs = torch.zeros(len(lags), dtype=torch.float64, device=device)  # [L]

    def state_tensors(self) -> list[Tensor]:
        return [self.sums, self.n_pairs]

    def reset(self) -> None:
        self.sums.zero_()
        self.n_pairs.zero_()

    @torch.no_grad()
    def update(self, f: Tensor, valid: Tensor | None = None) -> None:
        """Add codes ``f [B, T, d_sae]`` with mask ``valid [B, T]`` (``None``: all valid)."""
        if f.dim() != 3 or f.shape[-1] != self.d_sae:
            raise ValueError(f"expected codes [B, T, {self.d_sae}], got {tuple(f.shape)}")
        if valid is None:
            valid = torch.ones(f.shape[:2], dtype=torch.bool, device=f.device)
        if valid.shape != f.shape[:2]:
            raise ValueError(f"valid mask {tuple(valid.shape)} does not match codes {tuple(f.shape)}")
        f = f.detach().to(self.sums.device, torch.float64)
        valid = valid.to(self.sums.device, torch.bool)
        T = f.shape[1]
        for li, k in enumerate(self.lags):
            if k >= T:
                continue
            m = (valid[:, :-k] & valid[:, k:]).unsqueeze(-1).to(f.dtype)  # [B, T-k, 1]
            a, c = f[:, :-k] * m, f[:, k:] * m  # [B, T-k, d_sae]
            self.n_pairs[li] += m.sum()
            self.sums[li] += torch.stack(
                [
                    a.sum((0, 1)),
                    c.sum((0, 1)),
                    a.pow(2).sum((0, 1)),
                    c.pow(2).sum((0, 1)),
                    (a * c).sum((0, 1)),
                ]
            )

    def compute(self) -> Tensor:
        """``[n_lags, d_sae]`` Pearson autocorrelations (float32; ``nan`` where a variance is 0)."""
        n = self.n_pairs[:, None]
        s_a, s_c, s_aa, s_cc, s_ac = self.sums.unbind(1)  # each [L, d_sae]
        cov = n * s_ac - s_a * s_c
        var_a, var_c = n * s_aa - s_a**2, n * s_cc - s_c**2
        # relative tolerance: a constant feature must not get a variance from rounding
        tol_a, tol_c = 1e-9 * n * s_aa, 1e-9 * n * s_cc
        ok = (var_a > tol_a) & (var_c > tol_c) & (n > 1)
        r = cov / (var_a.clamp_min(1e-300) * var_c.clamp_min(1e-300)).sqrt()
        return torch.where(ok, r.clamp(-1, 1), torch.full_like(r, math.nan)).float().cpu()


class DisentanglementAccumulator:
    """Density counts (:class:`SparsityAccumulator`) and persistence sums over batches of codes."""

    def __init__(
        self, d_sae: int, lags: Sequence[int] = DEFAULT_LAGS, device: torch.device | str | None = None
    ) -> None:
        self.density = SparsityAccumulator(d_sae, device=device)
        self.persistence = PersistenceAccumulator(d_sae, lags, device=device)

    def update(self, f: Tensor, valid: Tensor | None = None) -> None:
        """Add codes ``f [B, T, d_sae]`` with mask ``valid [B, T]``."""
        self.density.update(f, valid)
        self.persistence.update(f, valid)

    def state_tensors(self) -> list[Tensor]:
        """The tensors to all-reduce (sum) across ranks, in a fixed order."""
        return [self.density.active_counts, self.density.n_tokens, *self.persistence.state_tensors()]

    def reset(self) -> None:
        self.density.reset()
        self.persistence.reset()


# ---------------------------------------------------------------------------------------------- results
def disentanglement_results(
    sae: nn.Module,
    acc: DisentanglementAccumulator,
    ground_truth: GroundTruth | None = None,
    config: DisentanglementConfig | None = None,
    recovery_threshold: float = RECOVERY_THRESHOLD,
) -> dict[str, Any]:
    """All disentanglement results from an SAE and accumulated (already all-reduced) statistics.

    The one computation behind ``callbacks.Disentanglement`` and ``mtsae eval disentanglement``.

    Args:
        sae: an :class:`mtsae.MTSAE` (``W_dec``, ``W_enc``, ``dilations``).
        acc: density counts and persistence sums over the evaluated tokens.
        ground_truth: the true features, when the data has them (:class:`mtsae.evals.ground_truth.GroundTruth`,
            ``data.ActivationCache.ground_truth()``).
        config: the thresholds (:class:`DisentanglementConfig`; None: its defaults).

    Returns:
        ``{"scalars": {name: float}, "density": Tensor [d_sae], "log10_density_hist": (counts, edges),
        "coherence_per_feature": Tensor [d_sae], "scale_share": Tensor [S, d_sae] | None,
        "scale_entropy": Tensor [d_sae] | None, "dilations": list[int], "lags": list[int],
        "autocorrelation": Tensor [n_lags, d_sae], "recovery": dict | None, "thresholds": {...}}``.
        Scalar names: ``coherence/{max,mean,frac_above}``, ``density/{dead_fraction,dense_fraction,
        median_log10,mean_log10}``, ``scale/{share,majority}/dilation_<r>``, ``scale/entropy`` (MTSAE
        only), ``persistence/lag_<k>`` and, with ground truth, ``recovery/{mmcs,recovered}[/<group>]``.
    """
    config = config if config is not None else DisentanglementConfig()
    coherence_threshold, dense_threshold = config.coherence_threshold, config.dense_threshold
    density = acc.density.compute()  # [d_sae]
    coh = decoder_coherence(sae.W_dec, coherence_threshold)
    scalars: dict[str, float] = {
        "coherence/max": coh.max,
        "coherence/mean": coh.mean,
        "coherence/frac_above": coh.frac_above,
    }
    scalars |= {f"density/{k}": v for k, v in density_summary(density, dense_threshold).items()}
    dilations = [int(r) for r in getattr(sae, "dilations", [])]
    # a mix encoder averages the branches before W_enc: its rows carry no per-dilation blocks
    mixed = getattr(sae, "encoder", "concat") == "mix"
    share = None if mixed else scale_attribution(sae.W_enc, len(dilations))
    entropy = None
    if share is not None:
        entropy = scale_entropy(share)
        live = density.to(share.device) > 0
        summary = scale_attribution_summary(share, dilations, live)
        scalars |= {f"scale/{k}": v for k, v in summary.items()}
    auto = acc.persistence.compute()  # [n_lags, d_sae]
    for li, k in enumerate(acc.persistence.lags):
        r = auto[li]
        r = r[~r.isnan()]
        scalars[f"persistence/lag_{k}"] = r.mean().item() if r.numel() else math.nan
    recovery = None
    if ground_truth is not None:
        recovery = ground_truth.recovery(sae.W_dec, recovery_threshold)
        scalars |= {f"recovery/{k}": v for k, v in recovery.items()}
    return {
        "scalars": scalars,
        "density": density,
        "log10_density_hist": log10_density_histogram(density),
        "coherence_per_feature": coh.per_feature_max,
        "scale_share": None if share is None else share.cpu(),
        "scale_entropy": entropy,
        "dilations": dilations,
        "lags": list(acc.persistence.lags),
        "autocorrelation": auto,
        "recovery": recovery,
        "thresholds": {
            "coherence": coherence_threshold,
            "dense": dense_threshold,
            "recovery": recovery_threshold,
        },
    }


@torch.no_grad()
def evaluate_disentanglement(
    sae: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    ground_truth: GroundTruth | None = None,
    config: DisentanglementConfig | None = None,
) -> dict[str, Any]:
    """Encode batches of activation sequences and compute every disentanglement diagnostic.

    Args:
        sae: an SAE on raw activations (run on its own device and dtype): an exported
            :class:`mtsae.MTSAE` or ``SAEModule.raw_sae``.
        batches: iterable of ``{"acts": [B, T, d_in], "valid": [B, T]}`` (validation batches).
        ground_truth: optional true features (see :func:`disentanglement_results`).
        config: the settings (:class:`DisentanglementConfig`: ``max_batches``, ``lags``, thresholds;
            None: its defaults).

    Returns:
        see :func:`disentanglement_results`; :func:`results_to_json` makes it JSON-serialisable.
    """
    config = config if config is not None else DisentanglementConfig()
    max_batches = config.max_batches
    p = next(sae.parameters())
    acc = DisentanglementAccumulator(sae.W_dec.shape[0], config.lags, device=p.device)
    n = 0
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        valid = batch["valid"].to(p.device, torch.bool)
        x = batch["acts"].to(p.device, p.dtype)  # [B, T, d_in]
        valid = sae_valid_positions(sae, x, valid)
        acc.update(sae.encode(x, valid), valid)
        n += 1
    if n == 0:
        raise ValueError("evaluate_disentanglement got no batches")
    return disentanglement_results(sae, acc, ground_truth, config)


def results_to_json(results: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-serialisable copy of :func:`disentanglement_results` (tensors as lists, ``nan`` as ``None``)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Tensor):
            return conv(v.tolist())
        if isinstance(v, float):
            return None if math.isnan(v) else v
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(dict(results))
