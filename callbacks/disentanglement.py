"""Feature disentanglement during validation: scalars under ``val/disentanglement/...`` and figures."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from callbacks.periodic import EveryNValidations
from mtsae.evals.disentanglement import (
    DisentanglementAccumulator,
    DisentanglementConfig,
    disentanglement_results,
)
from mtsae.evals.disentanglement_figures import figures
from mtsae.evals.ground_truth import GroundTruth

__all__ = ["Disentanglement"]

PREFIX = "val/disentanglement/"
#: scalars of :func:`mtsae.evals.disentanglement.disentanglement_results` that are not logged here
RECOVERY = "recovery/"


class Disentanglement(EveryNValidations):
    """Every ``every_n_val``-th validation, measure how disentangled the SAE's features are.

    During validation the codes of the first ``max_batches`` validation batches of each rank are
    recomputed (``pl_module.sae(*pl_module._inputs(batch)).f``, the training's mask) and accumulated; at the end the
    counts are summed across ranks (``trainer.strategy.reduce``), and every rank computes the same
    results (see :mod:`mtsae.evals.disentanglement` for the definitions). The sanity check is skipped.

    Logged scalars (``val/disentanglement/`` + name; the names of
    :func:`mtsae.evals.disentanglement.disentanglement_results`):

    * ``coherence/max``, ``coherence/mean``, ``coherence/frac_above`` (``|cos| > coherence_threshold``);
    * ``density/dead_fraction``, ``density/dense_fraction`` (``> dense_threshold``),
      ``density/median_log10``, ``density/mean_log10``;
    * MTSAE only: ``scale/share/dilation_<r>``, ``scale/majority/dilation_<r>``, ``scale/entropy``;
    * ``persistence/lag_<k>`` for each lag;
    Ground-truth recovery (MMCS, recovered fraction) is logged once, by ``callbacks.GroundTruthRecovery``
    as ``val/mmcs`` and ``val/recovered`` (per group ``val/mmcs/<group>``): this callback does not log its
    own copy (``mtsae eval disentanglement`` still writes it to ``results.json``).

    Undefined values (``nan``: a lag longer than the sequences, no live feature) are not logged.

    Figures (TensorBoard logger only, rank 0): ``disentanglement/density``,
    ``disentanglement/scale_attribution``, ``disentanglement/persistence``, ``disentanglement/recovery``.

    Args:
        config: the settings (:class:`mtsae.evals.disentanglement.DisentanglementConfig`: ``max_batches``,
            ``lags``, ``coherence_threshold``, ``dense_threshold``); YAML ``init_args: {config: {max_batches: 16}}``.
        every_n_val: run on every n-th validation (1: each one).
        log_figures: also log matplotlib figures to TensorBoard.
    """

    def __init__(
        self, config: DisentanglementConfig | None = None, every_n_val: int = 1, log_figures: bool = True
    ) -> None:
        super().__init__(every_n_val)
        self.config = config if config is not None else DisentanglementConfig()
        self.log_figures = log_figures
        self._acc: DisentanglementAccumulator | None = None
        self._truth: GroundTruth | None = None
        self._truth_read = False

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._acc = None
        if self.is_due(trainer):
            self._acc = DisentanglementAccumulator(
                pl_module.sae.d_sae, self.config.lags, device=pl_module.device
            )

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._acc is None or (
            self.config.max_batches is not None and batch_idx >= self.config.max_batches
        ):
            return
        with torch.no_grad():
            x, valid = pl_module._inputs(batch)  # the training's mask (activation sinks included)
            f = pl_module.sae(x, valid).f  # [B, T, d_sae]
        self._acc.update(f, valid)

    def _ground_truth(self, trainer: L.Trainer) -> GroundTruth | None:
        if not self._truth_read:
            self._truth = getattr(trainer.datamodule, "ground_truth", None)
            self._truth_read = True
        return self._truth

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        acc, self._acc = self._acc, None
        if not self.count_validation(trainer) or acc is None:
            return
        for t in acc.state_tensors():  # sum counts over ranks; every rank then holds the same totals
            t.copy_(trainer.strategy.reduce(t, reduce_op="sum"))
        if int(acc.density.n_tokens) == 0:
            return
        res = disentanglement_results(
            pl_module.sae,
            acc,
            self._ground_truth(trainer),  # for the recovery figure; its scalars are not logged here
            self.config,
        )
        # identical on every rank (reduced counts, synchronised parameters): no further sync
        scalars = {
            PREFIX + k: float(v)
            for k, v in res["scalars"].items()
            if not math.isnan(v) and not k.startswith(RECOVERY)  # val/mmcs: GroundTruthRecovery's
        }
        pl_module.log_dict(scalars, sync_dist=False)
        logger = trainer.logger
        if self.log_figures and trainer.is_global_zero and isinstance(logger, TensorBoardLogger):
            for name, fig in figures(res).items():
                logger.experiment.add_figure(f"disentanglement/{name}", fig, trainer.global_step, close=True)
