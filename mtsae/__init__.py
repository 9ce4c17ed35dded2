"""mtsae: Multi-Scale Temporal Sparse Autoencoders."""

from mtsae.activations import ACTIVATIONS, make_activation
from mtsae.export import SAEMetadata, load_sae, load_sae_from_checkpoint, read_metadata, save_sae
from mtsae.model import MTSAE, ForwardOutput
from mtsae.module import SAEModule

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
