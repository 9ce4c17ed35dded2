"""L0-matched comparison over seeds: interpolate each seed's frontier at common L0 values, then compare.

For one activation, every (family, seed) pair has a frontier: its runs' end ``(L0, metric)`` points, one
per knob value (the report passes each run's end values: :func:`mtsae.compare.convergence.end_values`). A metric is read off a frontier at an L0 by linear interpolation between the two
neighbouring points in L0, and only inside the L0 range that frontier covers (no extrapolation). The common
L0 values of an activation are ``n_l0`` evenly spaced values over the range that *every* (family, seed)
frontier covers, so every model is compared at the same sparsity without leaving its data. At each common
L0 a family's value is the mean ± standard deviation (``ddof = 1``) over its seeds, with ``n`` seeds.

A claim follows the intervals ``mean ± std``: family ``a`` is *better* than ``b`` when the two intervals do
not overlap and ``a``'s is on the better side (lower FVU, higher recovery, ...), *worse* when they do not
overlap the other way, and *no difference* when they overlap. Intervals that do not overlap but whose
means differ by less than the metric's *min effect* (:data:`DEFAULT_MIN_EFFECT`, or the compare config's
``frontier.min_effect``) are *negligible*: a real but practically irrelevant difference is not a claim.
With fewer than two seeds on either side no claim is made.

An activation swept at a single knob value (the config's ``values`` hold one) has no frontier: every
(family, seed) has one point. Its families are then compared at their runs' own L0 (:attr:`ActivationFrontier.matched` is false): the
table holds each family's mean ± std of every metric and of ``val/l0`` itself, and the verdicts follow the
same rule, for a reader to weigh against the L0 difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "LOWER_IS_BETTER",
    "DEFAULT_MIN_EFFECT",
    "min_effect_of",
    "Point",
    "Stat",
    "Verdict",
    "ActivationFrontier",
    "better_direction",
    "interpolate",
    "common_l0_range",
    "summarise",
    "compare_stats",
    "frontier_analysis",
]

#: metrics where a lower value is better (everything else: higher is better)
LOWER_IS_BETTER = {
    "val/fvu",
    "val/mse",
    "val/loss",
    "val/dead_fraction",
    "val/synthetic_unlearning/retain_damage",
}


#: the smallest difference of means that counts as a difference, per metric (``{group}``: any group);
#: metrics not listed have none (0). A recovered fraction of 0.05 is about 1.6 of 32 true features.
DEFAULT_MIN_EFFECT = {
    "val/fvu": 0.005,
    "val/loss": 0.005,
    "val/recovered": 0.05,
    "val/recovered/{group}": 0.05,
    "val/mmcs": 0.01,
    "val/mmcs/{group}": 0.01,
    "val/synthetic_unlearning/score": 0.02,
}


def min_effect_of(metric: str, table: dict[str, float] | None = None) -> float:
    """The min effect of ``metric`` in ``table`` (default :data:`DEFAULT_MIN_EFFECT`); a ``{group}`` key
    matches one path segment; 0 when no key matches."""
    table = DEFAULT_MIN_EFFECT if table is None else table
    if metric in table:
        return float(table[metric])
    for key, value in table.items():
        if "{group}" in key:
            head, _, tail = key.partition("{group}")
            middle = metric[len(head) : len(metric) - len(tail)] if tail else metric[len(head) :]
            if metric.startswith(head) and metric.endswith(tail) and middle and "/" not in middle:
                return float(value)
    return 0.0


@dataclass(frozen=True)
class Point:
    """One finished frontier run as the analysis sees it."""

    family: str
    activation: str
    seed: int
    l0: float
    metrics: dict[str, float]


@dataclass(frozen=True)
class Stat:
    """Mean ± std over seeds (``std`` is NaN when ``n < 2``)."""

    mean: float
    std: float
    n: int

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "—"
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one contrast at one common L0."""

    activation: str
    metric: str
    l0: float
    a: str
    b: str
    outcome: str
    """``better`` / ``worse`` (a relative to b), ``no difference``, ``negligible`` (intervals apart, means
    closer than the min effect) or ``no claim (n < 2)``"""
    stat_a: Stat
    stat_b: Stat


