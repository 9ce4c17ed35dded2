"""Reading the SAE out of a Lightning checkpoint of :class:`mtsae.training.module.SAEModule`."""

from __future__ import annotations

import os

import torch

from mtsae.sae.model import MTSAE

__all__ = ["load_sae_from_checkpoint"]


def load_sae_from_checkpoint(ckpt: str | os.PathLike, device: str | torch.device = "cpu") -> MTSAE:
    """The raw-activation SAE of a Lightning checkpoint of :class:`mtsae.SAEModule` (the input scale folded
    into the weights, as :meth:`mtsae.SAEModule.export_sae` does)."""
    from mtsae.training.module import SAEModule

    # weights_only: a checkpoint is data, never code
    module = SAEModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    return module.export_sae().to(device)
