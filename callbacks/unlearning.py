"""SAEBench's unlearning evaluation (WMDP-bio forget, MMLU retain) as a Lightning callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from callbacks.core_metrics import is_lm_source, shared_lm
from callbacks.export import run_dir
from callbacks.periodic import EveryNValidations
from mtsae.evals.unlearning.mcq import MCQuestion
from mtsae.evals.unlearning.pipeline import (
    UnlearningData,
    UnlearningDuringTraining,
    evaluate_unlearning,
    filter_questions,
    load_unlearning_data,
    save_results,
)
from mtsae.lm.loading import load_tokenizer

__all__ = ["Unlearning", "LOGGED_METRICS"]

#: metric name -> key of the results of :func:`mtsae.evals.unlearning.pipeline.evaluate_unlearning`
LOGGED_METRICS = {
    "val/unlearning_score": "unlearning_score",
    "val/unlearning/wmdp_acc_best": "wmdp_acc_best",
    "val/unlearning/mmlu_acc_best": "mmlu_acc_best",
}
#: logged beside them when held-out text is configured and a grid point is best (the text selectivity)
OPTIONAL_METRICS = {"val/unlearning/text_selectivity_best": "text_selectivity_best"}


class Unlearning(EveryNValidations):
    """Unlearning score of the SAE being trained (SAEBench; see :mod:`mtsae.evals.unlearning.pipeline`).

    It is expensive (two corpora through the LM, then every grid point scores every question), so by
    default (``every_n_val: 0``) it runs **once, when training ends** (``on_train_end``, while the model
    is still on its device); ``every_n_val: n`` also runs it on every n-th validation. Defaults are the
    cheap setting for use during training: questions filtered on their original order only
    (``all_perms: false``) and at most ``max_questions`` per set; ``mtsae eval unlearning`` runs the full
    SAEBench setting.

    Logs ``val/unlearning_score``, ``val/unlearning/wmdp_acc_best`` and ``val/unlearning/mmlu_acc_best``
    (of the best grid point; with none keeping MMLU accuracy, those of the unmodified model), with held-out
    text also ``val/unlearning/text_selectivity_best``, and writes
    every grid point (features, accuracies) to ``<run dir>/unlearning/step<global_step>.json``.

    The evaluation runs on global rank 0 (the others wait) and its summary is broadcast, so every rank
    logs the same values. The filtered question set depends only on the model and the settings: it is
    kept in memory and in ``question_cache_dir``. Corpora and questions are read at ``setup`` (fit start),
    so a missing file fails before training. With a non-LM source it warns and does nothing.

    Args:
        config: the evaluation's settings (:class:`mtsae.evals.unlearning.pipeline.UnlearningDuringTraining`,
            the cheap defaults above; every field is documented there). In YAML::

                - class_path: callbacks.Unlearning
                  init_args:
                    config:
                      forget_corpus: /path/to/bio-forget-corpus.jsonl
                      model_name: google/gemma-2-2b-it

            The small-model mode (cloze scoring of topic-labelled questions, text selectivity) is
            ``scoring: cloze`` with ``question_file``, ``forget_heldout`` and ``retain_heldout``
            (``configs/smollm2.yaml``).

        every_n_val: also run on every n-th validation (sanity check excluded); 0: only at train end.
        at_train_end: run when training ends (skipped if the last validation already ran it).
    """

    def __init__(
        self,
        config: UnlearningDuringTraining | None = None,
        every_n_val: int = 0,
        at_train_end: bool = True,
    ) -> None:
        super().__init__(every_n_val)
        self.at_train_end = at_train_end
        self.config = config if config is not None else UnlearningDuringTraining()
        self.last_step: int | None = None  # global step of the last evaluation
        self.last_results: dict[str, Any] | None = None  # on rank 0
        self.last_path: Path | None = None
        self._enabled = True
        self._tokenizer: Any = None
        self._data: UnlearningData | None = None
        self._filtered: dict[str, dict[str, list[MCQuestion]]] = {}  # per model: kept questions
        self._model: nn.Module | None = None

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_step": self.last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.last_step = state_dict.get("last_step")

    # ------------------------------------------------------------------ the model
    def _model_id(self, source: Any) -> dict[str, Any]:
        cfg = self.config
        own = cfg.model_name is None or cfg.model_name == source.model_name
        return {
            "name": source.model_name if cfg.model_name is None else cfg.model_name,
            "revision": source.revision if own and cfg.revision is None else cfg.revision,
            "dtype": cfg.model_dtype or source.model_dtype,
            "trust_remote_code": bool(getattr(source, "trust_remote_code", False)),
        }

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        source = getattr(trainer.datamodule, "source", None)
        if not is_lm_source(source):
            rank_zero_warn("Unlearning: the data source is not a language model; the evaluation is skipped")
            self._enabled = False
            return
        if trainer.is_global_zero and self._data is None:  # fail fast: before any training
            mid = self._model_id(source)
            self._tokenizer = load_tokenizer(mid["name"], mid["revision"], mid["trust_remote_code"])
            self._data = load_unlearning_data(self._tokenizer, self.config)

    # ------------------------------------------------------------------ hooks
    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.count_validation(trainer) or not self._enabled:
            return
        summary = self._run(trainer, pl_module)
        pl_module.log_dict(summary, sync_dist=False)  # broadcast: identical on every rank

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or not self.at_train_end or self.last_step == trainer.global_step:
            return
        try:
            summary = self._run(trainer, pl_module)
        except Exception as e:  # training is over: report loudly, but let the SAE be exported
            rank_zero_warn(
                f"Unlearning: the evaluation at the end of training failed ({e!r}); the SAE is still "
                "exported: rerun the evaluation with `mtsae eval unlearning` on the checkpoint"
            )
            return
        # logging through the module is not allowed here: write to the loggers and the callback metrics
        for logger in trainer.loggers:
            logger.log_metrics(summary, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in summary.items()})

    # ------------------------------------------------------------------ evaluation
    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        summary: dict[str, float] | None = None
        error: str | None = None
        if trainer.is_global_zero:
            # validation runs under inference mode; the exported SAE copy must be an ordinary tensor
            try:
                with torch.inference_mode(False), torch.no_grad():
                    results = self._evaluate(trainer, pl_module)
            except Exception as e:
                error = repr(e)
                # the other ranks wait in the broadcast below: tell them before raising here
                trainer.strategy.broadcast((None, error), src=0)
                raise
            self.last_results = results
            for w in results.get("warnings", []):
                rank_zero_warn(f"Unlearning at step {trainer.global_step}: {w}")
            self.last_path = save_results(
                results, run_dir(trainer) / "unlearning" / f"step{trainer.global_step}.json"
            )
            summary = {name: float(results[key]) for name, key in LOGGED_METRICS.items()}
            summary.update(
                {n: float(results[k]) for n, k in OPTIONAL_METRICS.items() if results.get(k) is not None}
            )
            rank_zero_info(
                f"unlearning score {summary['val/unlearning_score']:.4f} at step {trainer.global_step} "
                f"(details: {self.last_path})"
            )
        summary, error = trainer.strategy.broadcast((summary, error), src=0)
        if error is not None:
            raise RuntimeError(f"the unlearning evaluation failed on rank 0: {error}")
        self.last_step = trainer.global_step
        return summary

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        source = trainer.datamodule.source
        mid = self._model_id(source)
        if self._data is None:  # setup() was not called (e.g. a bare trainer.validate)
            self._tokenizer = load_tokenizer(mid["name"], mid["revision"], mid["trust_remote_code"])
            self._data = load_unlearning_data(self._tokenizer, self.config)
        device = pl_module.device
        if self._model is None:
            self._model = shared_lm(
                mid["name"], mid["revision"], mid["dtype"], device, mid["trust_remote_code"]
            )
        key = repr(sorted(mid.items()))
        if key not in self._filtered:
            cache_dir = self.config.question_cache_dir or str(
                Path(trainer.default_root_dir) / "unlearning_cache"
            )
            self._filtered[key] = filter_questions(
                self._model,
                self._tokenizer,
                self._data.questions,
                all_perms=self.config.all_perms,
                batch_size=self.config.mcq_batch_size,
                chat_template=self.config.chat_template,
                cache_dir=cache_dir,
                # the key `mtsae eval unlearning` uses too: one question cache serves both
                model_id={k: mid[k] for k in ("name", "revision", "dtype")},
                scoring=self.config.scoring,
                strict_letters=self.config.saebench_exact,
            )
        sae = pl_module.export_sae().to(device)  # acts on raw activations: multipliers in raw units
        results = evaluate_unlearning(
            self._model, self._tokenizer, sae, source.layer, self._data, self._filtered[key], self.config
        )
        results["model"] = mid
        results["global_step"] = trainer.global_step
        return results
