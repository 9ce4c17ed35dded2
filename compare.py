"""``mtsae compare``: train a set of SAEs on equal terms and write a comparison report.

    mtsae compare --config configs/compare/demo.yaml          # or: python compare.py --config ...
    mtsae compare --config configs/compare/demo.yaml --only-report

Every run is ``train.py fit --config <base> [shared overrides] [run overlays]`` with its logs, checkpoints,
exported SAE and ``summary.json`` in the fixed folder ``<out>/<name>/runs/<run>/``, so results are found
again: a run whose ``summary.json`` exists is skipped, an unfinished one is resumed from its
``checkpoints/last.ckpt`` (or restarted when there is none). All runs share the base config's data section
(hence the same activation cache), seed and training budget; a run may change only the ``model`` section.
The report is ``<out>/<name>/report.md`` with PNG figures beside it.

Compare config (YAML)::

    name: demo                     # report name: the output folder is <out>/<name>/
    base: configs/demo.yaml        # training config every run starts from (paths relative to the cwd)
    description: ...               # optional text put at the top of the report
    overrides:                     # optional, shared by all runs (data, seed, budget, trainer flags):
      trainer.max_epochs: 4        #   a mapping key -> value, or a list of CLI strings
      # - --trainer.max_epochs=4   #   ("--key=value" or "--key", "value")
    runs:                          # one entry per trained SAE; names must be unique, [A-Za-z0-9_.-]+
      - name: mtsae                # the base config as it is
      - name: topk
        configs: [configs/baselines/demo_topk.yaml]   # extra --config overlays (only a model: section)
      - name: sep_none
        args: {model.separation: none}                # CLI overrides (only --model.*), mapping or list
    ablations:                     # optional: named ordered subsets of runs, each gets its own table
      separation: [sep_none, mtsae]

Order of precedence (later wins): base, ``overrides``, the run's ``configs``, the run's ``args``, then the
command line's ``--set KEY=VALUE`` (forced on every run). Values in ``overrides``/``args`` mappings that
are not strings are written as JSON (``[1, 2]``, ``null``).
A finished run that was trained with a different specification (base, overrides, overlays or args) is an
error, not silently reused: delete its folder or give the run another name.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

__all__ = [
    "RunSpec",
    "CompareConfig",
    "load_compare_config",
    "train_args",
    "run_dir",
    "train_run",
    "collect_results",
    "write_report",
    "main",
]

log = logging.getLogger("mtsae.compare")

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
SPEC_FILE = "compare_run.json"


# ---------------------------------------------------------------------- the compare config
@dataclass
class RunSpec:
    """One trained SAE of a comparison."""

    name: str
    """folder name of the run, ``<out>/<report>/runs/<name>/``"""
    configs: list[str] = field(default_factory=list)
    """extra ``--config`` overlays applied after the base config (may contain only ``model:``)"""
    args: list[str] = field(default_factory=list)
    """CLI overrides applied after the overlays (only ``--model.*``)"""


@dataclass
class CompareConfig:
    """A comparison: a base training config, shared overrides and the runs (see the module docstring)."""

    name: str
    """report name; output folder ``<out>/<name>/``"""
    base: str
    """the training config every run starts from"""
    runs: list[RunSpec]
    """the trained SAEs"""
    overrides: list[str] = field(default_factory=list)
    """CLI overrides shared by all runs (data, seed, budget, trainer flags)"""
    ablations: dict[str, list[str]] = field(default_factory=dict)
    """named ordered subsets of runs, reported as separate tables"""
    description: str = ""
    """free text put at the top of the report"""


def _as_cli(value: Any, where: str) -> list[str]:
    """A mapping ``{key: value}`` or a list of CLI strings -> a list of CLI tokens."""
    if value is None:
        return []
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            key = str(k) if str(k).startswith("--") else f"--{k}"
            out.append(f"{key}={v if isinstance(v, str) else json.dumps(v)}")
        return out
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    raise ValueError(f"{where} must be a mapping key -> value or a list of CLI strings, got {value!r}")


def _cli_keys(tokens: list[str]) -> list[str]:
    """The dotted keys that a list of CLI tokens sets (``--a.b=1`` and ``--a.b 1`` -> ``a.b``)."""
    return [t[2:].split("=", 1)[0] for t in tokens if t.startswith("--")]


def _check_overlay(path: str, run: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"run {run!r}: overlay {path} does not exist")
    content = yaml.safe_load(p.read_text()) or {}
    extra = sorted(set(content) - {"model"})
    if extra:
        raise ValueError(
            f"run {run!r}: overlay {path} sets {extra}; a run may change only the model section so that all "
            "runs share data, seed and budget (put shared settings under 'overrides')"
        )


def load_compare_config(path: str | os.PathLike) -> CompareConfig:
    """Read and validate a compare config; raises ``ValueError`` with what to change."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a compare config is a YAML mapping (see `mtsae compare --help`)")
    unknown = sorted(set(raw) - {"name", "base", "runs", "overrides", "ablations", "description"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}")
    for key in ("name", "base", "runs"):
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r}")
    name = str(raw["name"])
    if not _NAME.match(name):
        raise ValueError(f"{path}: name {name!r} must match {_NAME.pattern}")
    if not Path(raw["base"]).is_file():
        raise ValueError(f"{path}: base config {raw['base']} does not exist (paths are relative to the cwd)")
    if not isinstance(raw["runs"], list) or not raw["runs"]:
        raise ValueError(f"{path}: 'runs' must be a non-empty list")
    runs: list[RunSpec] = []
    for i, r in enumerate(raw["runs"]):
        if not isinstance(r, dict) or "name" not in r:
            raise ValueError(f"{path}: runs[{i}] must be a mapping with a 'name'")
        bad = sorted(set(r) - {"name", "configs", "args"})
        if bad:
            raise ValueError(f"{path}: runs[{i}] has unknown key(s) {bad}; use name, configs, args")
        run = RunSpec(
            name=str(r["name"]),
            configs=[str(c) for c in (r.get("configs") or [])],
            args=_as_cli(r.get("args"), f"runs[{i}].args"),
        )
        if not _NAME.match(run.name):
            raise ValueError(f"{path}: run name {run.name!r} must match {_NAME.pattern}")
        for c in run.configs:
            _check_overlay(c, run.name)
        not_model = [k for k in _cli_keys(run.args) if not k.startswith("model.")]
        if not_model:
            raise ValueError(
                f"{path}: run {run.name!r} overrides {not_model}; a run may change only model.* "
                "(shared settings go under 'overrides')"
            )
        runs.append(run)
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate run names {dupes}")
    ablations = raw.get("ablations") or {}
    if not isinstance(ablations, dict):
        raise ValueError(f"{path}: 'ablations' must be a mapping name -> list of run names")
    for abl, members in ablations.items():
        missing = [m for m in members or [] if m not in names]
        if missing:
            raise ValueError(f"{path}: ablation {abl!r} names unknown run(s) {missing}")
    return CompareConfig(
        name=name,
        base=str(raw["base"]),
        runs=runs,
        overrides=_as_cli(raw.get("overrides"), "overrides"),
        ablations={str(k): list(v or []) for k, v in ablations.items()},
        description=str(raw.get("description") or ""),
    )


