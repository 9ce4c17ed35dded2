"""The comparison report: ``<out>/<name>/report.md`` with PNG figures beside it, and ``summary.md``.

For explicit runs: one table of final validation metrics (bold: best of a column), the ablation tables and
bar charts. For a frontier grid: per activation, the frontier plot (every run's final L0 and FVU), the
metrics interpolated at common L0 values (mean ± std over seeds, with n), the verdict of every contrast
written from those numbers (:mod:`mtsae.compare.frontier`), and each run's validation curves (FVU, L0,
recovery per group, synthetic unlearning) against training tokens seen. ``summary.md`` holds the verdicts
and the tables as a markdown block to paste into a README.
"""

from __future__ import annotations

import math
import os
import platform
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from mtsae.compare.config import CompareConfig  # noqa: E402
from mtsae.compare.convergence import (  # noqa: E402
    FamilyConvergence,
    assess,
    convergence_table,
    end_values,
    run_end,
    unsettled_note,
)
from mtsae.compare.frontier import ActivationFrontier, Point, frontier_analysis, min_effect_of  # noqa: E402
from mtsae.compare.results import RunResult  # noqa: E402
from mtsae.compare.runner import now  # noqa: E402

__all__ = ["machine_info", "write_report", "analyse_frontiers", "expand_metrics"]

#: headline columns: metric key -> (header, better: "min" | "max" | None)
HEADLINE: dict[str, tuple[str, str | None]] = {
    "val/fvu": ("FVU", "min"),
    "val/l0": ("L0", None),
    "val/dead_fraction": ("dead", "min"),
    "val/mmcs": ("MMCS", "max"),
    "val/recovered": ("recovered", "max"),
    "val/ce_loss_score": ("CE-loss score", "max"),
    "val/unlearning_score": ("unlearning score", "max"),
    "val/synthetic_unlearning/score": ("synthetic unlearning", "max"),
}
RECONSTRUCTION = {
    "val/fvu",
    "val/explained_variance",
    "val/mse",
    "val/cossim",
    "val/l0",
    "val/l1",
    "val/l2_ratio",
    "val/dead_fraction",
    "val/loss",
}


def _group_of(key: str) -> str:
    """The report section of a metric key."""
    if key in RECONSTRUCTION:
        return "Reconstruction and sparsity"
    if re.match(r"^val/(mmcs|recovered)(/|$)", key):
        return "Ground-truth recovery"
    k = key.lower()
    if "unlearning" in k or "wmdp" in k or "mmlu" in k:
        return "Unlearning"
    if re.search(r"(ce_loss|kl_div|_ce|ce_)", k):
        return "LM fidelity (CE-loss / KL)"
    if any(
        s in k
        for s in ("disentangl", "coheren", "cos", "persist", "autocorr", "attribution", "density", "dense")
    ):
        return "Disentanglement"
    return "Other"


