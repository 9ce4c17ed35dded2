"""Validation curves of a run, read back from its TensorBoard event files.

Each curve is ``[(step, value), ...]`` in step order; when a resumed run logged a step twice, the last
value wins. Training tokens seen at a step are ``step × batch_size × devices × valid tokens per row``
(``ctx_len − 1``: position 0 is a BOS-like, invalid token), read from the ``config.yaml`` that LightningCLI
saved beside the run; when those are not there the curves stay in steps.
"""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["read_curves", "tokens_per_step", "CURVE_PREFIX"]

CURVE_PREFIX = "val/"


def read_curves(rd: Path, prefix: str = CURVE_PREFIX) -> dict[str, list[tuple[int, float]]]:
    """Every scalar whose name starts with ``prefix`` logged under ``rd`` (event files found recursively)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(rd).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    merged: dict[str, dict[int, float]] = {}
    for path in files:  # in writing order: a resumed run's later file overrides repeated steps
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith(prefix):
                curve = merged.setdefault(tag, {})
                for event in acc.Scalars(tag):
                    curve[int(event.step)] = float(event.value)
    return {tag: sorted(points.items()) for tag, points in sorted(merged.items())}


def tokens_per_step(rd: Path) -> int | None:
    """Valid training tokens per optimizer step, from the run's saved ``config.yaml`` (``None``: unknown)."""
    path = Path(rd) / "config.yaml"
    if not path.exists():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    data = cfg.get("data") or {}
    src = (data.get("source") or {}).get("init_args") or {}
    batch, ctx = data.get("batch_size"), src.get("ctx_len")
    devices = (cfg.get("trainer") or {}).get("devices", 1)
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    accumulate = (cfg.get("trainer") or {}).get("accumulate_grad_batches") or 1
    if not isinstance(batch, int) or not isinstance(ctx, int):
        return None
    return batch * devices * int(accumulate) * (ctx - 1)
