"""Writing safetensors files byte-for-byte reproducibly.

``safetensors`` stores the ``__metadata__`` strings in a hash map whose order changes from process to
process, so identical tensors and metadata gave files with different SHA-256 (and recipes pin an
SAE's hash). :func:`save_file_deterministic` writes the same file with the metadata keys sorted.
"""

from __future__ import annotations

import json
import os
import struct

import torch
from safetensors.torch import save

__all__ = ["save_file_deterministic"]


def save_file_deterministic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` with the header's ``__metadata__`` keys in sorted order."""
    data = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensor bytes start 8-aligned, as safetensors writes them
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + data[8 + n :])