def _timescale_groups(results: list[RunResult]) -> list[str]:
    groups: list[str] = []
    for r in results:
        for k in r.metrics:
            m = re.match(r"^val/recovered/(.+)$", k)
            if m and m.group(1) not in groups:
                groups.append(m.group(1))
    return groups


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def _table(results: list[RunResult], columns: list[tuple[str, str, str | None]]) -> list[str]:
    """A markdown table, one row per run; the best value of each column with a direction is bold."""
    best: dict[str, float] = {}
    for key, _, better in columns:
        vals = [r.metrics[key] for r in results if key in r.metrics and not math.isnan(r.metrics[key])]
        if better and len(vals) > 1 and min(vals) != max(vals):  # no bold when every run ties
            best[key] = min(vals) if better == "min" else max(vals)
    lines = ["| run | " + " | ".join(h for _, h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in results:
        cells = []
        for key, _, _ in columns:
            v = r.metrics.get(key)
            s = _fmt(v)
            cells.append(f"**{s}**" if v is not None and key in best and v == best[key] else s)
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return lines


def _headline_columns(results: list[RunResult]) -> list[tuple[str, str, str | None]]:
    present = {k for r in results for k in r.metrics}
    cols = [(k, h, b) for k, (h, b) in HEADLINE.items() if k in present]
    for g in _timescale_groups(results):
        for what, h in (("recovered", "rec"), ("mmcs", "MMCS")):
            key = f"val/{what}/{g}"
            if key in present:
                cols.append((key, f"{h} {g}", "max"))
    return cols


def _describe_model(h: dict[str, Any]) -> str:
    if not h:
        return "—"
    act = h.get("activation", "?")
    kw = h.get("activation_kwargs") or {}
    if kw:
        act += "(" + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")"
    dil = h.get("dilations")
    parts = [act, f"dilations={list(dil) if dil is not None else '?'}", f"sep={h.get('separation', '?')}"]
    if h.get("activation") in ("relu", "jumprelu"):
        parts.append(f"λ={h.get('sparsity_coeff')}")
    if h.get("cascade"):
        parts.append("cascade")
    parts.append(f"d_sae={h.get('d_sae')}")
    return ", ".join(parts)


def _is_baseline(r: RunResult) -> bool:
    return list(r.hparams.get("dilations") or []) == []


def _plot_frontier(results: list[RunResult], path: Path) -> bool:
    pts = [r for r in results if "val/l0" in r.metrics and "val/fvu" in r.metrics]
    if not pts:
        return False
    markers = {"relu": "o", "topk": "s", "batchtopk": "D", "jumprelu": "^"}
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in pts:
        base = _is_baseline(r)
        ax.scatter(
            r.metrics["val/l0"],
            r.metrics["val/fvu"],
            marker=markers.get(str(r.hparams.get("activation")), "x"),
            color="tab:gray" if base else "tab:blue",
            s=50,
            zorder=3,
        )
        ax.annotate(r.name, (r.metrics["val/l0"], r.metrics["val/fvu"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
    ax.scatter([], [], color="tab:blue", label="MTSAE (dilations ≠ [])")
    ax.scatter([], [], color="tab:gray", label="per-token SAE")
    for act, m in markers.items():
        if any(r.hparams.get("activation") == act for r in pts):
            ax.scatter([], [], marker=m, color="k", label=act)
    l0s = [r.metrics["val/l0"] for r in pts]
    if min(l0s) > 0 and max(l0s) / min(l0s) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active features per token, validation)")
    ax.set_ylabel("FVU (validation, lower is better)")
    ax.set_title("Sparsity–fidelity frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _grouped_bars(
    results: list[RunResult],
    panels: list[tuple[str, list[tuple[str, str]]]],
    path: Path,
    title: str,
    unit_interval: bool = False,
) -> bool:
    """One panel per metric family; within a panel, x = metric, one bar per run (y in [0, 1] if
    ``unit_interval``)."""
    panels = [(t, [(k, lab) for k, lab in ks if any(k in r.metrics for r in results)]) for t, ks in panels]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        return False
    n = len(results)
    width = 0.8 / max(n, 1)
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7, 1.2 * max(len(k) for _, k in panels) * (1 + n / 8)),
                                                       3.2 * len(panels)), squeeze=False)  # fmt: skip
    for ax, (ptitle, keys) in zip(axes[:, 0], panels, strict=True):
        for j, r in enumerate(results):
            xs = [i + (j - (n - 1) / 2) * width for i in range(len(keys))]
            ys = [r.metrics.get(k, float("nan")) for k, _ in keys]
            ax.bar(xs, ys, width=width, color=cmap(j % cmap.N), label=r.name)
        ax.set_xticks(range(len(keys)), [lab for _, lab in keys], fontsize=8)
        ax.set_title(ptitle, fontsize=10)
        if unit_interval:
            ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=min(n, 5), loc="upper left", bbox_to_anchor=(0, -0.12 if len(panels) == 1
                      else 1.35), frameon=False)  # fmt: skip
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def machine_info() -> dict[str, str]:
    """Platform, CPU count and library versions of this machine."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": str(os.cpu_count()),
    }
    try:
        info["cpu_affinity"] = str(len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        pass
    import torch

    info["torch"] = torch.__version__
    info["torch_threads"] = str(torch.get_num_threads())
    info["accelerator"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        pass
    return info


def expand_metrics(metrics: list[str], results: list[RunResult]) -> list[str]:
    """``{group}`` in a metric name -> one metric per ground-truth group the runs logged."""
    groups = _timescale_groups(results)
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


def _verdict_lines(fa: ActivationFrontier, conv: dict[str, FamilyConvergence] | None = None) -> list[str]:
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
            detail = "; ".join(
                f"L0 {v.l0:.1f}: {v.stat_a.text()} vs {v.stat_b.text()}" + ("" if len(outcomes) == 1
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
    for metric, per_family in fa.table.items():
        lines += [f"**{metric.removeprefix('val/')}** at common L0 (mean ± std over seeds, n seeds)", ""]
        lines += ["| family | " + " | ".join(f"L0 {x:.1f}" for x in fa.l0_values) + " | n |"]
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
    capped = sum(
        1 for r in results if r.max_steps and r.global_step is not None and r.global_step >= r.max_steps
    )
    return (
        f"{rule}: {len(results) - capped} of {len(results)} runs stopped before the cap. A claim is marked "
        "*not settled* when a run behind it still moved by at least the metric's min effect over its last "
        "quarter of training (see Convergence)."
    )


def _timing_lines(results: list[RunResult], timing: dict[str, Any] | None) -> list[str]:
    total = sum(r.wall_s or 0.0 for r in results)
    lines = [f"- training time, summed over runs: {total / 60:.1f} min"]
    if timing:
        lines.append(
            f"- wall time of the comparison: {timing['wall_s'] / 60:.1f} min with --jobs {timing['jobs']} "
            f"({timing.get('started', '?')} to {timing.get('finished', '?')}"
            + (f", {timing['invocations']} invocations" if timing.get("invocations", 1) > 1 else "")
            + ")"
        )
    return lines


def write_report(
    out: Path,
    cfg: CompareConfig,
    results: list[RunResult],
    command: str,
    config_path: str = "",
    timing: dict[str, Any] | None = None,
) -> Path:
    """Write ``<out>/<name>/report.md`` (and ``summary.md`` for a frontier grid) with PNG figures beside
    them; returns the report path. ``timing``: the comparison's wall time (``wall_s``, ``jobs``, ...)."""
    root = Path(out) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    lines = _header_lines(cfg, results, command, config_path, timing)
    if not results:
        lines += ["No run has finished yet.", ""]
    else:
        explicit = [r for r in results if r.spec.family is None]
        grid = [r for r in results if r.spec.family is not None]
        figures: list[tuple[str, str]] = []
        if cfg.frontier is not None and grid:
            lines += _frontier_sections(cfg, grid, root, figures, config_path)
        lines += _runs_table(results)
        if explicit:
            lines += _explicit_sections(cfg, explicit, root, figures)
        lines += _command_lines(results)
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path


