"""Top-activating contexts of a few features, written beside the run when training ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from callbacks.core_metrics import is_lm_source
from callbacks.export import run_dir
from mtsae.features.examples import EXAMPLES_FILE, ExamplesConfig, feature_examples

__all__ = ["FeatureExamples"]


class FeatureExamples(L.Callback):
    """When training ends, the examples of :func:`mtsae.features.examples.feature_examples` on the
    validation rows: a seeded sample of live features and, for an MTSAE, the features whose encoder weight
    sits mostly in the long-dilation branches, each with its top-activating contexts (detokenised for a
    language-model source). Written to ``<run dir>/feature_examples.json`` on global rank 0; a few seconds
    for a few thousand features on 128 rows. For a whole dashboard use ``mtsae features``.

    Args:
        config: what is kept (:class:`mtsae.features.examples.ExamplesConfig`; every field is documented
            there).
    """

    def __init__(self, config: ExamplesConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ExamplesConfig()

    def _token_text(self, trainer: L.Trainer):
        source = getattr(trainer.datamodule, "source", None)
        if not is_lm_source(source):
            return None
        from mtsae.lm.loading import load_tokenizer

        tok = load_tokenizer(source.model_name, source.revision, getattr(source, "trust_remote_code", False))

        def token_text(ids: list[int]) -> list[str]:
            return [tok.decode([i], clean_up_tokenization_spaces=False) for i in ids]

        return token_text

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        try:
            if dm.cache is None:
                dm.setup("validate")
            with torch.no_grad():
                sae = pl_module.export_sae()  # acts on raw activations, as the cache stores them
                data: dict[str, Any] = feature_examples(
                    sae,
                    dm.cache.read,
                    dm.cache.rows("val"),
                    self.config,
                    self._token_text(trainer),
                    pl_module.device,
                )
        except Exception as e:  # training is over: report loudly, but let the SAE be exported
            rank_zero_warn(f"FeatureExamples: the examples could not be collected ({e!r})")
            return
        data["meta"]["global_step"] = trainer.global_step
        path = Path(run_dir(trainer)) / EXAMPLES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, ensure_ascii=False))