@dataclass
class ActivationFrontier:
    """Everything the report states about one activation."""

    activation: str
    families: list[str]
    l0_range: tuple[float, float] | None
    """the L0 range every (family, seed) frontier covers (``None``: they share none)"""
    l0_values: list[float]
    table: dict[str, dict[str, list[Stat]]] = field(default_factory=dict)
    """metric -> family -> one :class:`Stat` per common L0 value"""
    verdicts: list[Verdict] = field(default_factory=list)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    """family -> the L0 range covered by all of its seeds"""
    matched: bool = True
    """``False``: a single knob value, compared at each family's own L0 (one column, ``l0_values`` holds
    the mean L0 over all runs)"""


def better_direction(metric: str) -> str:
    """``"min"`` when lower is better for ``metric``, else ``"max"``."""
    return "min" if metric in LOWER_IS_BETTER else "max"


def interpolate(l0s: Sequence[float], values: Sequence[float], at: float) -> float:
    """Linear interpolation in L0 of a frontier's ``values`` at ``at``; NaN outside the covered range.

    Points with equal L0 are averaged first; NaN values are dropped.
    """
    pairs = [(float(x), float(y)) for x, y in zip(l0s, values, strict=True) if not math.isnan(float(y))]
    if not pairs:
        return math.nan
    grouped: dict[float, list[float]] = {}
    for x, y in pairs:
        grouped.setdefault(x, []).append(y)
    xs = np.array(sorted(grouped))
    ys = np.array([float(np.mean(grouped[x])) for x in xs])
    tol = 1e-9 * max(1.0, abs(at))
    if at < xs[0] - tol or at > xs[-1] + tol:
        return math.nan
    return float(np.interp(at, xs, ys))


