"""``ActivationDataModule``: builds the activation cache once and serves ``[B, T, d_in]`` batches.

- ``prepare_data`` (rank 0 of each node) builds the cache with a progress bar, resuming an
  interrupted build at the first missing shard.
- ``setup`` opens the cache and checks its manifest against the configuration.
- Batches are whole sequences: rows are shuffled across the dataset each epoch, never within a row.
  Every rank reads a disjoint set of rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

__all__ = ["ActivationDataModule", "ResumableDataLoader", "RowDataset", "ShardedRowSampler"]


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


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside an epoch is saved in checkpoints.

    Lightning stores ``state_dict()`` with every checkpoint and hands it back to ``load_state_dict()``
    before iterating again, so a run resumed mid-epoch continues with the rows the interrupted run had
    not yet trained on, in the same order, instead of starting the epoch over. ``batches_done`` returns
    the number of batches of the current epoch already trained on (Lightning's own count, which does
    not include batches prefetched but not yet used).
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": int(self.batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip_once(state["batches_done"] * self.batch_size)


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
        num_workers: DataLoader worker processes.
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
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
        sampler = ShardedRowSampler(len(rows), shuffle, self.seed, rank, world, drop_last)
        if drop_last and len(sampler) < batch_size:
            raise ValueError(
                f"{split}: {len(sampler)} sequences per device is less than one batch of {batch_size}; "
                "cache more sequences or lower data.batch_size"
            )
        loader_cls, extra = DataLoader, {}
        if split == "train":
            loader_cls, extra = ResumableDataLoader, {"batches_done": self._train_batches_done}
        return loader_cls(
            RowDataset(self.cache, rows),
            sampler=sampler,
            batch_size=batch_size,
            drop_last=drop_last,
            collate_fn=_already_batched,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **extra,
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
