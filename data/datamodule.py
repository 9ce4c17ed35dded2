"""``ActivationDataModule``: builds the activation cache once and serves ``[B, T, d_in]`` batches.

- ``prepare_data`` (rank 0 of each node) builds the cache with a progress bar, resuming an
  interrupted build at the first missing shard.
- ``setup`` opens the cache and checks its manifest against the configuration.
- Batches are whole sequences, shuffled across rows each epoch, never within a row. Every rank reads
  a disjoint set of rows.

The samplers and loaders are in :mod:`data.loading`; how training reads rows is described there.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from data.cache import ActivationCache
from data.cache_format import CacheMismatchError, CacheSpec, fingerprint, fingerprint_inputs
from data.cache_writer import build_cache
from data.loading import (
    BlockShuffleSampler,
    ResumableDataLoader,
    RowDataset,
    ShardedRowSampler,
    WindowDataset,
    already_batched,
)
from data.sources import ActivationSource
from mtsae.evals.ground_truth import GroundTruth

__all__ = ["ActivationDataModule"]


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
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"data.val_batch_size must be >= 1, got {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if source_batch_size < 1:
            raise ValueError(f"data.source_batch_size must be >= 1, got {source_batch_size}")
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

    def check_training_batches(self, world_size: int = 1) -> None:
        """Refuse, before the cache is built, a batch size that leaves a device without one training batch."""
        per_device = self.spec.n_sequences // world_size
        if self.batch_size > per_device:
            raise ValueError(
                f"data.batch_size ({self.batch_size}) is larger than the {per_device} training sequences per "
                f"device (data.n_sequences {self.spec.n_sequences} over {world_size} device(s)): not one "
                "training batch; lower data.batch_size or cache more sequences"
            )

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
            collate_fn=already_batched,
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

    def stats_without_sinks(self, max_norm_multiple: float, max_rows: int = 1024) -> dict:
        """``mean_sq_norm`` and ``mean`` of ``max_rows`` training rows spread evenly over the split, over the positions the
        activation-sink rule keeps (:func:`mtsae.sae.positions.ordinary_positions`, applied per training
        batch of ``batch_size`` rows, as in training). The cache's own statistics count every valid token, so
        a few sinks can dominate them (63% of the summed squared norm in SmolLM2's layer 20): the input
        scale ``E||c x||^2 = d_in`` then holds for the tokens the SAE actually reads."""
        from mtsae.sae.positions import ordinary_positions

        if self.cache is None:
            self.setup()
        rows = self.cache.rows("train")
        rows = rows[np.linspace(0, len(rows) - 1, min(max_rows, len(rows))).round().astype(np.int64)]
        total_sq, total, count = 0.0, None, 0
        try:
            for lo in range(0, len(rows), self.batch_size):
                batch = self.cache.read(rows[lo : lo + self.batch_size])
                x = batch["acts"].double()
                keep = ordinary_positions(x, batch["valid"], max_norm_multiple)
                xs = x[keep]  # [N, d_in]
                total_sq += float(xs.pow(2).sum())
                total = xs.sum(0) if total is None else total + xs.sum(0)
                count += xs.shape[0]
        finally:
            self.cache.close()  # h5py handles must not cross the fork of the loader's workers
        if count == 0:
            raise ValueError("no position of the first training rows passes the activation-sink rule")
        return {"mean_sq_norm": total_sq / count, "mean": (total / count).tolist(), "n_valid_tokens": count}

    @property
    def ground_truth(self) -> GroundTruth | None:
        """The planted features of a synthetic source (:meth:`data.cache.ActivationCache.ground_truth`)."""
        if self.cache is None:
            self.setup()
        return self.cache.ground_truth()

    def steps_per_epoch(self) -> int:
        _, world = self._world()
        return max(1, math.floor(self.spec.n_sequences / world / self.batch_size))

    def teardown(self, stage: str | None = None) -> None:
        if self.cache is not None:
            self.cache.close()
