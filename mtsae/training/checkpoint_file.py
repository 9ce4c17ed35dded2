"""Checks of a checkpoint file before and while it is loaded: one message naming the file, never a traceback.

A checkpoint written by ``torch.save`` is a zip archive whose members carry CRC-32 checksums that
``torch.load`` does not verify. :func:`check_checkpoint_file` verifies them (one read of the file), so
a truncated, empty or bit-flipped checkpoint is refused instead of loading slightly wrong weights;
:func:`load_checkpoint_file` then loads it with ``weights_only=True`` and turns a refused pickle into
the same kind of message (torch's advice to retry with ``weights_only=False`` is wrong for a file of
unknown origin).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = [
    "CheckedCheckpointIO",
    "CheckpointFileError",
    "check_checkpoint_file",
    "load_checkpoint_file",
    "refused_pickle",
]


class CheckpointFileError(ValueError):
    """A checkpoint file is missing, damaged, or not a checkpoint of this project."""


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """Refuse a missing, empty, truncated or corrupted checkpoint file (CRC-32 of every zip member)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        size = path.stat().st_size
        raise CheckpointFileError(
            f"checkpoint {path} ({size} bytes) is not a readable PyTorch checkpoint ({err}): it is empty, "
            "truncated (a copy or a save that did not finish?) or another format. Use an earlier checkpoint"
        ) from None
    if bad is not None:
        raise CheckpointFileError(
            f"checkpoint {path} is corrupted: the checksum of its member {bad!r} does not match (a changed "
            "byte on disk or in a copy). Use an earlier checkpoint or copy it again"
        )
    return path


def refused_pickle(path: str | os.PathLike, err: Exception) -> str:
    """The message for a checkpoint that a weights-only load refused (without torch's advice to load it
    with ``weights_only=False``, which is wrong for a file of unknown origin)."""
    lines = [ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler error" in ln]
    first = lines[0].split("error:", 1)[1].split(". Please use")[0].strip() if lines else type(err).__name__
    return (
        f"checkpoint {path} holds pickled objects other than tensors and plain values, which are never "
        f"loaded ({first}): it was not written by this project's training, or it was altered"
    )


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """:func:`check_checkpoint_file`, then ``torch.load(..., weights_only=True)``: a checkpoint is data."""
    path = check_checkpoint_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointFileError(refused_pickle(path, err)) from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointFileError(
            f"{path} is not a Lightning checkpoint of an SAE training run (no 'state_dict' in it)"
        )
    return state


class CheckedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O whose loads go through :func:`check_checkpoint_file` (``--ckpt_path``)."""

    def load_checkpoint(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> dict[str, Any]:
        check_checkpoint_file(path)
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise CheckpointFileError(refused_pickle(path, err)) from None