def common_l0_range(frontiers: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """The L0 range that every frontier (a list of L0 values) covers; ``None`` when they share none."""
    if not frontiers or any(len(f) == 0 for f in frontiers):
        return None
    lo, hi = max(min(f) for f in frontiers), min(max(f) for f in frontiers)
    return (lo, hi) if lo <= hi else None


def summarise(values: Sequence[float]) -> Stat:
    """Mean ± std (``ddof = 1``) of the non-NaN values."""
    v = [float(x) for x in values if not math.isnan(float(x))]
    if not v:
        return Stat(math.nan, math.nan, 0)
    std = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
    return Stat(float(np.mean(v)), std, len(v))


def compare_stats(a: Stat, b: Stat, direction: str, min_effect: float = 0.0) -> str:
    """``better`` / ``worse`` (a relative to b) when the intervals ``mean ± std`` do not overlap and the
    means differ by at least ``min_effect``; ``negligible`` when they do not overlap but the means are
    closer than that; else ``no difference``; ``no claim (n < 2)`` when either side has fewer than two
    seeds."""
    if a.n < 2 or b.n < 2:
        return "no claim (n < 2)"
    a_lo, a_hi, b_lo, b_hi = a.mean - a.std, a.mean + a.std, b.mean - b.std, b.mean + b.std
    if (a_lo > b_hi or a_hi < b_lo) and abs(a.mean - b.mean) < min_effect:
        return "negligible"
    if a_lo > b_hi:
        return "better" if direction == "max" else "worse"
    if a_hi < b_lo:
        return "worse" if direction == "max" else "better"
    return "no difference"


def frontier_analysis(
    points: Sequence[Point],
    activation: str,
    families: Sequence[str],
    metrics: Sequence[str],
    contrasts: Sequence[tuple[str, str]],
    n_l0: int = 3,
    min_effect: dict[str, float] | None = None,
    single_value: bool = False,
) -> ActivationFrontier:
    """Interpolate every (family, seed) frontier of ``activation`` at the common L0 values and compare.

    ``single_value``: the activation is swept at one knob value (the config says so, not the points:
    a partial grid of a swept activation also has one point per (family, seed), at different knob
    values, and is not comparable at the runs' own L0); its families are compared at their own L0.
    """
    pts = [p for p in points if p.activation == activation and p.family in families]
    by_fs: dict[tuple[str, int], list[Point]] = {}
    for p in pts:
        by_fs.setdefault((p.family, p.seed), []).append(p)
    if single_value and by_fs:
        return _own_l0_analysis(by_fs, activation, families, metrics, contrasts, min_effect)
    # a frontier needs two points; a (family, seed) with fewer is left out of the analysis
    frontiers = {k: v for k, v in by_fs.items() if len({p.l0 for p in v}) >= 2}
    present = [f for f in families if any(k[0] == f for k in frontiers)]
    ranges = {}
    for f in present:
        r = common_l0_range([[p.l0 for p in v] for k, v in frontiers.items() if k[0] == f])
        if r is not None:
            ranges[f] = r
    rng = common_l0_range([[p.l0 for p in v] for v in frontiers.values()])
    out = ActivationFrontier(activation, list(present), rng, [], ranges=ranges)
    if rng is None:
        return out
    lo, hi = rng
    out.l0_values = [float(x) for x in (np.linspace(lo, hi, n_l0) if n_l0 > 1 else [(lo + hi) / 2])]
    for metric in metrics:
        per_family: dict[str, list[Stat]] = {}
        for f in present:
            stats = []
            for x in out.l0_values:
                vals = [
                    interpolate([p.l0 for p in v], [p.metrics.get(metric, math.nan) for p in v], x)
                    for k, v in frontiers.items()
                    if k[0] == f
                ]
                stats.append(summarise(vals))
            per_family[f] = stats
        if all(s.n == 0 for stats in per_family.values() for s in stats):
            continue  # the metric was not logged by these runs
        out.table[metric] = per_family
        for a, b in contrasts:
            if a not in per_family or b not in per_family:
                continue
            for i, x in enumerate(out.l0_values):
                sa, sb = per_family[a][i], per_family[b][i]
                outcome = compare_stats(sa, sb, better_direction(metric), min_effect_of(metric, min_effect))
                out.verdicts.append(Verdict(activation, metric, x, a, b, outcome, sa, sb))
    return out


def _own_l0_analysis(
    by_fs: dict[tuple[str, int], list[Point]],
    activation: str,
    families: Sequence[str],
    metrics: Sequence[str],
    contrasts: Sequence[tuple[str, str]],
    min_effect: dict[str, float] | None,
) -> ActivationFrontier:
    """One point per (family, seed): mean ± std over seeds at each family's own L0, ``val/l0`` included."""
    present = [f for f in families if any(k[0] == f for k in by_fs)]
    l0s = {f: [v[0].l0 for k, v in by_fs.items() if k[0] == f] for f in present}
    all_l0 = [x for v in l0s.values() for x in v]
    out = ActivationFrontier(
        activation,
        present,
        (min(all_l0), max(all_l0)),
        [float(np.mean(all_l0))],
        ranges={f: (min(v), max(v)) for f, v in l0s.items()},
        matched=False,
    )
    for metric in ["val/l0", *[m for m in metrics if m != "val/l0"]]:
        per_family = {
            f: [summarise([v[0].metrics.get(metric, math.nan) for k, v in by_fs.items() if k[0] == f])]
            for f in present
        }
        if all(s[0].n == 0 for s in per_family.values()):
            continue
        out.table[metric] = per_family
        if metric == "val/l0":
            continue  # the sparsity the runs reached, not a claim
        for a, b in contrasts:
            if a in per_family and b in per_family:
                sa, sb = per_family[a][0], per_family[b][0]
                outcome = compare_stats(sa, sb, better_direction(metric), min_effect_of(metric, min_effect))
                out.verdicts.append(Verdict(activation, metric, out.l0_values[0], a, b, outcome, sa, sb))
    return out
