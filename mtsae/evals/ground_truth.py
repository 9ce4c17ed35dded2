"""The planted features of a synthetic source, as one typed object (read from the cache by
``data.ActivationCache.ground_truth``, used by the recovery, disentanglement and synthetic unlearning
evaluations)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtsae.training.metrics import RECOVERY_THRESHOLD, ground_truth_recovery

__all__ = ["GroundTruth"]


@dataclass(frozen=True)
class GroundTruth:
    """True feature directions and their timescale groups."""

    features: Tensor
    """``[n_true, d_in]`` float32: the true feature directions"""
    group_index: Tensor | None = None
    """``[n_true]`` int64: the group of each feature (index into ``group_names``); None: no groups"""
    group_names: tuple[str, ...] = ()
    """the groups' names (e.g. ``local``, ``medium``, ``slow``)"""

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise ValueError(
                f"ground-truth features must be [n_true, d_in], got {tuple(self.features.shape)}"
            )
        if self.group_index is not None and self.group_index.shape != (self.features.shape[0],):
            raise ValueError(
                f"group_index has shape {tuple(self.group_index.shape)}, expected ({self.features.shape[0]},)"
            )

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> GroundTruth | None:
        """From the arrays stored in a shard (``features``, ``group_index``, ``group_names`` as HDF5 bytes)
        or returned by a source's ``static_ground_truth()``; None when there are no ``features``."""
        if "features" not in arrays:
            return None
        gi = arrays.get("group_index")
        names = arrays.get("group_names")
        return cls(
            features=torch.as_tensor(np.asarray(arrays["features"]), dtype=torch.float32),
            group_index=None if gi is None else torch.as_tensor(np.asarray(gi), dtype=torch.long),
            group_names=() if names is None else tuple(_text(n) for n in list(names)),
        )

    def group(self, name: str) -> Tensor:
        """Indices of the features of group ``name`` (``ValueError`` naming the groups if it has none)."""
        if self.group_index is None or name not in self.group_names:
            raise ValueError(f"group {name!r} is not among the ground-truth groups {list(self.group_names)}")
        return (self.group_index == self.group_names.index(name)).nonzero().squeeze(1)

    def recovery(self, W_dec: Tensor, threshold: float = RECOVERY_THRESHOLD) -> dict[str, float]:
        """MMCS and the recovered fraction, overall and per group
        (:func:`mtsae.training.metrics.ground_truth_recovery`)."""
        return ground_truth_recovery(
            self.features.to(W_dec.device),
            W_dec,
            self.group_index,
            list(self.group_names) or None,
            threshold,
        )


def _text(name: Any) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)
