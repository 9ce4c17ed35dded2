"""Stop training when every monitored validation metric has plateaued.

Lightning's ``EarlyStopping`` watches one metric. What a comparison claims about a run is often not the
metric that flattens first: on the synthetic presets the FVU is flat long before the slow features are
recovered. :class:`PlateauStopping` watches several metrics, each with its own tolerance, and stops only
when *none* of them has improved by its tolerance for ``patience`` validations in a row, so a run trains
until everything the report reads off it has stopped moving (or until ``max_steps``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

__all__ = ["Monitor", "PlateauStopping"]


@dataclass
class Monitor:
    """One watched metric: ``mode`` ``min``/``max``; an improvement must beat the best by ``min_delta``
    (``relative``: by ``min_delta × |best|``)."""

    mode: str = "min"
    min_delta: float = 0.0
    relative: bool = False
    best: float | None = None
    wait: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if not self.min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")

    def update(self, value: float) -> bool:
        """Record one validation value; returns whether it improved on the best by the tolerance."""
        if math.isnan(value):
            self.wait += 1
            return False
        if self.best is None:
            self.best, self.wait = value, 0
            return True
        delta = self.min_delta * abs(self.best) if self.relative else self.min_delta
        gain = value - self.best if self.mode == "max" else self.best - value
        if gain > delta:
            self.best, self.wait = value, 0
            return True
        self.wait += 1
        return False


class PlateauStopping(L.Callback):
    """Stop when no monitored metric has improved by its tolerance for ``patience`` validations.

    Args:
        monitors: metric name -> ``{mode, min_delta, relative}`` (see :class:`Monitor`), e.g.
            ``{"val/loss": {"mode": "min", "min_delta": 0.002, "relative": true},
            "val/recovered/slow": {"mode": "max", "min_delta": 0.02}}``.
        patience: validations in a row without an improvement of *any* monitored metric before stopping.
        min_steps: never stop before this optimizer step.

    A monitored metric that is not logged at a validation is an error naming the metrics that are. The
    state (best values, waits, the stop step) is saved in checkpoints, so a resumed run stops where an
    uninterrupted one would. After fit, :meth:`summary` says whether and when the run plateaued
    (``callbacks.RunSummary`` writes it to ``summary.json``).
    """

    def __init__(
        self, monitors: Mapping[str, Mapping[str, Any]], patience: int = 5, min_steps: int = 0
    ) -> None:
        if not monitors:
            raise ValueError("PlateauStopping needs at least one metric in monitors")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.monitors: dict[str, Monitor] = {}
        for name, spec in monitors.items():
            unknown = set(spec) - {"mode", "min_delta", "relative"}
            if unknown:
                raise ValueError(
                    f"PlateauStopping monitor {name!r}: unknown keys {sorted(unknown)} "
                    "(allowed: mode, min_delta, relative)"
                )
            try:
                self.monitors[name] = Monitor(**dict(spec))
            except ValueError as e:
                raise ValueError(f"PlateauStopping monitor {name!r}: {e}") from None
        self.patience, self.min_steps = int(patience), int(min_steps)
        self.stopped_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitors=sorted(self.monitors), patience=self.patience)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.stopped_step is not None:
            return
        logged = trainer.callback_metrics
        missing = [m for m in self.monitors if m not in logged]
        if missing:
            raise ValueError(
                f"PlateauStopping monitors {missing}, which were not logged at this validation; logged: "
                f"{sorted(k for k in logged if k.startswith('val/'))}"
            )
        for name, mon in self.monitors.items():
            mon.update(float(logged[name]))
        plateaued = all(m.wait >= self.patience for m in self.monitors.values())
        plateaued = plateaued and trainer.global_step >= self.min_steps
        # every rank sees the same synced metrics; agree anyway so that no rank trains on alone
        plateaued = trainer.strategy.reduce_boolean_decision(plateaued, all=False)
        if plateaued:
            self.stopped_step = trainer.global_step
            trainer.should_stop = True
            rank_zero_info(
                f"PlateauStopping: no monitored metric ({', '.join(self.monitors)}) improved for "
                f"{self.patience} validations; stopping at step {trainer.global_step}"
            )

    def summary(self) -> dict[str, Any]:
        """Whether the run plateaued, at which step, and each monitor's best value and wait."""
        return {"plateaued": self.stopped_step is not None, "patience": self.patience, **self.state_dict()}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "stopped_step": self.stopped_step,
            "monitors": {k: asdict(m) for k, m in self.monitors.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stopped_step = state_dict.get("stopped_step")
        for name, saved in (state_dict.get("monitors") or {}).items():
            if name in self.monitors:
                mon = self.monitors[name]
                mon.best, mon.wait = saved.get("best"), int(saved.get("wait", 0))
