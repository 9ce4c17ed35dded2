"""Samplers, datasets and the resumable training loader that serve rows of an :class:`~data.cache.ActivationCache`.

Training reads at the disk's speed (:class:`BlockShuffleSampler`): each epoch the training rows are cut
into blocks of ``block_rows`` consecutive rows (never across a shard), the block order is shuffled,
the resulting stream is split into one contiguous share per rank, and each share into windows of
``shuffle_buffer_rows`` rows. A window is read with one contiguous HDF5 slice per block (checksums
verified), its rows are shuffled in memory, and it is served as consecutive batches. What this gives
up against a uniform row shuffle: a batch holds rows of one window only (``shuffle_buffer_rows /
block_rows`` blocks), and rows of one block (consecutive sequences of the source) meet in a batch more
often than chance: in a batch of ``B`` rows about ``B(B-1)/2 · (block_rows-1)/(shuffle_buffer_rows-1)``
pairs share a block (7 for ``B=32``, 16-row blocks and 1024-row windows). Every row is still seen
exactly once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from data.cache import ActivationCache

__all__ = [
    "BlockShuffleSampler",
    "ResumableDataLoader",
    "RowDataset",
    "ShardedRowSampler",
    "Window",
    "WindowDataset",
    "already_batched",
]


class RowDataset(Dataset):
    """Rows (sequences) of a cache split. ``__getitems__`` reads a whole batch in one pass per shard."""

    def __init__(self, cache: ActivationCache, rows: np.ndarray) -> None:
        self.cache, self.rows = cache, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.cache.read(self.rows[[i]]).items()}

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return self.cache.read(self.rows[np.asarray(idx)])


def already_batched(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``collate_fn`` of loaders whose dataset returns whole batches."""
    return batch


