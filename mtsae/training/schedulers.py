"""Learning-rate schedules that can be chosen in YAML (``model.lr_scheduler.class_path``)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupDecayLR"]


class WarmupDecayLR(LambdaLR):
    """Linear warm-up from 0 over ``warmup_steps``, constant, then linear decay to 0 over the last
    ``decay_fraction`` of ``total_steps``.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: steps of linear warm-up.
        decay_fraction: final fraction of training with linear decay (0 disables it).
        total_steps: total optimizer steps; ``None`` lets ``SAEModule`` fill in the trainer's estimate.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        decay_fraction: float = 0.0,
        total_steps: int | None = None,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
        self.warmup_steps, self.decay_fraction, self.total_steps = warmup_steps, decay_fraction, total_steps
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        factor = 1.0
        if self.warmup_steps > 0:
            factor = min(1.0, (step + 1) / self.warmup_steps)
        if self.decay_fraction > 0 and self.total_steps:
            decay_start = self.total_steps * (1 - self.decay_fraction)
            if step >= decay_start:
                factor *= max(0.0, (self.total_steps - step) / (self.total_steps - decay_start))
        return factor

    def state_dict(self) -> dict:
        # total_steps is derived from the current run (a resumed run may train longer): never restored
        state = super().state_dict()
        state.pop("total_steps", None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        state_dict.pop("total_steps", None)
        super().load_state_dict(state_dict)
