"""The synthetic analogue of SAEBench unlearning: forget a group of planted features, keep the rest.

On a source with ground truth (``data.SyntheticSource``) every token is ``x_t = sum_j c_tj d_j + noise``
with known unit directions ``d_j`` and coefficients ``c_tj``. A *forget set* ``F`` of true features is
designated (by default the first 4 features of the ``slow`` group, :func:`forget_feature_indices`).

1. **Corpora**: a sequence is a *forget* sequence if some ``j in F`` has ``c_tj > 0`` at a valid token;
   the other sequences (no forget signal at all) are the *retain* sequences.
2. **Selection and intervention**, exactly the LM code: feature sparsities on each corpus
   (:class:`mtsae.evals.sparsity.SparsityAccumulator`), :func:`mtsae.evals.unlearning.selection.select_features`, and
   :func:`mtsae.evals.unlearning.intervention.clamp_intervention` (``x' = x + sum_{i in S, f_i > 0} (-m - f_i) W_dec[i]``,
   error term kept), applied to every sequence; ``delta_t = x'_t - x_t``.
3. **Scores**, with ``P`` the orthogonal projector onto ``span{d_j : j in F}``, the forget signal
   ``s_t = sum_{j in F} c_tj d_j`` and the other signal ``o_t = sum_{j not in F} c_tj d_j``::

       removed = 1 - sqrt( sum_{t in forget} ||s_t + P delta_t||^2 / sum_{t in forget} ||s_t||^2 )
       damage  = sqrt( (sum_{t in retain} ||delta_t||^2 + sum_{t in forget} ||(I - P) delta_t||^2)
                       / sum_{t in all} ||o_t||^2 )

   (sums over valid tokens). ``removed`` is 1 when the intervention cancels the forget signal exactly,
   0 when it leaves it alone, and negative when it overshoots (a large negative clamp writes ``-m`` along
   the forget directions, which is not removal). ``damage`` is the size of every other change, relative
   to the other true signal: any change on retain sequences, and changes outside the forget subspace on
   forget sequences (changes of ``o`` inside the forget subspace are not separable and not counted).
4. **Grid and score** (the SAEBench recipe, :class:`SyntheticGrid`): for every retain threshold x number
   of features x multiplier, select and clamp; the *synthetic unlearning score* is
   ``max(0, max over grid points of (removed - damage))``: the best trade-off between forget signal removed
   and other signal damaged, 0 when no grid point removes more than it damages (SAEBench instead takes
   ``1 - min WMDP accuracy`` subject to MMLU accuracy ``>= 0.99``; a hard tolerance on ``damage`` made the
   score jump between 0 and its full value on small validation sets, the difference does not).

The multipliers are in raw activation units. Unlike the LM benchmark, the default grid uses small clamp
values (0 is zero-ablation of the selected features), because the synthetic score measures signal
removed, not a behavioural change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mtsae.evals.ground_truth import GroundTruth
from mtsae.evals.sparsity import SparsityAccumulator
from mtsae.evals.unlearning.intervention import clamp_intervention
from mtsae.evals.unlearning.selection import check_grid, select_features

__all__ = [
    "SyntheticGrid",
    "forget_feature_indices",
    "split_forget_retain",
    "forget_projector",
    "intervention_scores",
    "synthetic_unlearning",
]


@dataclass
class SyntheticGrid:
    """The sweep of the synthetic unlearning evaluation (2 x 2 x 2 = 8 points by default).

    The retain thresholds are higher than SAEBench's (0.001, 0.01): synthetic features fire on a few
    percent of tokens, LM features on far fewer, and a learned feature leaks onto some retain tokens.
    """

    retain_thresholds: list[float] = field(default_factory=lambda: [0.01, 0.1])
    """drop features whose retain-corpus sparsity is >= the threshold"""
    n_features: list[int] = field(default_factory=lambda: [4, 8])
    """number of top forget-sparsity features to clamp"""
    multipliers: list[float] = field(default_factory=lambda: [0.0, 0.1])
    """clamp value is ``-multiplier`` (raw activation units)"""

    def __post_init__(self) -> None:
        check_grid(self.retain_thresholds, self.n_features, self.multipliers, allow_zero_multiplier=True)

    def points(self) -> list[tuple[float, int, float]]:
        """``(retain_threshold, n_features, multiplier)`` in SAEBench's order."""
        return [
            (float(t), int(n), float(m))
            for t in self.retain_thresholds
            for n in self.n_features
            for m in self.multipliers
        ]


