"""mtsae: Multi-Scale Temporal Sparse Autoencoders.

``import mtsae`` loads the SAE alone (torch and safetensors): :class:`MTSAE`, :func:`load_sae` and the
file formats. :class:`SAEModule` and :func:`load_sae_from_checkpoint` (Lightning) are imported on first use. The sub-packages: :mod:`mtsae.sae`, :mod:`mtsae.training`, :mod:`mtsae.lm`, :mod:`mtsae.evals`.
"""

from __future__ import annotations

import importlib
from typing import Any

from mtsae.sae.activations import ACTIVATIONS, make_activation
from mtsae.sae.export import SAEMetadata, load_sae, read_metadata, save_sae
from mtsae.sae.model import MTSAE, ForwardOutput

#: names imported on first access (PEP 562), so that ``import mtsae`` does not load Lightning
_LAZY = {
    "SAEModule": "mtsae.training.module",
    "load_sae_from_checkpoint": "mtsae.training.checkpoint",
}

__all__ = [
    "ACTIVATIONS",
    "ForwardOutput",
    "MTSAE",
    "SAEMetadata",
    "SAEModule",
    "load_sae",
    "load_sae_from_checkpoint",
    "make_activation",
    "read_metadata",
    "save_sae",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mtsae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
