"""Saving and loading trained SAEs that act on raw activations (no Lightning needed to use them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mtsae.model import MTSAE

__all__ = ["save_sae", "load_sae", "load_sae_from_checkpoint"]

CONFIG_FILE, WEIGHTS_FILE = "config.json", "sae.pt"


def save_sae(sae: MTSAE, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``config.json`` (constructor arguments + ``metadata``) and ``sae.pt`` (state dict)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps({**sae.config(), "metadata": metadata or {}}, indent=1))
    torch.save({k: v.detach().cpu() for k, v in sae.state_dict().items()}, out / WEIGHTS_FILE)
    return out


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> MTSAE:
    """Load an SAE written by :func:`save_sae`."""
    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not an exported SAE directory")
    cfg = json.loads((path / CONFIG_FILE).read_text())
    cfg.pop("metadata", None)
    sae = MTSAE(**cfg)
    sae.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return sae.to(device).eval()


def load_sae_from_checkpoint(ckpt: str | os.PathLike, device: str | torch.device = "cpu") -> MTSAE:
    """The raw-activation SAE of a Lightning checkpoint of :class:`mtsae.SAEModule`."""
    from mtsae.module import SAEModule

    module = SAEModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    return module.export_sae().to(device)