class ShardedRowSampler(DistributedSampler):
    """Indices of this rank's disjoint share of the rows, shuffled per epoch (``set_epoch``).

    It is a ``DistributedSampler`` (so Lightning's sampler injection leaves it alone) that needs no
    process group and never pads: rows are never repeated across ranks.

    With ``drop_last`` every rank gets the same number of indices (what DDP training needs); without
    it, ranks may differ by one (fine for validation, where nothing is synchronised per step).
    """

    def __init__(
        self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = False
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self._skip = 0  # indices to skip once, at the next iteration (a mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_once(self, n: int) -> None:
        """Start the next iteration ``n`` indices into this epoch's order (then go back to normal)."""
        self._skip = n

    def _indices(self) -> np.ndarray:
        if self.shuffle:
            idx = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            idx = np.arange(self.n)
        if self.drop_last:
            idx = idx[: (self.n // self.world_size) * self.world_size]
        return idx[self.rank :: self.world_size]

    def __iter__(self):
        skip, self._skip = self._skip, 0
        return iter(self._indices()[skip:].tolist())

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.world_size
        return len(range(self.rank, self.n, self.world_size))


class Window(NamedTuple):
    """One shuffle buffer: the global row ranges to read, in order, and the seed of its row shuffle."""

    index: int
    """position of the window in this rank's epoch"""
    ranges: tuple[tuple[int, int], ...]
    """global ``(lo, hi)`` row ranges, each inside one shard"""
    seed: tuple[int, ...] | None
    """seed of the permutation of its rows; ``None`` keeps them in read order"""


class BlockShuffleSampler(DistributedSampler):
    """This rank's windows of the epoch: shuffled blocks of consecutive rows, read contiguously.

    1. every shard range ``[start, stop)`` of the split is cut into blocks of ``block_rows`` rows;
    2. the blocks are shuffled (seeded by ``seed`` and the epoch), giving one stream of rows;
    3. rank ``r`` takes the ``r``-th contiguous share of that stream (``n // world_size`` rows each with
       ``drop_last``, so every rank has the same number of batches; otherwise shares differ by one);
    4. the share is cut into windows of ``window_rows`` rows (a multiple of ``batch_size``); with
       ``drop_last`` the last window is trimmed to whole batches.

    The windows (not rows) are what it yields; :class:`WindowDataset` reads and shuffles one. Ranks
    never share a row. It is a ``DistributedSampler`` so that Lightning's sampler injection leaves it
    alone; it needs no process group.

    Args:
        ranges: global ``(start, stop)`` rows of each shard of the split, in shard order.
        batch_size: rows per batch.
        block_rows: consecutive rows read as one slice (the unit of the block shuffle).
        shuffle_buffer_rows: rows shuffled together in memory (rounded down to whole batches, at
            least one batch).
        shuffle: shuffle blocks and rows in windows; if False, rows come in order.
        seed: seed of the shuffles (combined with the epoch, the rank and the window index).
        rank: this process's rank; world_size: the number of ranks.
        drop_last: equal batch counts on every rank (rows beyond them wait for another epoch).
    """

    def __init__(
        self,
        ranges: Sequence[tuple[int, int]],
        batch_size: int,
        block_rows: int = 16,
        shuffle_buffer_rows: int = 1024,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if batch_size < 1 or block_rows < 1 or shuffle_buffer_rows < 1:
            raise ValueError(
                f"batch_size, block_rows and shuffle_buffer_rows must be >= 1, got {batch_size}, "
                f"{block_rows}, {shuffle_buffer_rows}"
            )
        self.ranges = [(int(a), int(b)) for a, b in ranges]
        self.batch_size, self.block_rows = batch_size, block_rows
        self.window_rows = max(1, shuffle_buffer_rows // batch_size) * batch_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.n = sum(b - a for a, b in self.ranges)
        self.epoch = 0
        self._skip = 0  # windows to skip once, at the next iteration (a mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_once(self, n: int) -> None:
        """Start the next iteration ``n`` windows into this epoch's order (then go back to normal)."""
        self._skip = n

    def _share(self) -> tuple[int, int]:
        """This rank's ``[start, stop)`` positions in the epoch's stream of rows."""
        if self.drop_last:
            m = self.n // self.world_size
            m -= m % self.batch_size
            return self.rank * m, (self.rank + 1) * m
        base, extra = divmod(self.n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def rows_per_rank(self) -> int:
        a, b = self._share()
        return b - a

    def n_batches(self) -> int:
        """Batches this rank serves per epoch."""
        return math.ceil(self.rows_per_rank() / self.batch_size)

    def windows(self) -> list[Window]:
        """This epoch's windows for this rank, in order."""
        lo, hi = [], []
        for a, b in self.ranges:
            starts = np.arange(a, b, self.block_rows)
            lo.append(starts)
            hi.append(np.minimum(starts + self.block_rows, b))
        lo_k = np.concatenate(lo) if lo else np.zeros(0, np.int64)
        hi_k = np.concatenate(hi) if hi else np.zeros(0, np.int64)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(lo_k))
            lo_k, hi_k = lo_k[order], hi_k[order]
        cum = np.concatenate([[0], np.cumsum(hi_k - lo_k)])  # stream position of each block's first row
        start, stop = self._share()
        out = []
        for index, w0 in enumerate(range(start, stop, self.window_rows)):
            w1 = min(stop, w0 + self.window_rows)
            ranges = []
            k = int(np.searchsorted(cum, w0, side="right") - 1)
            while k < len(lo_k) and cum[k] < w1:
                a = int(lo_k[k] + max(0, w0 - cum[k]))
                b = int(lo_k[k] + min(hi_k[k] - lo_k[k], w1 - cum[k]))
                ranges.append((a, b))
                k += 1
            seed = (self.seed, self.epoch, self.rank, index) if self.shuffle else None
            out.append(Window(index, tuple(ranges), seed))
        return out

    def __iter__(self) -> Iterator[Window]:
        skip, self._skip = self._skip, 0
        return iter(self.windows()[skip:])

    def __len__(self) -> int:
        return math.ceil(self.rows_per_rank() / self.window_rows)


class WindowDataset(Dataset):
    """Reads one :class:`Window` (contiguous slices, checksummed) and shuffles its rows in memory."""

    def __init__(self, cache: ActivationCache) -> None:
        self.cache = cache

    def __getitem__(self, window: Window) -> dict[str, torch.Tensor]:
        data = self.cache.read_ranges(list(window.ranges))
        if window.seed is None:
            return data
        perm = np.random.default_rng(list(window.seed)).permutation(data["acts"].shape[0])
        return {k: _take_rows(v, perm) for k, v in data.items()}


def _take_rows(t: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """``t[idx]`` along dim 0 through numpy's ``take`` (one memcpy per row; several times faster than
    torch's CPU indexing of bf16 rows)."""
    if t.dtype == torch.bfloat16:
        return torch.from_numpy(np.take(t.view(torch.int16).numpy(), idx, axis=0)).view(torch.bfloat16)
    return torch.from_numpy(np.take(t.numpy(), idx, axis=0))


class ResumableDataLoader(DataLoader):
    """The training loader: windows of rows (:class:`BlockShuffleSampler`) served as batches.

    Worker processes read whole windows (``num_workers`` of them ahead); the batches are consecutive
    slices of a window, so their order does not depend on ``num_workers``. The position inside an
    epoch is saved in checkpoints: Lightning stores ``state_dict()`` with every checkpoint and hands it
    back to ``load_state_dict()`` before iterating again, so a run resumed mid-epoch continues with the
    rows the interrupted run had not yet trained on, in the same order, instead of starting the epoch
    over. ``batches_done`` returns the number of batches of the current epoch already trained on
    (Lightning's own count, which does not include batches prefetched but not yet used).

    Args:
        dataset: a :class:`WindowDataset`.
        sampler: the :class:`BlockShuffleSampler` of this rank.
        batches_done: see above.
        **kwargs: the rest of ``DataLoader``'s arguments (``batch_size`` is ``None``: windows are
            batched here).
    """

    def __init__(
        self,
        dataset: WindowDataset,
        sampler: BlockShuffleSampler,
        batches_done: Callable[[], int],
        **kwargs: Any,
    ) -> None:
        kwargs = {"batch_size": None, "collate_fn": already_batched} | kwargs
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.batches_done = batches_done
        self._skip_batches = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        B = self.sampler.batch_size
        per_window = self.sampler.window_rows // B
        skip, self._skip_batches = self._skip_batches, 0
        self.sampler.skip_once(skip // per_window)
        first = skip % per_window
        for window in super().__iter__():
            n = window["acts"].shape[0]
            for a in range(first * B, n, B):
                yield {k: v[a : a + B] for k, v in window.items()}
            first = 0

    def __len__(self) -> int:
        return self.sampler.n_batches()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": int(self.batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the last batch trained on before ``state`` was saved.

        Lightning iterates the restored loader before it sets the epoch of the run it resumes. A state
        saved mid-epoch continues that epoch; one saved after the epoch's last batch (a checkpoint at
        the end-of-epoch validation, or SIGTERM during it) starts the next epoch at its first batch,
        which is the epoch Lightning resumes: skipping ``batches_done`` batches of it would drop it.
        """
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= self.sampler.n_batches():  # the saved epoch was finished
            epoch, done = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self._skip_batches = done
