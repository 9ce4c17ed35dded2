"""The comparison report: ``<out>/<name>/report.md`` with PNG figures beside it, and ``summary.md``.

The header (command, machine, wall time), then for a frontier grid the sections of
:mod:`mtsae.compare.frontier_report` (verdicts, tables at common L0, convergence, figures; it also writes
``summary.md``, a block to paste into a README), then every run (steps, how it ended, train time), and
for explicit runs one table of final validation metrics (bold: best of a column), the ablation tables
and bar charts.
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

from mtsae.compare.config import CompareConfig  # noqa: E402
from mtsae.compare.convergence import run_end  # noqa: E402
from mtsae.compare.examples_report import context_use_section, examples_section  # noqa: E402
from mtsae.compare.frontier_report import frontier_sections, slug  # noqa: E402
from mtsae.compare.results import RunResult, timescale_groups  # noqa: E402
from mtsae.compare.runner import now  # noqa: E402

__all__ = ["machine_info", "write_report"]

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
    for g in timescale_groups(results):
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
            lines += frontier_sections(cfg, grid, root, figures, config_path)
        lines += _runs_table(results)
        if explicit:
            lines += _explicit_sections(cfg, explicit, root, figures)
        lines += context_use_section(out, cfg, results)
        lines += examples_section(out, cfg, results)
        lines += _command_lines(results)
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path


def _overrides_text(overrides: list[str], width: int = 100) -> str:
    """The shared overrides, each long value (a callback list) cut to ``width`` characters."""
    return " ".join(o if len(o) <= width else o[: width - 5] + " ...]" for o in overrides) or "none"


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
        f"- base training config: `{cfg.base}`; shared overrides: `{_overrides_text(cfg.overrides)}`",
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
    groups = timescale_groups(results)
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
            fname = f"{slug(sec)}.png"
            panels = [(k.removeprefix("val/"), [(k, "")]) for k in keys[:12]]
            if _grouped_bars(results, panels, root / fname, sec):
                own.append((sec, fname))
    lines += ["## Figures", ""]
    for title, fname in own:
        lines += [f"### {title}", "", f"![{title}]({fname})", ""]
    figures += own
    return lines
