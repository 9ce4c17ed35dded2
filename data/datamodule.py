"""``ActivationDataModule``: builds the activation cache once and serves ``[B, T, d_in]`` batches.

- ``prepare_data`` (rank 0 of each node) builds the cache with a progress bar, resuming an
  interrupted build at the first missing shard.
- ``setup`` opens the cache and checks its manifest against the configuration.
- Batches are whole sequences, shuffled across rows each epoch, never within a row. Every rank reads
  a disjoint set of rows.

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
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from data.cache import (
    ActivationCache,
    CacheMismatchError,
    CacheSpec,
    build_cache,
    fingerprint,
    fingerprint_inputs,
)
from data.sources import ActivationSource

__all__ = [
    "ActivationDataModule",
    "BlockShuffleSampler",
    "ResumableDataLoader",
    "RowDataset",
    "ShardedRowSampler",
    "Window",
    "WindowDataset",
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


def _already_batched(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
        kwargs = {"batch_size": None, "collate_fn": _already_batched} | kwargs
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
        self.sampler.set_epoch(state["epoch"])
        self._skip_batches = state["batches_done"]


class ActivationDataModule(L.LightningDataModule):
    """Activation sequences from a source, cached to HDF5.

    Args:
        source: where activations come from (``data.SyntheticSource``, ``data.LMSource``).
        cache_dir: parent folder of caches; each configuration gets ``<cache_dir>/<fingerprint>/``.
        cache_path: use this existing cache directory instead (its manifest must match the config).
        n_sequences: training sequences to cache.
        val_sequences: validation sequences to cache (generated after the training ones).
        shard_size: sequences per HDF5 shard (the unit of resumption).
        dtype: storage dtype (``bfloat16``, ``float16``, ``float32``).
        batch_size: sequences per training batch, per device.
        val_batch_size: sequences per validation batch (default: ``batch_size``).
        num_workers: DataLoader worker processes (each reads whole shuffle windows ahead).
        block_rows: training rows read as one contiguous slice; the block order is shuffled each epoch.
        shuffle_buffer_rows: training rows shuffled together in memory (the window served as
            consecutive batches). Host memory per rank is about ``(num_workers + 2)`` windows.
        source_batch_size: sequences per call to the source while caching.
        seed: seed of the row shuffling.
        progress: show a progress bar while caching.
    """

    def __init__(
        self,
        source: ActivationSource,
        cache_dir: str = "cache",
        cache_path: str | None = None,
        n_sequences: int = 4096,
        val_sequences: int = 256,
        shard_size: int = 1024,
        dtype: str = "float32",
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        source_batch_size: int = 64,
        seed: int = 0,
        progress: bool = True,
        block_rows: int = 16,
        shuffle_buffer_rows: int = 1024,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if block_rows < 1 or shuffle_buffer_rows < 1:
            raise ValueError(
                f"block_rows and shuffle_buffer_rows must be >= 1, got {block_rows}, {shuffle_buffer_rows}"
            )
        if val_sequences < 1:
            raise ValueError("val_sequences must be >= 1: validation metrics need held-out sequences")
        if n_sequences < val_sequences:
            raise ValueError(
                f"data.n_sequences ({n_sequences}) is smaller than data.val_sequences ({val_sequences}): the "
                "training split must be the larger one (were the two values swapped?)"
            )
        self.source = source
        self.spec = CacheSpec(n_sequences, val_sequences, shard_size, dtype)  # validates
        self.cache_dir, self.cache_path = cache_dir, cache_path
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.source_batch_size = num_workers, source_batch_size
        self.seed, self.progress = seed, progress
        self.block_rows, self.shuffle_buffer_rows = block_rows, shuffle_buffer_rows
        self.cache: ActivationCache | None = None

    @property
    def d_in(self) -> int:
        """Activation width, known before any data is built (linked into the model's ``d_in``)."""
        return self.source.d_in

    @property
    def cache_root(self) -> Path:
        if self.cache_path is not None:
            return Path(self.cache_path)
        return Path(self.cache_dir) / fingerprint(fingerprint_inputs(self.source, self.spec))

    # ------------------------------------------------------------------ hooks
    def prepare_data(self) -> None:
        if self.cache_path is not None:
            return  # an existing cache was named; setup() checks it
        build_cache(self.source, self.cache_dir, self.spec, self.source_batch_size, self.progress)

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None:
            return
        cache = ActivationCache(self.cache_root)
        expected = fingerprint_inputs(self.source, self.spec)
        found = cache.manifest["fingerprint_inputs"]
        if found != expected:
            diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            detail = "; ".join(
                f"{k}: cache has {found.get(k)!r}, config has {expected.get(k)!r}" for k in diff[:6]
            )
            raise CacheMismatchError(
                f"the cache at {cache.root} was built for another configuration ({detail}). Point "
                "data.cache_path elsewhere, or drop it to build a cache for this configuration."
            )
        self.cache = cache

    def _world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _loader(self, split: str, shuffle: bool, batch_size: int, drop_last: bool) -> DataLoader:
        if self.cache is None:
            self.setup()
        rows = self.cache.rows(split)
        rank, world = self._world()
        if len(rows) < world:  # a rank without rows would skip DDP's collectives and hang the others
            raise ValueError(
                f"{split}: {len(rows)} sequences for {world} devices; every device needs at least one "
                f"(raise data.{'val_sequences' if split == 'val' else 'n_sequences'})"
            )
        if split == "train":
            return self._train_loader(rank, world, batch_size)
        sampler = ShardedRowSampler(len(rows), shuffle, self.seed, rank, world, drop_last)
        if drop_last and len(sampler) < batch_size:
            raise ValueError(
                f"{split}: {len(sampler)} sequences per device is less than one batch of {batch_size}; "
                "cache more sequences or lower data.batch_size"
            )
        return DataLoader(
            RowDataset(self.cache, rows),
            sampler=sampler,
            batch_size=batch_size,
            drop_last=drop_last,
            collate_fn=_already_batched,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _train_loader(self, rank: int, world: int, batch_size: int) -> ResumableDataLoader:
        sampler = BlockShuffleSampler(
            self.cache.shard_ranges("train"),
            batch_size,
            self.block_rows,
            self.shuffle_buffer_rows,
            shuffle=True,
            seed=self.seed,
            rank=rank,
            world_size=world,
            drop_last=True,
        )
        if sampler.n_batches() < 1:
            raise ValueError(
                f"train: {sampler.n // world} sequences per device is less than one batch of {batch_size}; "
                "cache more sequences or lower data.batch_size"
            )
        workers = self.num_workers
        return ResumableDataLoader(
            WindowDataset(self.cache),
            sampler,
            batches_done=self._train_batches_done,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=1 if workers > 0 else None,  # a window is many batches of work
            pin_memory=torch.cuda.is_available(),
        )

    def _train_batches_done(self) -> int:
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, batch_size=self.batch_size, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, batch_size=self.val_batch_size, drop_last=False)

    # ------------------------------------------------------------------ what the model needs
    @property
    def stats(self) -> dict:
        """``mean_sq_norm`` and ``mean`` of the training activations (valid tokens)."""
        if self.cache is None:
            self.setup()
        return self.cache.stats

    @property
    def ground_truth(self) -> dict[str, np.ndarray]:
        if self.cache is None:
            self.setup()
        return self.cache.ground_truth()

    def steps_per_epoch(self) -> int:
        _, world = self._world()
        return max(1, math.floor(self.spec.n_sequences / world / self.batch_size))

    def teardown(self, stage: str | None = None) -> None:
        if self.cache is not None:
            self.cache.close()