# ---------------------------------------------------------------------- training
def run_dir(out: Path, cfg: CompareConfig, run: RunSpec) -> Path:
    """The fixed folder of a run: ``<out>/<name>/runs/<run>/``."""
    return Path(out) / cfg.name / "runs" / run.name


def _spec(cfg: CompareConfig, run: RunSpec, extra: Sequence[str]) -> dict[str, Any]:
    """What decides a run's result; stored beside it to detect a changed specification."""
    return {
        "base": cfg.base,
        "overrides": [*cfg.overrides, *extra],
        "configs": run.configs,
        "args": run.args,
    }


def _checkpoint_dirs(base: str, rd: Path) -> list[str]:
    """If the base config pins a ``ModelCheckpoint`` ``dirpath`` (shared by every run), an override that
    moves it to ``<run dir>/checkpoints``; otherwise nothing (checkpoints go to the logger's folder)."""
    callbacks = ((yaml.safe_load(Path(base).read_text()) or {}).get("trainer") or {}).get("callbacks") or []
    moved = False
    for cb in callbacks:
        init = cb.get("init_args") if isinstance(cb, dict) else None
        if (
            "ModelCheckpoint" in str(cb.get("class_path", ""))
            and isinstance(init, dict)
            and init.get("dirpath")
        ):
            init["dirpath"] = str(rd / "checkpoints")
            moved = True
    return [f"--trainer.callbacks={json.dumps(callbacks)}"] if moved else []


