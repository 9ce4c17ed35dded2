"""What an activation source is: something that produces rows of activation sequences, in order.

A source yields :class:`SourceChunk` objects for a half-open range of row indices ``[start, stop)``;
the same row index must always give the same bytes (that is what makes an interrupted cache build
resumable at shard granularity). Everything that changes those bytes goes in :meth:`fingerprint`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["SourceChunk", "ActivationSource"]


@dataclass
class SourceChunk:
    """Consecutive rows ``start .. start + len(acts)`` of a source."""

    acts: torch.Tensor
    """``[n, T, d_in]`` activations (any floating dtype; the cache converts)"""
    tokens: torch.Tensor
    """``[n, T]`` int32 token ids, ``-1`` where the source has no tokens"""
    valid: torch.Tensor
    """``[n, T]`` bool, False at BOS / EOS / PAD"""
    ground_truth: dict[str, np.ndarray] = field(default_factory=dict)
    """per-row ground truth (leading dim ``n``), stored under ``ground_truth/<name>`` in the shard"""

    def __len__(self) -> int:
        return self.acts.shape[0]


class ActivationSource:
    """Base class of activation sources (see :class:`data.SyntheticSource`, :class:`data.LMSource`)."""

    #: short name stored in the cache manifest (``synthetic``, ``lm``)
    kind: str = "base"

    @property
    def d_in(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def ctx_len(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """JSON-serialisable description of everything that changes the produced bytes."""
        raise NotImplementedError  # pragma: no cover

    def static_ground_truth(self) -> dict[str, np.ndarray]:
        """Ground truth shared by all rows (e.g. true feature directions); empty for real models."""
        return {}

    def check(self) -> None:
        """Fail fast (before any expensive work) if the source cannot be used; no-op by default."""

    def generate(self, start: int, stop: int, batch_size: int) -> Iterator[SourceChunk]:
        """Yield rows ``start .. stop`` in order, in chunks of at most ``batch_size`` rows."""
        raise NotImplementedError  # pragma: no cover

    def close(self) -> None:
        """Release heavy resources (a loaded language model) once the cache is built."""