def forget_feature_indices(truth: GroundTruth, group: str = "slow", n_features: int | None = 4) -> Tensor:
    """Indices (into the true features) of the first ``n_features`` features of ``group`` (``None``: all)."""
    members = truth.group(group)
    if n_features is not None:
        if n_features < 1:
            raise ValueError(
                f"n_forget_features must be >= 1 (or None for the whole group), got {n_features}"
            )
        members = members[:n_features]
    return members.long()


def split_forget_retain(coefficients: Tensor, valid: Tensor, forget: Tensor) -> Tensor:
    """``[N]`` bool: True for forget sequences (some forget feature has ``c > 0`` at a valid token).

    Args:
        coefficients: true coefficients ``[N, T, n_true]``.
        valid: ``[N, T]`` bool.
        forget: indices of the forget features.
    """
    on = coefficients[..., forget.to(coefficients.device)] > 0  # [N, T, |F|]
    return (on.any(-1) & valid.to(on.device, torch.bool)).any(-1)


def forget_projector(features: Tensor, forget: Tensor) -> Tensor:
    """Orthogonal projector ``P [d_in, d_in]`` onto the span of the forget directions ``features[forget]``."""
    D = features[forget.to(features.device)].double()  # [|F|, d_in]
    # P = D^T (D D^T)^+ D, through an orthonormal basis of the row space
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    basis = Vh[S > S.max() * 1e-8]  # [rank, d_in]
    return (basis.t() @ basis).float()


def intervention_scores(
    delta: Tensor,
    coefficients: Tensor,
    features: Tensor,
    forget: Tensor,
    valid: Tensor,
    is_forget: Tensor,
    projector: Tensor | None = None,
) -> tuple[float, float]:
    """``(removed, damage)`` of an intervention ``delta = x' - x`` (see the module docstring).

    Args:
        delta: ``[N, T, d_in]`` change of the activations (raw units).
        coefficients: true coefficients ``[N, T, n_true]``.
        features: true unit directions ``[n_true, d_in]``.
        forget: indices of the forget features.
        valid: ``[N, T]`` bool.
        is_forget: ``[N]`` bool from :func:`split_forget_retain`.
        projector: ``P`` (computed from ``features[forget]`` if ``None``).
    """
    dev = delta.device
    P = (forget_projector(features, forget) if projector is None else projector).to(dev).double()
    feats = features.to(dev).double()
    c = coefficients.to(dev).double()
    fmask = torch.zeros(feats.shape[0], dtype=torch.bool, device=dev)
    fmask[forget.to(dev)] = True
    s = c[..., fmask] @ feats[fmask]  # [N, T, d_in] forget signal
    o = c[..., ~fmask] @ feats[~fmask]  # [N, T, d_in] other signal
    d = delta.double()
    Pd = d @ P  # P is symmetric
    valid = valid.to(dev, torch.bool)
    fz = valid & is_forget.to(dev)[:, None]  # valid tokens of forget sequences
    rt = valid & ~is_forget.to(dev)[:, None]  # valid tokens of retain sequences
    s_norm = s[fz].pow(2).sum()
    removed = 1.0 - ((s + Pd)[fz].pow(2).sum() / s_norm.clamp_min(1e-30)).sqrt()
    damaged = d[rt].pow(2).sum() + (d - Pd)[fz].pow(2).sum()
    damage = (damaged / o[valid].pow(2).sum().clamp_min(1e-30)).sqrt()
    return removed.item(), damage.item()


