"""Test-only callback: records a fingerprint of every training batch (for resume tests)."""

from __future__ import annotations

import json

import lightning as L


class BatchProbe(L.Callback):
    """Appends ``[global_step, sum of the batch's activations]`` per training step to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps([trainer.global_step, round(float(batch["acts"].double().sum()), 6)]) + "\n")
