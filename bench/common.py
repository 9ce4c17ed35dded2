"""Shared pieces of the benchmarks: device choice, interleaved median timing and the table of ratios.

Every benchmark module has ``run(cfg: BenchConfig) -> list[Row]``; ``bench/run_all.py`` runs them in
one process and prints one table. On a shared machine only ratios of things timed side by side
(interleaved repeats, medians) mean anything; absolute times are printed for reference.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

__all__ = ["BenchConfig", "Row", "interleaved", "print_table", "markdown_table", "machine", "autocast"]


@dataclass
class BenchConfig:
    """What every benchmark is told."""

    device: torch.device
    """``cpu`` or ``cuda``"""
    dtype: torch.dtype
    """compute dtype of the SAE step: float32 on CPU, bfloat16 (autocast, fp32 weights) on CUDA"""
    quick: bool
    """smaller sizes and fewer repeats (a smoke run of every row)"""
    repeats: int
    """timed repeats per measurement (medians are reported)"""
    workdir: Path
    """scratch folder (caches written by the loader benchmarks)"""


class Row(NamedTuple):
    """One line of the results table."""

    name: str
    value: float | None
    """the measured ratio (``None``: skipped)"""
    target: str = ""
    """``">= 0.5"``, ``"<= 1.03"`` or empty (reported, no target)"""
    note: str = ""
    """sizes, absolute times, or why a row was skipped"""

    @property
    def status(self) -> str:
        if self.value is None:
            return "skipped"
        if not self.target:
            return ""
        op, bound = self.target.split()
        ok = self.value >= float(bound) if op == ">=" else self.value <= float(bound)
        return "met" if ok else "NOT MET"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(cfg: BenchConfig) -> contextlib.AbstractContextManager:
    """bf16-mixed as Lightning does it (fp32 weights, matmuls in bf16); nothing for float32."""
    if cfg.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(cfg.device.type, dtype=cfg.dtype)


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each function, timed round-robin (order alternating) after ``warmup`` rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for rnd in range(warmup + repeats):
        for name in order if rnd % 2 == 0 else order[::-1]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            if rnd >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def stage(title: str) -> Iterator[None]:
    t0 = time.perf_counter()
    print(f"\n=== {title}", flush=True)
    yield
    print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)


def machine(cfg: BenchConfig) -> str:
    if cfg.device.type == "cuda":
        where = torch.cuda.get_device_name()
    else:
        cpu = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        where = f"{cpu}, {torch.get_num_threads()} torch thread(s)"
    return f"{where}; torch {torch.__version__}; {cfg.dtype}".replace("torch.", "")


def print_table(rows: list[Row]) -> None:
    w = max(len(r.name) for r in rows)
    print(f"\n{'measurement':<{w}}  {'ratio':>8}  {'target':>8}  {'status':<8}  note")
    for r in rows:
        v = "-" if r.value is None else f"{r.value:8.4g}"
        print(f"{r.name:<{w}}  {v:>8}  {r.target:>8}  {r.status:<8}  {r.note}")


def markdown_table(rows: list[Row]) -> str:
    out = ["| measurement | ratio | target | status | note |", "|---|---:|---|---|---|"]
    for r in rows:
        v = "–" if r.value is None else f"{r.value:.4g}"
        out.append(f"| {r.name} | {v} | {r.target} | {r.status} | {r.note} |")
    return "\n".join(out)
