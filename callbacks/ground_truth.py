"""Ground-truth feature recovery on synthetic data: ``val/mmcs`` and ``val/recovered`` per group."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from mtsae.evals.ground_truth import GroundTruth
from mtsae.training.metrics import RECOVERY_THRESHOLD

__all__ = ["GroundTruthRecovery"]


class GroundTruthRecovery(L.Callback):
    """After each validation, compare decoder rows with the true feature directions of the source.

    Logs ``val/mmcs`` (mean over true features of the max cosine with any decoder row) and
    ``val/recovered`` (fraction with max cosine > ``threshold``), overall and as
    ``val/mmcs/<group>``, ``val/recovered/<group>`` per timescale group. Does nothing (with one
    warning) when the data has no ground truth.

    Args:
        threshold: cosine above which a true feature counts as recovered.
    """

    def __init__(self, threshold: float = RECOVERY_THRESHOLD) -> None:
        self.threshold = threshold
        self._truth: GroundTruth | None = None
        self._loaded = False

    def _load(self, trainer: L.Trainer) -> GroundTruth | None:
        if not self._loaded:
            self._truth = getattr(trainer.datamodule, "ground_truth", None)
            self._loaded = True
            if self._truth is None:
                rank_zero_warn("GroundTruthRecovery: the data has no ground truth; nothing will be logged")
        return self._truth

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        truth = self._load(trainer)
        if truth is None:
            return
        res = truth.recovery(pl_module.sae.W_dec, self.threshold)
        # identical on every rank (parameters are in sync), so no cross-rank reduction is needed
        pl_module.log_dict({f"val/{k}": v for k, v in res.items()}, sync_dist=False)
