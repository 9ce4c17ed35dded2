"""The frontier-grid sections of a comparison report: the L0-matched analysis, the verdicts written from
it, the frontier tables, the convergence check, and the frontier and validation-curve figures.

:func:`frontier_sections` writes them (and ``summary.md``); :mod:`mtsae.compare.report` puts them in
``report.md``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from mtsae.compare.config import CompareConfig  # noqa: E402
from mtsae.compare.convergence import (  # noqa: E402
    SETTLE_POINTS,
    FamilyConvergence,
    assess,
    convergence_table,
    end_values,
    run_end,
    unsettled_note,
)
from mtsae.compare.frontier import ActivationFrontier, Point, frontier_analysis, min_effect_of  # noqa: E402
from mtsae.compare.results import RunResult, timescale_groups  # noqa: E402
from mtsae.compare.runner import now  # noqa: E402

__all__ = ["expand_metrics", "analyse_frontiers", "verdict_lines", "frontier_sections", "slug"]


def slug(s: str) -> str:
    """A file-name-safe lower-case form of ``s``."""
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def expand_metrics(metrics: list[str], results: list[RunResult]) -> list[str]:
    """``{group}`` in a metric name -> one metric per ground-truth group the runs logged."""
    groups = timescale_groups(results)
    out: list[str] = []
    for m in metrics:
        for name in [m.replace("{group}", g) for g in groups] if "{group}" in m else [m]:
            if name not in out:
                out.append(name)
    return out


def analyse_frontiers(cfg: CompareConfig, results: list[RunResult]) -> list[ActivationFrontier]:
    """The L0-matched analysis of every activation of the config's frontier grid.

    A run's point on its frontier is its *end value* of every metric (:func:`end_values`: the mean of its
    last validations), not the single last validation, whose jitter would count as seed variance.
    """
    if cfg.frontier is None:
        return []
    ends = {r.name: end_values(r.metrics, r.curves) for r in results}
    points = [
        Point(r.spec.family, r.spec.activation, int(r.spec.seed), ends[r.name]["val/l0"], ends[r.name])
        for r in results
        if r.spec.family is not None and "val/l0" in r.metrics
    ]
    metrics = expand_metrics(cfg.frontier.metrics, results)
    return [
        frontier_analysis(
            points,
            act.name,
            list(cfg.frontier.families),
            metrics,
            cfg.frontier.contrasts,
            cfg.frontier.n_l0,
            cfg.frontier.min_effect,
            single_value=len(act.values) == 1,
        )
        for act in cfg.frontier.activations
    ]


_COLORS = ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def _family_colors(families: list[str]) -> dict[str, str]:
    return {f: _COLORS[i % len(_COLORS)] for i, f in enumerate(families)}


def _plot_activation(
    fa: ActivationFrontier, results: list[RunResult], metrics: list[str], colors: dict[str, str], path: Path
) -> bool:
    """Left: every run's final (L0, FVU); then each metric interpolated at the common L0 (mean ± std)."""
    runs = [r for r in results if r.spec.activation == fa.activation and "val/l0" in r.metrics]
    if not runs:
        return False
    shown = [m for m in metrics if m in fa.table]
    n = 1 + len(shown)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    ax = axes[0, 0]
    for fam in fa.families or sorted({r.spec.family for r in runs}):
        fr = [r for r in runs if r.spec.family == fam]
        ax.scatter([r.metrics["val/l0"] for r in fr], [r.metrics.get("val/fvu", math.nan) for r in fr],
                   color=colors.get(fam, "k"), s=14, alpha=0.7, label=fam)  # fmt: skip
    if fa.l0_range is not None:
        ax.axvspan(*fa.l0_range, color="k", alpha=0.06, lw=0)
    ax.set_xlabel("L0")
    ax.set_ylabel("FVU")
    ax.set_title("every run (shade: common L0 range)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for j, metric in enumerate(shown, start=1):
        ax = axes[j // cols, j % cols]
        for fam, stats in fa.table[metric].items():
            ys = [s.mean for s in stats]
            es = [s.std if s.n > 1 else 0.0 for s in stats]
            ax.errorbar(fa.l0_values, ys, yerr=es, color=colors.get(fam, "k"), marker="o", ms=3, capsize=3,
                        label=fam)  # fmt: skip
        ax.set_xlabel("L0")
        ax.set_title(metric.removeprefix("val/"), fontsize=9)
        ax.grid(alpha=0.3)
    for j in range(n, rows * cols):
        axes[j // cols, j % cols].axis("off")
    fig.suptitle(f"{fa.activation}: frontier and metrics at common L0 (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


CURVE_METRICS = ("val/fvu", "val/l0", "val/recovered/{group}", "val/synthetic_unlearning/score")


def _plot_curves(activation: str, results: list[RunResult], colors: dict[str, str], path: Path) -> bool:
    """Validation curves of every run of one activation against training tokens seen, coloured by family."""
    runs = [r for r in results if r.spec.activation == activation and r.curves]
    metrics = [m for m in expand_metrics(list(CURVE_METRICS), runs) if any(m in r.curves for r in runs)]
    if not runs or not metrics:
        return False
    cols = min(len(metrics), 3)
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    in_tokens = all(r.tokens_per_step for r in runs)
    for j, metric in enumerate(metrics):
        ax = axes[j // cols, j % cols]
        for r in runs:
            c = r.curves.get(metric)
            if not c:
                continue
            scale = (r.tokens_per_step or 1) if in_tokens else 1
            ax.plot([(s + 1) * scale for s, _ in c], [v for _, v in c], color=colors.get(r.spec.family, "k"),
                    alpha=0.45, lw=0.9)  # fmt: skip
        ax.set_title(metric.removeprefix("val/"), fontsize=9)
        ax.set_xlabel("training tokens" if in_tokens else "steps")
        ax.grid(alpha=0.3)
    for j in range(len(metrics), rows * cols):
        axes[j // cols, j % cols].axis("off")
    fams = [f for f in colors if any(r.spec.family == f for r in runs)]
    axes[0, 0].legend(handles=[plt.Line2D([], [], color=colors[f], label=f) for f in fams], fontsize=7)
    fig.suptitle(f"{activation}: validation curves of every run (all knob values and seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


#: how an outcome is written inside a verdict's detail
_OUTCOME_TEXT = {"negligible": "apart, but by less than the min effect"}


def verdict_lines(fa: ActivationFrontier, conv: dict[str, FamilyConvergence] | None = None) -> list[str]:
    """The claims about one activation, one line per contrast and metric, written from the numbers;
    a claim whose families have runs that had not settled on the metric says so (``conv``)."""
    if fa.l0_range is None:
        ranges = "; ".join(f"{f} {lo:.1f}–{hi:.1f}" for f, (lo, hi) in fa.ranges.items()) or "none"
        if not fa.ranges:
            return [
                f"- **{fa.activation}**: no family has two finished runs at different L0 yet: nothing is compared."
            ]
        return [
            f"- **{fa.activation}**: the families share no L0 range (covered: {ranges}), so nothing is "
            "compared; widen the knob values so that every family's frontier covers a common range."
        ]
    lines = []
    contrasts: list[tuple[str, str]] = []
    for v in fa.verdicts:
        if (v.a, v.b) not in contrasts:
            contrasts.append((v.a, v.b))
    for a, b in contrasts:
        for metric in fa.table:
            vs = [v for v in fa.verdicts if (v.a, v.b, v.metric) == (a, b, metric)]
            if not vs:
                continue
            outcomes = {"no difference" if v.outcome == "negligible" else v.outcome for v in vs}
            where = (lambda v: f"L0 {v.l0:.1f}") if fa.matched else (lambda v: "at own L0")
            detail = "; ".join(
                f"{where(v)}: {v.stat_a.text()} vs {v.stat_b.text()}" + ("" if len(outcomes) == 1
                and v.outcome != "negligible" else f" ({_OUTCOME_TEXT.get(v.outcome, v.outcome)})") for v in vs
            )  # fmt: skip
            if outcomes == {"better"}:
                head = f"{a} is **better** than {b}"
            elif outcomes == {"worse"}:
                head = f"{a} is **worse** than {b}"
            elif outcomes == {"no difference"}:
                head = f"**no difference** between {a} and {b}"
            elif len(outcomes) == 1:
                head = f"{a} vs {b}: {next(iter(outcomes))}"
            else:
                head = f"{a} vs {b} depends on L0"
            note = unsettled_note(conv, metric, (a, b)) if conv else ""
            lines.append(f"- **{fa.activation}**, {metric.removeprefix('val/')}: {head} ({detail}){note}")
    return lines


def _frontier_tables(fa: ActivationFrontier) -> list[str]:
    if fa.l0_range is None:
        return []
    lines = []
    where = "at common L0" if fa.matched else "at each family's own L0 (one knob value: not L0-matched)"
    columns = [f"L0 {x:.1f}" for x in fa.l0_values] if fa.matched else ["own L0"]
    for metric, per_family in fa.table.items():
        lines += [f"**{metric.removeprefix('val/')}** {where} (mean ± std over seeds, n seeds)", ""]
        lines += ["| family | " + " | ".join(columns) + " | n |"]
        lines += ["|---" * (len(fa.l0_values) + 2) + "|"]
        for fam, stats in per_family.items():
            ns = sorted({s.n for s in stats})
            lines.append(
                f"| {fam} | " + " | ".join(s.text() for s in stats) + f" | {','.join(map(str, ns))} |"
            )
        lines.append("")
    return lines


def _budget_text(cfg: CompareConfig, results: list[RunResult]) -> str:
    """How long the runs trained: the base config's stopping rule and step cap, and how the runs ended."""
    callbacks = ((yaml.safe_load(Path(cfg.base).read_text()) or {}).get("trainer") or {}).get(
        "callbacks"
    ) or []
    rules = {
        str(cb.get("class_path", "")).rsplit(".", 1)[-1]: cb.get("init_args") or {}
        for cb in callbacks
        if isinstance(cb, dict)
        and str(cb.get("class_path", "")).endswith(("EarlyStopping", "PlateauStopping"))
    }
    caps = sorted({r.max_steps for r in results if r.max_steps is not None})
    cap = f"at most {', '.join(map(str, caps))} steps" if caps else "no step cap"
    if "PlateauStopping" in rules:
        ps = rules["PlateauStopping"]
        watched = ", ".join(
            f"`{m}` by {spec.get('min_delta', 0)}{' (relative)' if spec.get('relative') else ''}"
            for m, spec in (ps.get("monitors") or {}).items()
        )
        after = f", not before step {ps['min_steps']}" if ps.get("min_steps") else ""
        rule = (
            f"Each run stops when none of its watched metrics has improved for {ps.get('patience', 5)} "
            f"validations in a row ({watched}; `callbacks.PlateauStopping`{after}, {cap})"
        )
    elif "EarlyStopping" in rules:
        es = rules["EarlyStopping"]
        rule = (
            f"Each run stops when `{es.get('monitor')}` has not improved by {es.get('min_delta', 0.0)} for "
            f"{es.get('patience', 3)} validations ({cap})"
        )
    else:
        rule = f"Each run trains for the base config's budget ({cap}; no early stopping)"
    capped = sum(run_end(r.global_step, r.max_steps, r.stopping).capped for r in results)
    return (
        f"{rule}: {len(results) - capped} of {len(results)} runs stopped before the cap. A claim is marked "
        "*not settled* when a run behind it still moved by at least the metric's min effect over its last "
        "quarter of training (see Convergence)."
    )


def frontier_sections(
    cfg: CompareConfig, grid: list[RunResult], root: Path, figures: list[tuple[str, str]], config_path: str
) -> list[str]:
    """The L0-matched frontier sections (verdicts, tables, figures); writes ``summary.md`` beside the
    report and appends the figures it draws to ``figures``."""
    fr = cfg.frontier
    lines = [
        "## L0-matched frontiers",
        "",
        "Families: "
        + ", ".join(f"`{f}` ({' '.join(a) or 'the base model'})" for f, a in fr.families.items())
        + ".",
        f"Seeds: {cfg.seeds}. Each (family, seed) frontier is the runs' end (L0, metric) points over the "
        "knob values (end value: the mean of a run's last 3 validations in its second half of training, "
        "which averages out validation jitter on the plateau); metrics are interpolated linearly in L0 at "
        f"{fr.n_l0} common L0 values spread over the range that every frontier covers (no "
        "extrapolation), then averaged over seeds (mean ± std, ddof 1; n = seeds). A family is "
        "*better* or *worse* than another only when the intervals mean ± std do not overlap and the means "
        "differ by at least the metric's min effect (the smallest difference the report calls one); "
        "otherwise the report says *no difference*. " + _budget_text(cfg, grid),
        "",
        "### Verdicts",
        "",
    ]
    analyses = analyse_frontiers(cfg, grid)
    metrics = expand_metrics(fr.metrics, grid)
    convs = {
        fa.activation: assess(grid, fa.activation, metrics, lambda m: min_effect_of(m, fr.min_effect))
        for fa in analyses
    }
    verdicts = [line for fa in analyses for line in verdict_lines(fa, convs[fa.activation])]
    lines += verdicts + [""]
    colors = _family_colors(list(fr.families))
    summary = [
        f"<!-- generated by mtsae compare from {config_path or cfg.name}; {len(grid)} runs, seeds "
        f"{cfg.seeds}, {now()} -->",
        "",
        *verdicts,
        "",
    ]
    for fa in analyses:
        knob = next(a for a in fr.activations if a.name == fa.activation)
        rng = "none" if fa.l0_range is None else f"{fa.l0_range[0]:.1f}–{fa.l0_range[1]:.1f}"
        if not fa.matched:
            rng = f"none: one knob value, runs' L0 {rng}"
        lines += [
            f"### {fa.activation}",
            "",
            f"Knob `{knob.knob}` over {knob.values}; common L0 range {rng}; "
            + "covered per family: "
            + ("; ".join(f"{f} {lo:.1f}–{hi:.1f}" for f, (lo, hi) in fa.ranges.items()) or "none")
            + ".",
            "",
        ]
        tables = _frontier_tables(fa)
        lines += tables
        lines += (
            []
            if not convs[fa.activation]
            else [
                f"**Convergence** ({fa.activation}): how the runs ended, and how many had settled on each metric "
                "(moved by less than its min effect over the last quarter of training; n/a: evaluated fewer "
                f"than {2 * SETTLE_POINTS} times, too few to tell; min effects: "
                + ", ".join(f"{m.removeprefix('val/')} {min_effect_of(m, fr.min_effect):g}" for m in metrics)
                + ")",
                "",
                *convergence_table(convs[fa.activation], metrics),
            ]
        )
        summary += [f"#### {fa.activation} (common L0 range {rng})", "", *tables]
        fname = f"frontier_{slug(fa.activation)}.png"
        if _plot_activation(fa, grid, metrics, colors, root / fname):
            lines += [f"![{fa.activation} frontier]({fname})", ""]
            figures.append((f"{fa.activation}: frontier", fname))
        cname = f"curves_{slug(fa.activation)}.png"
        if _plot_curves(fa.activation, grid, colors, root / cname):
            lines += [f"![{fa.activation} validation curves]({cname})", ""]
            figures.append((f"{fa.activation}: validation curves", cname))
    (root / "summary.md").write_text("\n".join(summary))
    return lines
