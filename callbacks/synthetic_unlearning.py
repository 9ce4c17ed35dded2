"""Synthetic unlearning during validation: ``val/synthetic_unlearning/{score,forget_removed,retain_damage}``."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from callbacks.periodic import EveryNValidations
from mtsae.evals.synthetic_unlearning import (
    SyntheticGrid,
    forget_feature_indices,
    split_forget_retain,
    synthetic_unlearning,
)

__all__ = ["SyntheticUnlearning"]

PREFIX = "val/synthetic_unlearning/"


class SyntheticUnlearning(EveryNValidations):
    """Every ``every_n_val``-th validation, score how well the SAE unlearns a group of planted features.

    The forget set is the first ``n_forget_features`` true features of ground-truth group ``group``;
    the first ``max_sequences`` validation sequences of the cache are split into forget / retain
    sequences and the SAEBench selection + clamp grid is run on them (definitions and score in
    :mod:`mtsae.evals.synthetic_unlearning`). Every rank computes the same result from the same sequences, so
    nothing is synchronised. Logs ``val/synthetic_unlearning/score``, ``.../forget_removed`` and
    ``.../retain_damage`` (those of the best grid point). Does nothing (one warning) when the data has no
    ground truth; fails at set-up if the forget set leaves no forget or no retain sequence.

    Args:
        group: ground-truth group to forget.
        n_forget_features: how many of its features (the first ones); ``None``: the whole group.
        max_sequences: validation sequences used (selection and scoring).
        every_n_val: run on every n-th validation.
        retain_thresholds: grid of retain-sparsity thresholds.
        n_features: grid of numbers of clamped SAE features.
        multipliers: grid of clamp values ``-m`` (raw activation units).
    """

    def __init__(
        self,
        group: str = "slow",
        n_forget_features: int | None = 4,
        max_sequences: int = 512,
        every_n_val: int = 1,
        retain_thresholds: list[float] | None = None,
        n_features: list[int] | None = None,
        multipliers: list[float] | None = None,
    ) -> None:
        if max_sequences < 2:
            raise ValueError(f"max_sequences must be >= 2 (forget and retain), got {max_sequences}")
        default = SyntheticGrid()
        self.grid = SyntheticGrid(
            retain_thresholds=retain_thresholds or default.retain_thresholds,
            n_features=n_features or default.n_features,
            multipliers=multipliers if multipliers is not None else default.multipliers,
        )
        self.group, self.n_forget_features = group, n_forget_features
        super().__init__(every_n_val)
        self.max_sequences = max_sequences
        self.last_results: dict[str, Any] | None = None
        self._data: dict[str, Any] | None = None

    def _load(self, trainer: L.Trainer) -> dict[str, Any]:
        """Validation sequences, their true coefficients and the forget set (``{}``: no ground truth)."""
        if self._data is not None:
            return self._data
        dm = trainer.datamodule
        cache = getattr(dm, "cache", None)
        truth = getattr(dm, "ground_truth", None) if cache is not None else None
        rows = cache.rows("val")[: self.max_sequences] if cache is not None else np.zeros(0)
        if truth is None or truth.group_index is None or not len(rows):
            rank_zero_warn("SyntheticUnlearning: the data has no ground truth; nothing will be logged")
            self._data = {}
            return self._data
        try:
            coef = cache.ground_truth_rows("coefficients", rows)  # [N, T, n_true]
        except KeyError:
            rank_zero_warn(
                "SyntheticUnlearning: no per-token ground-truth coefficients; nothing will be logged"
            )
            self._data = {}
            return self._data
        batch = cache.read(rows)
        forget = forget_feature_indices(truth, self.group, self.n_forget_features)
        data = {
            "acts": batch["acts"].float(),  # [N, T, d_in]
            "valid": batch["valid"].bool(),  # [N, T]
            "coefficients": torch.as_tensor(np.asarray(coef, dtype=np.float32)),
            "features": truth.features,  # [n_true, d_in]
            "forget": forget,
        }
        is_forget = split_forget_retain(data["coefficients"], data["valid"], forget)
        n_f, n_r = int(is_forget.sum()), int((~is_forget).sum())
        if n_f == 0 or n_r == 0:
            raise ValueError(
                f"SyntheticUnlearning: forgetting {forget.numel()} features of group {self.group!r} leaves "
                f"{n_f} forget and {n_r} retain sequences among {len(rows)}; change n_forget_features "
                "(fewer features leave more retain sequences) or max_sequences"
            )
        self._data = data
        return data

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage in ("fit", "validate"):
            self._load(trainer)  # fail before training if the forget set cannot work

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.count_validation(trainer):
            return
        data = self._load(trainer)
        if not data:
            return
        res = synthetic_unlearning(
            pl_module.raw_sae,
            data["acts"],
            data["valid"],
            data["coefficients"],
            data["features"],
            data["forget"],
            self.grid,
        )
        self.last_results = res
        logs = {k: float(res[k]) for k in ("score", "forget_removed", "retain_damage")}
        pl_module.log_dict({PREFIX + k: v for k, v in logs.items()}, sync_dist=False)