def train_args(
    out: Path, cfg: CompareConfig, run: RunSpec, extra: Sequence[str] = (), ckpt_path: str | None = None
) -> list[str]:
    """The ``train.cli_main`` arguments of a run (``fit`` included)."""
    rd = run_dir(out, cfg, run)
    args = ["fit", "--config", cfg.base, *_checkpoint_dirs(cfg.base, rd), *cfg.overrides]
    for c in run.configs:
        args += ["--config", c]
    args += [
        *run.args,
        *extra,  # --set: forced on every run, after the run's own overlays
        "--trainer.default_root_dir",
        str(rd),
        "--trainer.logger.init_args.save_dir",
        str(rd.parent),
        "--trainer.logger.init_args.name",
        run.name,
        "--trainer.logger.init_args.version",
        "",  # no version_N sub-folder: the run folder is fixed
    ]
    if ckpt_path is not None:
        args += ["--ckpt_path", ckpt_path]
    return args


def train_run(out: Path, cfg: CompareConfig, run: RunSpec, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Train one run unless it has finished; returns its ``summary.json`` content.

    A run with ``summary.json`` is skipped (its recorded specification must match); an unfinished run with
    ``checkpoints/last.ckpt`` is resumed from it; otherwise its folder is cleared and it starts afresh.
    """
    from train import cli_main  # heavy import (Lightning, data): only when something is trained

    rd = run_dir(out, cfg, run)
    spec = _spec(cfg, run, extra)
    summary_path, spec_path = rd / "summary.json", rd / SPEC_FILE
    recorded = json.loads(spec_path.read_text()) if spec_path.exists() else None
    if recorded is not None and recorded.get("spec") != spec:
        if summary_path.exists():
            raise ValueError(
                f"run {run.name!r} in {rd} was trained with a different specification:\n"
                f"  recorded: {recorded.get('spec')}\n  now:      {spec}\n"
                "delete that folder to retrain it, or give the run another name"
            )
        log.info("run %s: unfinished with another specification, restarting", run.name)
        shutil.rmtree(rd)
        recorded = None
    if summary_path.exists():
        if recorded is not None and recorded.get("files") != _file_hashes(cfg, run):
            log.warning(
                "run %s: its config files changed since it was trained; delete %s to retrain", run.name, rd
            )
        log.info("run %s: finished, skipped (%s)", run.name, summary_path)
        return json.loads(summary_path.read_text())
    last = rd / "checkpoints" / "last.ckpt"
    ckpt = str(last) if last.exists() else None
    if ckpt is None and rd.exists():
        log.info("run %s: unfinished and no checkpoint, restarting", run.name)
        shutil.rmtree(rd)
    rd.mkdir(parents=True, exist_ok=True)
    record = {"spec": spec, "files": _file_hashes(cfg, run), "started": _now()}
    if spec_path.exists():
        record = {**json.loads(spec_path.read_text()), "resumed": _now()}
    spec_path.write_text(json.dumps(record, indent=1))
    args = train_args(out, cfg, run, extra, ckpt)
    log.info(
        "run %s: %s\n  python train.py %s", run.name, "resuming" if ckpt else "training", shlex.join(args)
    )
    t0 = time.perf_counter()
    cli = cli_main(args)
    if not summary_path.exists():
        raise RuntimeError(
            f"run {run.name!r} ended without {summary_path}: the base config's trainer.callbacks must include "
            "callbacks.RunSummary (and a logger with save_dir/name/version, e.g. TensorBoardLogger)"
        )
    summary = json.loads(summary_path.read_text())
    if "val/fvu" not in summary.get("final_val_metrics", {}):
        # resumed from a checkpoint taken at the very end: fit had nothing left to do, so validate once
        log.info("run %s: no final validation metrics, validating the restored model", run.name)
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        metrics = {
            k: float(v) for k, v in sorted(cli.trainer.callback_metrics.items()) if k.startswith("val/")
        }
        summary["final_val_metrics"] = metrics
        summary_path.write_text(json.dumps(summary, indent=1))
    wall = time.perf_counter() - t0
    record["wall_s"] = record.get("wall_s", 0.0) + wall
    record["finished"] = _now()
    spec_path.write_text(json.dumps(record, indent=1))
    return json.loads(summary_path.read_text())


def _file_hashes(cfg: CompareConfig, run: RunSpec) -> dict[str, str]:
    """Content hashes of the base config and the run's overlays (to notice edits after training)."""
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16] for p in [cfg.base, *run.configs]}


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------------- results
@dataclass
class RunResult:
    """A finished run as the report sees it."""

    name: str
    metrics: dict[str, float]
    hparams: dict[str, Any]
    global_step: int | None
    wall_s: float | None
    command: str


