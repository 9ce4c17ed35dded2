"""Export the trained SAE (acting on raw activations) beside the run's logs when training ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from mtsae.sae.export import SAEMetadata, git_commit, hook_name, save_sae

__all__ = ["ExportSAE", "run_dir", "run_metadata"]


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the logger's versioned folder, else ``trainer.default_root_dir``."""
    if trainer.logger is not None and trainer.logger.log_dir is not None:
        return Path(trainer.logger.log_dir)
    return Path(trainer.default_root_dir)


def run_metadata(trainer: L.Trainer, pl_module: L.LightningModule, **fields: Any) -> SAEMetadata:
    """What the run knows about its SAE: the data's cache manifest (model, revision, layer, context
    size, dtypes, dataset), the folded input scale, the step and the code's git commit; ``fields`` add to it.
    """
    dm = trainer.datamodule
    source: dict[str, Any] = {}
    manifest: dict[str, Any] = {}
    if dm is not None and getattr(dm, "cache", None) is not None:
        manifest = dm.cache.manifest  # what the run actually read
        source = dict(manifest.get("fingerprint_inputs") or {})
    elif dm is not None and hasattr(getattr(dm, "source", None), "fingerprint"):
        source = dict(dm.source.fingerprint())
    layer = source.get("layer")
    is_lm = "model_name" in source
    data_keys = ("source", "dataset", "dataset_config", "split", "text_column", "seed", "n_sequences")
    return SAEMetadata(
        model_name=source.get("model_name"),
        model_sha256=source.get("model_sha256"),
        model_revision=source.get("revision"),
        model_dtype=source.get("model_dtype"),
        layer=layer,
        hook_name=hook_name(layer) if is_lm and source.get("hook") == "resid_post" else None,
        context_size=manifest.get("ctx_len", source.get("ctx_len")),
        prepend_bos=True if is_lm else None,  # LMSource rows are [BOS] + ctx_len - 1 tokens
        activation_dtype=manifest.get("dtype", source.get("dtype")),
        act_scale=float(pl_module.act_scale) if hasattr(pl_module, "act_scale") else 1.0,
        global_step=trainer.global_step,
        data={k: source[k] for k in data_keys if k in source} or None,
        git_commit=git_commit(),
        **fields,
    )


class ExportSAE(L.Callback):
    """At the end of ``fit``, write ``<run dir>/<dirname>/{config.json, sae.safetensors}``.

    The SAE acts on raw activations and ``config.json`` holds its metadata (language model, revision,
    layer, hook name, context size, dtypes, folded input scale, training tokens, git commit); see
    ``mtsae.load_sae``, ``mtsae.read_metadata`` and ``docs/formats.md``.

    Args:
        dirname: sub-folder of the run directory.
        saelens_dirname: also write a per-token SAE (``dilations: []``) in SAELens's format to this
            sub-folder (``None``: do not). An MTSAE has no SAELens form: asking for one fails at setup.
    """

    def __init__(self, dirname: str = "sae", saelens_dirname: str | None = None) -> None:
        self.dirname = dirname
        self.saelens_dirname = saelens_dirname
        self.path: Path | None = None
        self.tokens = 0  # token positions of the training batches on this device
        self._valid: torch.Tensor | int = 0  # of which valid; a tensor on the device (no sync per step)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dilations = getattr(getattr(pl_module, "sae", None), "dilations", [])
        if self.saelens_dirname is not None and dilations:
            raise ValueError(
                f"ExportSAE(saelens_dirname={self.saelens_dirname!r}): an MTSAE (dilations={dilations}) "
                "has no SAELens form (its encoder reads earlier tokens); drop saelens_dirname, or train a "
                "per-token SAE (model.dilations: [])"
            )

    @property
    def valid_tokens(self) -> int:
        return int(self._valid)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        valid = batch["valid"]
        self.tokens += valid.numel()
        self._valid = self._valid + valid.sum()

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = run_dir(trainer) / self.dirname
        counts = torch.tensor([self.tokens, self.valid_tokens], dtype=torch.long, device=pl_module.device)
        # every device counted its own rows (after a resume, each starts from the checkpoint's count)
        tokens, valid = (int(v) for v in trainer.strategy.reduce(counts, reduce_op="sum").tolist())
        self._save(trainer, pl_module, tokens, valid)

    @rank_zero_only
    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, tokens: int, valid: int) -> None:
        meta = run_metadata(trainer, pl_module, training_tokens=tokens, training_valid_tokens=valid)
        sae = pl_module.export_sae()
        save_sae(sae, self.path, metadata=meta)
        if self.saelens_dirname is not None:
            from mtsae.sae.saelens import save_saelens

            save_saelens(sae, run_dir(trainer) / self.saelens_dirname, metadata=meta)

    @override
    def state_dict(self) -> dict[str, int]:
        return {"tokens": self.tokens, "valid_tokens": self.valid_tokens}

    @override
    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self._valid = int(state_dict.get("valid_tokens", 0))
