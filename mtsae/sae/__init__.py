"""The sparse autoencoder itself: the ``nn.Module``, its activations, streaming encoding and file formats.

Nothing here imports Lightning or transformers: an exported SAE loads and runs with torch and safetensors.
"""

from mtsae.sae.activations import ACTIVATIONS, make_activation
from mtsae.sae.export import SAEMetadata, load_sae, read_metadata, save_sae
from mtsae.sae.model import MTSAE, ForwardOutput

__all__ = [
    "ACTIVATIONS",
    "ForwardOutput",
    "MTSAE",
    "SAEMetadata",
    "load_sae",
    "make_activation",
    "read_metadata",
    "save_sae",
]