def _header_lines(
    cfg: CompareConfig,
    results: list[RunResult],
    command: str,
    config_path: str,
    timing: dict[str, Any] | None,
) -> list[str]:
    """Title, description, and where and how the comparison ran."""
    finished = {r.name for r in results}
    missing = [r.name for r in cfg.runs if r.name not in finished]
    lines = [f"# Comparison report: {cfg.name}", ""]
    if cfg.description:
        lines += [cfg.description.strip(), ""]
    info = machine_info()
    return lines + [
        f"- date: {now()}",
        f"- command: `{command}`",
        f"- compare config: `{config_path}`",
        f"- base training config: `{cfg.base}`; shared overrides: `{' '.join(cfg.overrides) or 'none'}`",
        "- machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"- runs finished: {len(results)}/{len(cfg.runs)}"
        + (
            f" (not finished: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''})"
            if missing
            else ""
        ),
        *_timing_lines(results, timing),
        "",
    ]


def _frontier_sections(
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
        "knob values (end value: the mean of a run's last 3 validations, which averages out validation "
        "jitter on the plateau); metrics are interpolated linearly in L0 at "
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
    verdicts = [line for fa in analyses for line in _verdict_lines(fa, convs[fa.activation])]
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
        lines += [
            f"**Convergence** ({fa.activation}): how the runs ended, and how many had settled on each metric "
            "(moved by less than its min effect over the last quarter of training; min effects: "
            + ", ".join(f"{m.removeprefix('val/')} {min_effect_of(m, fr.min_effect):g}" for m in metrics)
            + ")",
            "",
            *convergence_table(convs[fa.activation], metrics),
        ]
        summary += [f"#### {fa.activation} (common L0 range {rng})", "", *tables]
        fname = f"frontier_{_slug(fa.activation)}.png"
        if _plot_activation(fa, grid, metrics, colors, root / fname):
            lines += [f"![{fa.activation} frontier]({fname})", ""]
            figures.append((f"{fa.activation}: frontier", fname))
        cname = f"curves_{_slug(fa.activation)}.png"
        if _plot_curves(fa.activation, grid, colors, root / cname):
            lines += [f"![{fa.activation} validation curves]({cname})", ""]
            figures.append((f"{fa.activation}: validation curves", cname))
    (root / "summary.md").write_text("\n".join(summary))
    return lines


def _runs_table(results: list[RunResult]) -> list[str]:
    lines = ["## Runs", "", "| run | model | steps | ended | train time |", "|---|---|---|---|---|"]
    ended = {"plateau": "plateaued", "early": "stopped early", "cap": "step cap", "unknown": "—"}
    for r in results:
        t = f"{r.wall_s / 60:.1f} min" if r.wall_s else "—"
        end = ended[run_end(r.global_step, r.max_steps, r.stopping).kind]
        lines.append(f"| {r.name} | {_describe_model(r.hparams)} | {r.global_step} | {end} | {t} |")
    return [*lines, ""]


def _command_lines(results: list[RunResult]) -> list[str]:
    lines = ["## Commands", "", "Each run, as a single `train.py` call:", ""]
    if len(results) > 20:
        lines += ["<details><summary>all commands</summary>", ""]
    lines += [f"- {r.name}: `{r.command}`" for r in results]
    if len(results) > 20:
        lines += ["", "</details>"]
    return [*lines, ""]


def _explicit_sections(
    cfg: CompareConfig, results: list[RunResult], root: Path, figures: list[tuple[str, str]]
) -> list[str]:
    """Final metrics, ablation tables and bar charts of the explicit runs."""
    lines = [
        "## Final validation metrics",
        "",
        "All runs share the base config's data (same activation cache), seed and training budget; they differ",
        "only in the model section listed above. Metrics are the final validation metrics of each run",
        "(`summary.json`); bold marks the best value of a column (FVU and dead fraction: lowest).",
        "",
    ]
    lines += _table(results, _headline_columns(results)) + [""]
    for abl, members in cfg.ablations.items():
        sub = [r for m in members for r in results if r.name == m]
        if sub:
            lines += [f"### Ablation: {abl}", ""]
            lines += _table(sub, _headline_columns(sub)) + [""]
    own: list[tuple[str, str]] = []
    if _plot_frontier(results, root / "frontier.png"):
        own.append(("L0 vs FVU frontier", "frontier.png"))
    groups = _timescale_groups(results)
    if groups or any("val/recovered" in r.metrics for r in results):
        labels = ["all", *groups]
        keys = [("val/recovered", "all")] + [(f"val/recovered/{g}", g) for g in groups]
        mkeys = [("val/mmcs", "all")] + [(f"val/mmcs/{g}", g) for g in groups]
        if _grouped_bars(
            results,
            [("fraction of true features recovered (max cos > 0.9)", keys), ("MMCS", mkeys)],
            root / "recovery.png",
            "Ground-truth recovery per timescale group",
            unit_interval=True,
        ):
            own.append((f"Ground-truth recovery per timescale group ({', '.join(labels)})", "recovery.png"))
    sections: dict[str, list[str]] = {}
    for key in sorted({k for r in results for k in r.metrics}):
        sections.setdefault(_group_of(key), []).append(key)
    order = [
        "Reconstruction and sparsity",
        "Ground-truth recovery",
        "LM fidelity (CE-loss / KL)",
        "Unlearning",
        "Disentanglement",
        "Other",
    ]
    lines += ["## All final validation metrics", ""]
    for sec in order:
        keys = sections.get(sec)
        if not keys:
            continue
        lines += [f"### {sec}", ""]
        for start in range(0, len(keys), 10):  # keep tables readable
            chunk = keys[start : start + 10]
            lines += _table(results, [(k, k.removeprefix("val/"), None) for k in chunk]) + [""]
        if sec not in ("Reconstruction and sparsity", "Ground-truth recovery"):
            fname = f"{_slug(sec)}.png"
            panels = [(k.removeprefix("val/"), [(k, "")]) for k in keys[:12]]
            if _grouped_bars(results, panels, root / fname, sec):
                own.append((sec, fname))
    lines += ["## Figures", ""]
    for title, fname in own:
        lines += [f"### {title}", "", f"![{title}]({fname})", ""]
    figures += own
    return lines
