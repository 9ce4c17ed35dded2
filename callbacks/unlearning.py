"""SAEBench's unlearning evaluation (WMDP-bio forget, MMLU retain) as a Lightning callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from callbacks.core_metrics import is_lm_source, shared_lm
from callbacks.export import run_dir
from callbacks.periodic import EveryNValidations
from mtsae.evals.records import save_results
from mtsae.evals.unlearning.config import UnlearningDuringTraining
from mtsae.evals.unlearning.report import LOGGED_METRICS, logged_metrics, save_best_recipe
from mtsae.evals.unlearning.run import UnlearningRun

__all__ = ["Unlearning", "LOGGED_METRICS"]


class Unlearning(EveryNValidations):
    """Unlearning score of the SAE being trained (SAEBench; see :mod:`mtsae.evals.unlearning.pipeline`).

    A thin wrapper of :class:`mtsae.evals.unlearning.run.UnlearningRun`, the entry point
    ``mtsae eval unlearning`` calls too: with the same settings and SAE, both write the same results.

    It is expensive (two corpora through the LM, then every grid point scores every question), so by
    default (``every_n_val: 0``) it runs **once, when training ends** (``on_train_end``, while the model
    is still on its device); ``every_n_val: n`` also runs it on every n-th validation. Defaults are the
    cheap setting for use during training: questions filtered on their original order only
    (``all_perms: false``) and at most ``max_questions`` per set; ``mtsae eval unlearning`` runs the full
    SAEBench setting.

    Logs ``val/unlearning_score``, ``val/unlearning/wmdp_acc_best`` and ``val/unlearning/mmlu_acc_best``
    (of the best grid point; with none keeping MMLU accuracy, those of the unmodified model), with held-out
    text also ``val/unlearning/text_selectivity_max`` (the largest over the grid points that clamp
    features) and ``val/unlearning/text_selectivity_best`` (the best point's, when there is one), and
    writes every grid point (features, accuracies) to ``<run dir>/unlearning/step<global_step>.json``
    (the results record of ``mtsae eval unlearning`` with ``global_step`` added).

    The evaluation runs on global rank 0 (the others wait) and its summary is broadcast, so every rank
    logs the same values. The filtered question set depends only on the model and the settings: it is
    kept in memory and in ``question_cache_dir``. Corpora and questions are read at ``setup`` (fit start),
    so a missing file fails before training. With a non-LM source it warns and does nothing.

    Args:
        config: the evaluation's settings (:class:`mtsae.evals.unlearning.config.UnlearningDuringTraining`,
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
        self._unlearning: UnlearningRun | None = None  # on rank 0: data, model and kept questions, built once

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_step": self.last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.last_step = state_dict.get("last_step")

    # ------------------------------------------------------------------ the run
    def _unlearning_run(self, trainer: L.Trainer) -> UnlearningRun:
        if self._unlearning is None:
            cache_dir = Path(trainer.default_root_dir) / "unlearning_cache"
            self._unlearning = UnlearningRun(self.config, trainer.datamodule.source, cache_dir=cache_dir)
        return self._unlearning

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        source = getattr(trainer.datamodule, "source", None)
        if not is_lm_source(source):
            rank_zero_warn("Unlearning: the data source is not a language model; the evaluation is skipped")
            self._enabled = False
            return
        if trainer.is_global_zero:  # fail fast: corpora and questions are read before any training
            self._unlearning_run(trainer).load_data()

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
            summary = logged_metrics(results)
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
        run = self._unlearning_run(trainer)  # setup() may not have run (e.g. a bare trainer.validate)
        if run.model is None:  # the LM is shared with the other callbacks that hold the same model
            mid = run.model_id
            device = pl_module.device
            model = shared_lm(mid["name"], mid["revision"], mid["dtype"], device, mid["trust_remote_code"])
            run.prepare(device, model=model)
        sae = pl_module.export_sae().to(pl_module.device)  # acts on raw activations: multipliers in raw units
        results = {**run.evaluate(sae), "global_step": trainer.global_step}
        # as `mtsae eval unlearning` does: the best grid point as a recipe for `mtsae unlearn generate`,
        # naming the exported raw-activation SAE it was chosen with
        step = trainer.global_step
        save_best_recipe(
            results, sae, run_dir(trainer) / "unlearning", f"sae_step{step}", f"recipe_step{step}.json"
        )
        return results
