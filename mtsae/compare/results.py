"""Finished runs of a comparison, as the report reads them (``summary.json``, config, curves, wall time)."""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtsae.compare.config import CompareConfig, RunSpec
from mtsae.compare.curves import read_curves, tokens_per_step
from mtsae.compare.runner import SPEC_FILE, run_dir, train_args
from mtsae.evals.unlearning.report import logged_metrics

__all__ = ["RunResult", "collect_results", "timescale_groups"]


@dataclass
class RunResult:
    """A finished run as the report sees it."""

    name: str
    spec: RunSpec
    metrics: dict[str, float]
    """final validation metrics (``summary.json``; the last logged values where it has none)"""
    hparams: dict[str, Any]
    global_step: int | None
    wall_s: float | None
    command: str
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """validation curves ``metric -> [(step, value)]``"""
    tokens_per_step: int | None = None
    max_steps: int | None = None
    """the step cap of the run's trainer (``None``: none)"""
    stopping: dict[str, Any] | None = None
    """the run's ``callbacks.PlateauStopping`` record (``None``: the run had none)"""


def _saved_config(rd: Path) -> dict[str, Any]:
    """The run's resolved config (LightningCLI saves it beside the run)."""
    path = rd / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _unlearning_record(rd: Path, global_step: int | None) -> dict[str, Any] | None:
    """The run's unlearning record of its last step (``<run>/unlearning/step<global_step>.json``; with no
    known step, the highest-numbered one); ``None``: there is none. An earlier evaluation's record never
    stands in for a failed or missing final one."""
    folder = rd / "unlearning"
    if global_step is not None:
        path = folder / f"step{global_step}.json"
        return json.loads(path.read_text()) if path.exists() else None
    steps = {
        int(m.group(1)): p
        for p in folder.glob("step*.json")
        if (m := re.fullmatch(r"step(\d+)\.json", p.name))
    }
    return json.loads(steps[max(steps)].read_text()) if steps else None


def collect_results(
    out: Path, cfg: CompareConfig, extra: Sequence[str] = (), runs: Sequence[RunSpec] | None = None
) -> list[RunResult]:
    """The finished runs of a comparison, in config order (unfinished ones are left out).

    A run resumed from a checkpoint taken at its very end has no final validation metrics in its
    ``summary.json`` (fit had nothing left to do); its metrics are then the last values of its curves.
    """
    results = []
    for run in cfg.runs if runs is None else runs:
        rd = run_dir(out, cfg, run)
        if not (rd / "summary.json").exists():
            continue
        summary = json.loads((rd / "summary.json").read_text())
        record = json.loads((rd / SPEC_FILE).read_text()) if (rd / SPEC_FILE).exists() else {}
        curves = read_curves(rd)
        metrics = {k: float(v) for k, v in summary.get("final_val_metrics", {}).items()}
        if "val/fvu" not in metrics:
            metrics = {k: c[-1][1] for k, c in curves.items() if c} | metrics
        # the unlearning record holds every value the callback logs from it, also ones added after the
        # run finished (e.g. val/unlearning/text_selectivity_max); the logged values take precedence
        unlearning = _unlearning_record(rd, summary.get("global_step"))
        if unlearning is not None:
            metrics = logged_metrics(unlearning) | metrics
        metrics = {k: v for k, v in metrics.items() if not math.isinf(v)}
        saved = _saved_config(rd)
        max_steps = (saved.get("trainer") or {}).get("max_steps")
        results.append(
            RunResult(
                name=run.name,
                spec=run,
                metrics=metrics,
                hparams=saved.get("model") or {},
                global_step=summary.get("global_step"),
                wall_s=record.get("wall_s"),
                command="python train.py " + shlex.join(train_args(out, cfg, run, extra)),
                curves=curves,
                tokens_per_step=tokens_per_step(rd),
                max_steps=max_steps if isinstance(max_steps, int) and max_steps > 0 else None,
                stopping=summary.get("stopping"),
            )
        )
    return results


def timescale_groups(results: list[RunResult]) -> list[str]:
    """The ground-truth groups the runs logged recovery for (``val/recovered/<group>``), in order."""
    groups: list[str] = []
    for r in results:
        for k in r.metrics:
            m = re.match(r"^val/recovered/(.+)$", k)
            if m and m.group(1) not in groups:
                groups.append(m.group(1))
    return groups
