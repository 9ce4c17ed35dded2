"""SHA-256 of files, read in blocks: one implementation for the cache shards, GGUF models, SAE folders and
corpora."""

from __future__ import annotations

import hashlib
import os

__all__ = ["file_sha256", "update_from_file"]

_BLOCK = 1 << 20  # 1 MiB


def update_from_file(h: hashlib._Hash, path: str | os.PathLike) -> None:
    """Feed the bytes of the file ``path`` to the hash ``h``, 1 MiB at a time."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    update_from_file(h, path)
    return h.hexdigest()
