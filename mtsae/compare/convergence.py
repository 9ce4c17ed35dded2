"""Did the runs train long enough for the claims made about them?

Two checks, both read from what the runs logged:

* **how each run ended**: stopped by ``callbacks.PlateauStopping`` (no monitored metric improved for its
  patience), stopped by another early-stopping rule, or cut off by the step cap (``max_steps``);
* **whether each metric had settled**: a run has *settled* on a metric when its value at the end of
  training (the mean of its last :data:`SETTLE_POINTS` validations) differs from its value three quarters
  of the way through (the mean of the :data:`SETTLE_POINTS` validations nearest that step) by less than the
  metric's *min effect*, the smallest difference the report calls a difference. A run that still moves by
  a claim-sized amount in its last quarter had not converged for the purpose of the verdicts.

The report marks every verdict whose families include unsettled runs, and lists per family how the runs
ended and how many had settled on each metric. A curve with fewer than ``2 × SETTLE_POINTS`` validations
(e.g. a metric evaluated only at the end of training) cannot show either: its cell says ``n/a``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "SETTLE_POINTS",
    "LATE_FRACTION",
    "END_FRACTION",
    "late_change",
    "end_values",
    "RunEnd",
    "run_end",
    "FamilyConvergence",
    "assess",
    "unsettled_note",
    "convergence_table",
]

#: validations averaged at each end of the late-change window (damps validation noise)
SETTLE_POINTS = 3
#: the late-change window starts at this fraction of the run's steps
LATE_FRACTION = 0.75
#: a run's end value averages validations at or after this fraction of its steps only
END_FRACTION = 0.5


def _mean_near(curve: Sequence[tuple[int, float]], step: float, n: int) -> float:
    """The mean of the ``n`` validations whose steps are nearest ``step``."""
    nearest = sorted(curve, key=lambda p: (abs(p[0] - step), p[0]))[:n]
    return sum(v for _, v in nearest) / len(nearest)


def late_change(curve: Sequence[tuple[int, float]], late_fraction: float = LATE_FRACTION) -> float:
    """How much a validation curve moved over the last quarter of training (see the module docstring).

    NaN when the curve is too short to tell (fewer than ``2 × SETTLE_POINTS`` finite validations).
    """
    pts = sorted((int(s), float(v)) for s, v in curve if not math.isnan(float(v)))
    if len(pts) < 2 * SETTLE_POINTS:
        return math.nan
    end = sum(v for _, v in pts[-SETTLE_POINTS:]) / SETTLE_POINTS
    # the earlier window must not share validations with the final one
    earlier = pts[:-SETTLE_POINTS]
    return end - _mean_near(earlier, late_fraction * pts[-1][0], SETTLE_POINTS)


def end_values(final: dict[str, float], curves: dict[str, Sequence[tuple[int, float]]]) -> dict[str, float]:
    """A run's value of each metric at the end of training: the mean of its last :data:`SETTLE_POINTS`
    validations at or after half of the metric's last logged step (the run is on its plateau there, so
    this only averages out validation jitter, e.g. a feature whose best cosine hovers at the recovery
    threshold), else its final value. The bound keeps a metric evaluated only a few times (e.g. every
    2nd of 6 validations) from averaging in a value from early in training."""
    out = dict(final)
    for metric, curve in curves.items():
        pts = sorted((int(s), float(v)) for s, v in curve if not math.isnan(float(v)))
        late = [v for s, v in pts if s >= END_FRACTION * pts[-1][0]][-SETTLE_POINTS:]
        if metric in out and late:
            out[metric] = sum(late) / len(late)
    return out


@dataclass(frozen=True)
class RunEnd:
    """How a run ended."""

    kind: str
    """``plateau`` (PlateauStopping fired), ``early`` (stopped before the cap by another rule), ``cap``
    (reached ``max_steps``) or ``unknown``"""
    step: int | None

    @property
    def capped(self) -> bool:
        return self.kind == "cap"


def run_end(global_step: int | None, max_steps: int | None, stopping: dict | None) -> RunEnd:
    """Classify a run's end from its ``summary.json`` fields (``stopping``: the PlateauStopping record)."""
    if stopping and stopping.get("plateaued"):
        return RunEnd("plateau", stopping.get("stopped_step", global_step))
    if global_step is None or max_steps is None:
        return RunEnd("unknown", global_step)
    return RunEnd("cap" if global_step >= max_steps else "early", global_step)


