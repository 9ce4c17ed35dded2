"""One unlearning evaluation, the single entry point of ``mtsae eval unlearning`` and ``callbacks.Unlearning``.

:class:`UnlearningRun` owns everything a run needs, so both callers get the same numbers from the same
inputs: the model's identity (name, revision, dtype, ``trust_remote_code``: :func:`unlearning_model_id`),
the data (tokenizer, corpora, questions), the question filter (with the settings the scoring uses), the
sweep (:func:`mtsae.evals.unlearning.pipeline.evaluate_unlearning`) and the results record::

    run = UnlearningRun(config, source, cache_dir=out / "question_cache")
    run.load_data()                     # tokenizer, corpora, questions: fails before any model is loaded
    run.prepare(device)                 # the LM, and the questions it answers correctly (cached on disk)
    results = run.evaluate(sae)         # sparsities, selection, grid, score; JSON-ready
    save_results(results, out / "results.json")

``source`` is the SAE's activation source (``data.LMSource`` or anything with ``model_name``,
``revision``, ``model_dtype``, ``layer`` and optionally ``trust_remote_code``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtsae.evals.unlearning.config import UnlearningConfig
from mtsae.evals.unlearning.corpora import UnlearningData, load_unlearning_data, sample_questions
from mtsae.evals.unlearning.mcq import MCQuestion
from mtsae.evals.unlearning.pipeline import evaluate_unlearning, filter_questions

__all__ = ["UnlearningRun", "unlearning_model_id"]


def unlearning_model_id(config: UnlearningConfig, source: Any) -> dict[str, Any]:
    """The unlearning LM: ``{"name", "revision", "dtype", "trust_remote_code"}``.

    ``config.model_name`` (None: the source's model); its revision is ``config.revision``, or the
    source's when the model is the source's and no revision is set; the dtype is ``config.model_dtype``
    or the source's; ``trust_remote_code`` is the source's (off unless configured there). This dict keys
    the question cache and is recorded in the results and the recipe.
    """
    own = config.model_name is None or config.model_name == source.model_name
    return {
        "name": source.model_name if config.model_name is None else config.model_name,
        "revision": source.revision if own and config.revision is None else config.revision,
        "dtype": config.model_dtype or source.model_dtype,
        "trust_remote_code": bool(getattr(source, "trust_remote_code", False)),
    }


class UnlearningRun:
    """The unlearning evaluation of SAEs on one source's layer, with one :class:`UnlearningConfig`.

    Args:
        config: the settings (every field documented on :class:`UnlearningConfig`).
        source: the SAE's activation source: the model identity and the layer come from it.
        cache_dir: where filtered question sets are cached when ``config.question_cache_dir`` is None
            (None: not cached on disk).

    The data, the model and the filtered questions are kept: :meth:`evaluate` can run on many SAEs (the
    callback evaluates the same run at several steps).
    """

    def __init__(self, config: UnlearningConfig, source: Any, cache_dir: str | Path | None = None) -> None:
        self.config = config
        self.layer = int(source.layer)
        self.model_id = unlearning_model_id(config, source)
        self.cache_dir = config.question_cache_dir or (None if cache_dir is None else str(cache_dir))
        self.tokenizer: Any = None
        self.data: UnlearningData | None = None
        self.model: nn.Module | None = None
        self.filtered: dict[str, list[MCQuestion]] | None = None
        self.n_kept: dict[str, int] = {}  # kept by the filter, before any ``max_kept`` sample

    def load_data(self) -> UnlearningData:
        """The tokenizer, both corpora packed into rows and the question sets (read once; no model)."""
        if self.data is None:
            from mtsae.lm.loading import load_tokenizer

            mid = self.model_id
            self.tokenizer = load_tokenizer(mid["name"], mid["revision"], mid["trust_remote_code"])
            self.data = load_unlearning_data(self.tokenizer, self.config)
        return self.data

    def prepare(
        self, device: torch.device | str = "cpu", model: nn.Module | None = None, progress: bool = False
    ) -> UnlearningRun:
        """Load the data and the LM, and keep the questions the unmodified LM answers correctly.

        Args:
            device: where the LM is loaded.
            model: the LM already loaded (it must be :attr:`model_id`'s); None: load it.
            progress: progress bars.
        """
        data = self.load_data()
        if self.model is None:
            if model is None:
                from mtsae.lm.loading import load_causal_lm

                mid = self.model_id
                model = load_causal_lm(
                    mid["name"], mid["revision"], mid["dtype"], device, mid["trust_remote_code"]
                )
            self.model = model
        if self.filtered is None:
            self.filtered = filter_questions(
                self.model,
                self.tokenizer,
                data.questions,
                self.config,
                cache_dir=self.cache_dir,
                model_id=self.model_id,
                progress=progress,
            )
            self.n_kept = {n: len(qs) for n, qs in self.filtered.items()}
            if self.config.max_kept is not None:  # a cheap run: the grid scores a seeded sample
                self.filtered = {
                    n: sample_questions(qs, self.config.max_kept, self.config.seed)
                    for n, qs in self.filtered.items()
                }
        return self

    def evaluate(self, sae: nn.Module, progress: bool = False) -> dict[str, Any]:
        """The results record of ``sae`` (acting on raw activations of :attr:`layer`): ``model`` (the
        identity) and everything :func:`mtsae.evals.unlearning.pipeline.evaluate_unlearning` returns."""
        if self.filtered is None or self.model is None or self.data is None:
            raise RuntimeError("UnlearningRun.evaluate before prepare(): call run.prepare(device) first")
        results = evaluate_unlearning(
            self.model, self.tokenizer, sae, self.layer, self.data, self.filtered, self.config, progress
        )
        return {"model": dict(self.model_id), "n_kept_before_sample": dict(self.n_kept), **results}
