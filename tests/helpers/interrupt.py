"""Test-only callback: interrupts a run at a chosen point, as a crash or SIGTERM would (for resume tests)."""

from __future__ import annotations

import lightning as L


class Crash(RuntimeError):
    """Raised by :class:`Interrupt` (stands for ``kill -9``: no checkpoint is written for it)."""


class Interrupt(L.Callback):
    """Stops training at the start of epoch ``crash_at_epoch`` (a :class:`Crash`), or flags SIGTERM during
    the validation that runs at step ``sigterm_in_validation_at`` (the trainer then stops as after a real
    SIGTERM: ``callbacks.ModelCheckpoint`` saves ``last.ckpt`` and ``SIGTERMException`` is raised)."""

    def __init__(
        self, crash_at_epoch: int | None = None, sigterm_in_validation_at: int | None = None
    ) -> None:
        self.crash_at_epoch, self.sigterm_at = crash_at_epoch, sigterm_in_validation_at

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.crash_at_epoch:
            raise Crash(f"interrupted at the start of epoch {trainer.current_epoch}")

    def on_validation_batch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if not trainer.sanity_checking and trainer.global_step == self.sigterm_at:
            trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets
