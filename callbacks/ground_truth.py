"""Ground-truth feature recovery on synthetic data: ``val/mmcs`` and ``val/recovered`` per group."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from mtsae.training.metrics import RECOVERY_THRESHOLD, ground_truth_recovery

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
        self._truth: dict | None = None

    def _load(self, trainer: L.Trainer) -> dict:
        if self._truth is None:
            gt = getattr(trainer.datamodule, "ground_truth", {}) or {}
            if "features" not in gt:
                rank_zero_warn("GroundTruthRecovery: the data has no ground truth; nothing will be logged")
                self._truth = {}
            else:
                self._truth = {
                    "features": torch.as_tensor(gt["features"]),
                    "group_index": torch.as_tensor(gt.get("group_index")) if "group_index" in gt else None,
                    "group_names": [
                        n.decode() if isinstance(n, bytes) else str(n) for n in gt.get("group_names", [])
                    ],
                }
        return self._truth

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        truth = self._load(trainer)
        if not truth:
            return
        res = ground_truth_recovery(
            truth["features"],
            pl_module.sae.W_dec,
            truth["group_index"],
            truth["group_names"] or None,
            self.threshold,
        )
        # identical on every rank (parameters are in sync), so no cross-rank reduction is needed
        pl_module.log_dict({f"val/{k}": v for k, v in res.items()}, sync_dist=False)