def _split_sparsities(
    sae: nn.Module, acts: Tensor, valid: Tensor, is_forget: Tensor, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Feature sparsities ``[d_sae]`` on the forget sequences and on the retain sequences."""
    dtype = next(sae.parameters()).dtype
    d_sae = sae.W_dec.shape[0]
    sp_forget = SparsityAccumulator(d_sae, device=acts.device)
    sp_retain = SparsityAccumulator(d_sae, device=acts.device)
    for lo in range(0, acts.shape[0], batch_size):
        x = acts[lo : lo + batch_size].to(dtype)  # [b, T, d_in]
        v, fz = valid[lo : lo + batch_size], is_forget[lo : lo + batch_size]
        f = sae.encode(x, v)  # [b, T, d_sae]
        sp_forget.update(f, v & fz[:, None])
        sp_retain.update(f, v & ~fz[:, None])
    return sp_forget.compute(), sp_retain.compute()


def _clamp_deltas(
    sae: nn.Module, acts: Tensor, valid: Tensor, feats: Tensor, multiplier: float, batch_size: int
) -> Tensor:
    """``x' - x`` ``[N, T, d_in]`` of the clamp of ``feats`` at ``multiplier``, batch by batch."""
    dtype = next(sae.parameters()).dtype
    deltas = []
    for lo in range(0, acts.shape[0], batch_size):
        x = acts[lo : lo + batch_size].to(dtype)
        deltas.append(clamp_intervention(x, sae, feats, multiplier, valid[lo : lo + batch_size]) - x)
    return torch.cat(deltas)


@torch.no_grad()
def synthetic_unlearning(
    sae: nn.Module,
    acts: Tensor,
    valid: Tensor,
    coefficients: Tensor,
    features: Tensor,
    forget: Tensor,
    grid: SyntheticGrid | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Run the synthetic unlearning grid on held-out sequences (see the module docstring).

    Args:
        sae: an SAE on raw activations with ``encode`` and ``W_dec`` (``SAEModule.raw_sae`` or an
            exported SAE); runs on its own device.
        acts: raw activations ``[N, T, d_in]``.
        valid: ``[N, T]`` bool.
        coefficients: true coefficients ``[N, T, n_true]``.
        features: true unit directions ``[n_true, d_in]``.
        forget: indices of the forget features (:func:`forget_feature_indices`).
        grid: the sweep (default :class:`SyntheticGrid`).
        batch_size: sequences per encoder call.

    Returns:
        ``{"score", "forget_removed", "retain_damage", "best": grid point, "results": [per point],
        "n_forget_sequences", "n_retain_sequences"}``; ``forget_removed`` and ``retain_damage`` are those
        of the best grid point (largest ``removed - damage``).

    Raises:
        ValueError: if there are no forget or no retain sequences (change the forget set).
    """
    grid = grid or SyntheticGrid()
    dev = next(sae.parameters()).device
    acts, valid = acts.to(dev), valid.to(dev, torch.bool)
    coefficients, features = coefficients.to(dev).float(), features.to(dev).float()
    forget = torch.as_tensor(forget, dtype=torch.long, device=dev)
    is_forget = split_forget_retain(coefficients, valid, forget)  # [N]
    n_f, n_r = int(is_forget.sum()), int((~is_forget).sum())
    if n_f == 0 or n_r == 0:
        raise ValueError(
            f"synthetic unlearning needs both forget and retain sequences, got {n_f} forget and {n_r} "
            "retain; use fewer (or more) forget features, or more validation sequences"
        )
    forget_sparsity, retain_sparsity = _split_sparsities(sae, acts, valid, is_forget, batch_size)
    P = forget_projector(features, forget)

    results, cache = [], {}
    for thr, n, m in grid.points():
        feats = select_features(forget_sparsity, retain_sparsity, thr, n)
        key = (tuple(feats.tolist()), m)
        if key not in cache:
            delta = _clamp_deltas(sae, acts, valid, feats, m, batch_size)  # [N, T, d_in]
            cache[key] = intervention_scores(delta, coefficients, features, forget, valid, is_forget, P)
        removed, damage = cache[key]
        results.append(
            {
                "retain_threshold": thr,
                "n_features": n,
                "multiplier": m,
                "features": feats.tolist(),
                "removed": removed,
                "damage": damage,
            }
        )
    best = max(results, key=lambda r: r["removed"] - r["damage"])  # first in grid order on ties
    return {
        "score": max(0.0, best["removed"] - best["damage"]),
        "forget_removed": best["removed"],
        "retain_damage": best["damage"],
        "best": best,
        "results": results,
        "n_forget_sequences": n_f,
        "n_retain_sequences": n_r,
    }
