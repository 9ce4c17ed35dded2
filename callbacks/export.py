"""Export the trained SAE (acting on raw activations) beside the run's logs when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from mtsae.export import save_sae

__all__ = ["ExportSAE", "run_dir"]


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the logger's versioned folder, else ``trainer.default_root_dir``."""
    if trainer.logger is not None and trainer.logger.log_dir is not None:
        return Path(trainer.logger.log_dir)
    return Path(trainer.default_root_dir)


class ExportSAE(L.Callback):
    """At the end of ``fit``, write ``<run dir>/<dirname>/{config.json, sae.pt}`` (see ``mtsae.load_sae``).

    Args:
        dirname: sub-folder of the run directory.
    """

    def __init__(self, dirname: str = "sae") -> None:
        self.dirname = dirname
        self.path: Path | None = None

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = run_dir(trainer) / self.dirname
        self._save(trainer, pl_module)

    @rank_zero_only
    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        meta = {"global_step": trainer.global_step, "act_scale": float(pl_module.act_scale)}
        save_sae(pl_module.export_sae(), self.path, metadata=meta)