def _model_hparams(rd: Path) -> dict[str, Any]:
    """The run's resolved model section (from the config LightningCLI saved beside it)."""
    path = rd / "config.yaml"
    if not path.exists():
        return {}
    cfg = yaml.safe_load(path.read_text()) or {}
    return cfg.get("model") or {}


def collect_results(out: Path, cfg: CompareConfig, extra: Sequence[str] = ()) -> list[RunResult]:
    """The finished runs of a comparison, in config order (unfinished ones are left out)."""
    results = []
    for run in cfg.runs:
        rd = run_dir(out, cfg, run)
        if not (rd / "summary.json").exists():
            continue
        summary = json.loads((rd / "summary.json").read_text())
        record = json.loads((rd / SPEC_FILE).read_text()) if (rd / SPEC_FILE).exists() else {}
        results.append(
            RunResult(
                name=run.name,
                metrics={k: float(v) for k, v in summary.get("final_val_metrics", {}).items()},
                hparams=_model_hparams(rd),
                global_step=summary.get("global_step"),
                wall_s=record.get("wall_s"),
                command="python train.py " + shlex.join(train_args(out, cfg, run, extra)),
            )
        )
    return results


# ---------------------------------------------------------------------- report
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


def write_report(
    out: Path,
    cfg: CompareConfig,
    results: list[RunResult],
    command: str,
    config_path: str = "",
) -> Path:
    """Write ``<out>/<name>/report.md`` and its PNG figures; returns the report path."""
    root = Path(out) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    finished = {r.name for r in results}
    missing = [r.name for r in cfg.runs if r.name not in finished]
    lines = [f"# Comparison report: {cfg.name}", ""]
    if cfg.description:
        lines += [cfg.description.strip(), ""]
    info = machine_info()
    lines += [
        f"- date: {_now()}",
        f"- command: `{command}`",
        f"- compare config: `{config_path}`",
        f"- base training config: `{cfg.base}`; shared overrides: `{' '.join(cfg.overrides) or 'none'}`",
        "- machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"- runs finished: {len(results)}/{len(cfg.runs)}"
        + (f" (not finished: {', '.join(missing)})" if missing else ""),
        "",
        "All runs share the base config's data (same activation cache), seed and training budget; they differ",
        "only in the model section listed below. Metrics are the final validation metrics of each run",
        "(`summary.json`); bold marks the best value of a column (FVU and dead fraction: lowest).",
        "",
    ]
    if not results:
        lines += ["No run has finished yet.", ""]
        path = root / "report.md"
        path.write_text("\n".join(lines))
        return path

    lines += ["## Runs", "", "| run | model | steps | train time |", "|---|---|---|---|"]
    for r in results:
        t = f"{r.wall_s / 60:.1f} min" if r.wall_s else "—"
        lines.append(f"| {r.name} | {_describe_model(r.hparams)} | {r.global_step} | {t} |")
    lines += ["", "## Final validation metrics", ""]
    lines += _table(results, _headline_columns(results)) + [""]

    for abl, members in cfg.ablations.items():
        sub = [r for m in members for r in results if r.name == m]
        if sub:
            lines += [f"### Ablation: {abl}", ""]
            lines += _table(sub, _headline_columns(sub)) + [""]

    figures: list[tuple[str, str]] = []
    if _plot_frontier(results, root / "frontier.png"):
        figures.append(("L0 vs FVU frontier", "frontier.png"))
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
            figures.append(
                (f"Ground-truth recovery per timescale group ({', '.join(labels)})", "recovery.png")
            )

    # every metric, by section; sections other than reconstruction/recovery also get a bar chart
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
                figures.append((sec, fname))

    lines += ["## Figures", ""]
    for title, fname in figures:
        lines += [f"### {title}", "", f"![{title}]({fname})", ""]
    lines += ["## Commands", "", "Each run, as a single `train.py` call:", ""]
    for r in results:
        lines += [f"- {r.name}: `{r.command}`"]
    lines.append("")
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The ``mtsae compare`` argument parser."""
    p = argparse.ArgumentParser(
        prog="mtsae compare",
        description=__doc__.split("\n\n", 1)[0],
        epilog="Config schema: see the docstring of compare.py (python -c 'import compare; help(compare)').",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="compare config YAML (e.g. configs/compare/demo.yaml)")
    p.add_argument("--out", default="reports", help="root folder of reports (default: reports)")
    p.add_argument(
        "--only-report", action="store_true", help="train nothing; rebuild the report from finished runs"
    )
    p.add_argument(
        "--runs", nargs="+", metavar="RUN", help="train only these runs (the report shows all finished)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every run after its own overlays, e.g. --set data.cache_dir=/scratch/cache "
        "(repeatable; part of each run's recorded specification)",
    )
    p.add_argument("--dry-run", action="store_true", help="print each run's train.py command and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``mtsae compare``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not log.handlers:  # our messages only: Lightning prints its own
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s compare: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    cfg = load_compare_config(args.config)
    extra = []
    for s in args.set:
        if "=" not in s:
            raise SystemExit(f"--set expects KEY=VALUE, got {s!r}")
        extra.append(f"--{s.removeprefix('--')}")
    out = Path(args.out)
    selected = cfg.runs
    if args.runs:
        unknown = sorted(set(args.runs) - {r.name for r in cfg.runs})
        if unknown:
            raise SystemExit(f"--runs: unknown run(s) {unknown}; the config has {[r.name for r in cfg.runs]}")
        selected = [r for r in cfg.runs if r.name in args.runs]
    if args.dry_run:
        for run in selected:
            print(f"# {run.name}\npython train.py {shlex.join(train_args(out, cfg, run, extra))}")
        return 0
    if not args.only_report:
        for i, run in enumerate(selected, 1):
            log.info("[%d/%d] %s", i, len(selected), run.name)
            train_run(out, cfg, run, extra)
    results = collect_results(out, cfg, extra)
    if args.only_report and not results:
        raise SystemExit(f"--only-report: no finished run under {out / cfg.name / 'runs'}")
    command = "mtsae compare " + shlex.join(argv)
    path = write_report(out, cfg, results, command, args.config)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