@dataclass
class FamilyConvergence:
    """How the runs of one (activation, family) ended and which had settled on each metric."""

    runs: int = 0
    ends: dict[str, int] = field(default_factory=dict)
    """end kind -> count"""
    unsettled: dict[str, list[str]] = field(default_factory=dict)
    """metric -> names of runs that had not settled on it"""
    untested: dict[str, list[str]] = field(default_factory=dict)
    """metric -> names of runs whose curve of it is too short to tell (e.g. a metric evaluated once, at
    the end): neither settled nor unsettled"""


def assess(
    results: Sequence, activation: str, metrics: Sequence[str], min_effect: Callable[[str], float]
) -> dict[str, FamilyConvergence]:
    """Per family of ``activation``: how its runs ended and which had not settled on each metric.

    ``results``: :class:`mtsae.compare.results.RunResult` objects; ``min_effect``: a callable metric ->
    min effect. A metric with a min effect of 0 is checked against nothing and counts as settled; a curve
    too short to tell (:func:`late_change` is NaN) counts as neither (``untested``).
    """
    out: dict[str, FamilyConvergence] = {}
    for r in results:
        if r.spec.activation != activation or r.spec.family is None:
            continue
        fc = out.setdefault(
            r.spec.family,
            FamilyConvergence(unsettled={m: [] for m in metrics}, untested={m: [] for m in metrics}),
        )
        fc.runs += 1
        end = run_end(r.global_step, r.max_steps, r.stopping)
        fc.ends[end.kind] = fc.ends.get(end.kind, 0) + 1
        for m in metrics:
            tol = min_effect(m)
            change = late_change(r.curves.get(m, []))
            if math.isnan(change):
                fc.untested[m].append(r.name)
            elif tol > 0 and abs(change) >= tol:
                fc.unsettled[m].append(r.name)
    return out


def unsettled_note(conv: dict[str, FamilyConvergence], metric: str, families: Sequence[str]) -> str:
    """`` — not settled: mtsae 2/9 runs`` for the families with runs still moving on ``metric``, else ``""``."""
    parts = [
        f"{f} {len(conv[f].unsettled.get(metric, []))}/{conv[f].runs}"
        for f in families
        if f in conv and conv[f].unsettled.get(metric)
    ]
    return f" — **not settled**: {', '.join(parts)} runs still moving" if parts else ""


def convergence_table(conv: dict[str, FamilyConvergence], metrics: Sequence[str]) -> list[str]:
    """A markdown table: per family, how its runs ended and how many had settled on each metric
    (``n/a``: no run's curve was long enough to tell; ``k/n (m n/a)``: m of the runs' curves were not)."""
    if not conv:
        return []
    names = [m.removeprefix("val/") for m in metrics]
    lines = [
        "| family | runs | plateaued | stopped early (other rule) | reached the step cap | "
        + " | ".join(f"settled: {n}" for n in names)
        + " |",
        "|---" * (5 + len(metrics)) + "|",
    ]
    for fam, fc in conv.items():
        settled = [_settled_cell(fc, m) for m in metrics]
        lines.append(
            f"| {fam} | {fc.runs} | {fc.ends.get('plateau', 0)} | {fc.ends.get('early', 0)} | "
            f"{fc.ends.get('cap', 0)} | " + " | ".join(settled) + " |"
        )
    return [*lines, ""]


def _settled_cell(fc: FamilyConvergence, metric: str) -> str:
    untested = len(fc.untested.get(metric, []))
    if untested == fc.runs:
        return "n/a"
    tested = fc.runs - untested
    cell = f"{tested - len(fc.unsettled.get(metric, []))}/{tested}"
    return f"{cell} ({untested} n/a)" if untested else cell
