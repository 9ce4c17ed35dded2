"""SAEBench's core LM metrics during validation: CE-loss and KL scores with the SAE spliced into the LM."""

from __future__ import annotations

import weakref
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from callbacks.periodic import EveryNValidations
from mtsae.evals.core import (
    CORE_SUM_KEYS,
    CoreConfig,
    core_lm_metrics,
    finalize_core_metrics,
    validation_tokens,
)
from mtsae.lm.loading import load_causal_lm

__all__ = ["CoreLMMetrics", "is_lm_source", "shared_lm"]

# models held by callbacks, shared when two callbacks ask for the same one (freed with their holders)
_LMS: weakref.WeakValueDictionary[tuple, nn.Module] = weakref.WeakValueDictionary()


def shared_lm(
    name: str,
    revision: str | None,
    dtype: str,
    device: torch.device | str,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a causal LM once per ``(name, revision, dtype, device)`` for all callbacks that hold it."""
    key = (name, revision, dtype, str(torch.device(device)), trust_remote_code)
    model = _LMS.get(key)
    if model is None:
        model = load_causal_lm(name, revision, dtype, device, trust_remote_code)
        _LMS[key] = model
    return model


def is_lm_source(source: Any) -> bool:
    """True for a language-model activation source (``data.LMSource``: ``model_name``, ``layer``)."""
    return (
        getattr(source, "kind", None) == "lm" and hasattr(source, "model_name") and hasattr(source, "layer")
    )


class CoreLMMetrics(EveryNValidations):
    """CE-loss score and KL score (SAEBench core) on held-out validation sequences.

    Every ``every_n_val`` validations (the sanity check excluded), the first ``n_sequences`` rows of the
    validation split of the activation cache (their ``tokens``) are run through the data source's LM
    three times: clean, with the SAE reconstruction spliced into layer ``L``, and with that layer's
    output zeroed (special tokens keep their activation and are not averaged; see
    :mod:`mtsae.evals.core`). The LM is loaded lazily, once, on the module's device (the source frees
    its own model after caching). Logs ``val/ce_loss_score``, ``val/kl_div_score``,
    ``val/ce_loss_clean``, ``val/ce_loss_sae``, ``val/ce_loss_zero``, ``val/kl_div_sae`` and
    ``val/kl_div_zero``.

    Under DDP each rank evaluates its share of the rows and the sums are added across ranks
    (``trainer.strategy.reduce``) before the scores are computed. With a non-LM source (synthetic) it
    warns once and does nothing.

    Args:
        config: the settings (:class:`mtsae.evals.core.CoreConfig`: ``n_sequences``, ``batch_size``,
            ``model_dtype``); YAML ``init_args: {config: {n_sequences: 256}}``.
        every_n_val: evaluate on every n-th validation.
    """

    def __init__(self, config: CoreConfig | None = None, every_n_val: int = 1) -> None:
        super().__init__(every_n_val)
        self.config = config if config is not None else CoreConfig()
        self._model: nn.Module | None = None
        self._tokens: Tensor | None = None  # [n_rank, T] this rank's rows
        self._warned = False

    # ------------------------------------------------------------------ helpers
    def _rows(self, trainer: L.Trainer) -> Tensor:
        if self._tokens is None:
            dm = trainer.datamodule
            if dm.cache is None:
                dm.setup("validate")
            self._tokens = validation_tokens(
                dm.cache, self.config.n_sequences, trainer.global_rank, trainer.world_size
            )
        return self._tokens

    def _lm(self, source: Any, device: torch.device) -> nn.Module:
        if self._model is None:
            dtype = self.config.model_dtype or source.model_dtype
            trust = getattr(source, "trust_remote_code", False)
            self._model = shared_lm(source.model_name, source.revision, dtype, device, trust)
        return self._model

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # an unreachable model must fail now, not at the first validation hours into training
        source = getattr(trainer.datamodule, "source", None)
        if stage == "fit" and is_lm_source(source):
            source.check()

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.count_validation(trainer):
            return
        source = getattr(trainer.datamodule, "source", None)
        if not is_lm_source(source):
            if not self._warned:
                rank_zero_warn("CoreLMMetrics: the data source is not a language model; nothing is logged")
                self._warned = True
            return
        tokens = self._rows(trainer)
        model = self._lm(source, pl_module.device)
        was_training = pl_module.sae.training
        pl_module.sae.eval()
        try:
            sums = core_lm_metrics(
                model,
                pl_module.raw_sae,
                source.layer,
                tokens,
                None,
                source.special_ids,
                self.config.batch_size,
            )
        finally:
            pl_module.sae.train(was_training)
        # every rank evaluated its own rows: add the sums across ranks (identity on one device)
        sums = {
            k: trainer.strategy.reduce(sums[k].to(pl_module.device), reduce_op="sum") for k in CORE_SUM_KEYS
        }
        metrics = finalize_core_metrics({k: v.cpu() for k, v in sums.items()})
        metrics.pop("n_tokens")
        # identical on every rank after the reduction
        pl_module.log_dict({f"val/{k}": float(v) for k, v in metrics.items()}, sync_dist=False)
