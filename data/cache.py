"""The HDF5 activation-sequence cache (a public format, docs/design.md §5): :class:`ActivationCache` reads it.

The format (dtypes, manifest, checksums) is in :mod:`data.cache_format`, the writer (:func:`build_cache`)
in :mod:`data.cache_writer`; the names users type are in :mod:`data` (``data.CacheSpec``, ``data.build_cache``).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch

from data.cache_format import (
    FORMAT_VERSION,
    SPLITS,
    CacheMismatchError,
    CacheReadError,
    check_manifest,
    from_storage,
    read_context,
    read_manifest,
    static_ground_truth_sha256,
)
from mtsae.evals.ground_truth import GroundTruth

__all__ = ["ActivationCache"]


class ActivationCache:
    """Read access to a finished cache directory. Safe to use from DataLoader worker processes.

    HDF5 files are opened lazily in each process (``h5py`` handles must not cross a fork).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"no activation cache at {self.root} (missing manifest.json)")
        self.manifest = read_manifest(mpath)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"{self.root} has cache format {self.manifest.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}; rebuild the cache"
            )
        if not self.manifest.get("complete"):
            raise CacheMismatchError(
                f"the cache at {self.root} is incomplete; run the build again (it resumes) before training"
            )
        check_manifest(self.root, self.manifest)
        starts = np.cumsum([0] + [s["n_sequences"] for s in self.manifest["shards"]])
        self._shard_start = starts  # global row index of each shard's first row
        self._files: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------------ metadata
    @property
    def d_in(self) -> int:
        return self.manifest["d_in"]

    @property
    def ctx_len(self) -> int:
        return self.manifest["ctx_len"]

    @property
    def stats(self) -> dict:
        return self.manifest["stats"]

    def __len__(self) -> int:
        return int(self._shard_start[-1])

    def rows(self, split: str) -> np.ndarray:
        """Global row indices of ``split`` (``train`` or ``val``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        out = [
            np.arange(self._shard_start[i], self._shard_start[i + 1])
            for i, s in enumerate(self.manifest["shards"])
            if s["split"] == split
        ]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def shard_ranges(self, split: str) -> list[tuple[int, int]]:
        """Global ``(start, stop)`` rows of each shard of ``split``, in shard order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [
            (int(self._shard_start[i]), int(self._shard_start[i + 1]))
            for i, s in enumerate(self.manifest["shards"])
            if s["split"] == split
        ]

    # ------------------------------------------------------------------ reading
    def _file(self, i: int) -> h5py.File:
        if os.getpid() != self._pid:  # forked into a worker: never reuse the parent's handles
            self._files, self._pid = {}, os.getpid()
        if i not in self._files:
            self._files[i] = h5py.File(self.root / self.manifest["shards"][i]["file"], "r")
        return self._files[i]

    def read(self, rows: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """Rows by global index, in the order given: ``acts [n, T, d]``, ``tokens [n, T]``, ``valid [n, T]``.

        Runs of consecutive indices are read as one contiguous slice each (see :meth:`read_ranges`).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        uniq, inverse = np.unique(rows, return_inverse=True)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1  # where a run of consecutive rows ends
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(uniq, breaks) if r.size]
        data = self.read_ranges(runs)
        if np.array_equal(inverse, np.arange(len(uniq))):
            return data  # already in the order asked for
        back = torch.from_numpy(inverse.reshape(-1))
        return {k: v[back] for k, v in data.items()}

    def read_ranges(self, ranges: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Rows ``lo .. hi - 1`` of every global ``(lo, hi)`` range, concatenated in the order given.

        Each range is read as contiguous slices (one per shard it touches) straight into one
        preallocated array per dataset: the HDF5 chunks (one row each) are read in file order and
        every one is checked against its fletcher32 checksum. This is the loader's read path.
        """
        n = 0
        for lo, hi in ranges:
            if not 0 <= lo <= hi <= len(self):
                raise IndexError(f"row range ({lo}, {hi}) out of [0, {len(self)}]")
            n += hi - lo
        out: dict[str, np.ndarray] = {}
        torch_dtype = None
        pos = 0
        for lo, hi in ranges:
            while lo < hi:
                i = int(np.searchsorted(self._shard_start, lo, side="right") - 1)
                a, b = (
                    lo - int(self._shard_start[i]),
                    min(hi, int(self._shard_start[i + 1])) - int(self._shard_start[i]),
                )
                path = self.root / self.manifest["shards"][i]["file"]
                with read_context(path, "(file)", (a, b)):
                    h5 = self._file(i)
                    if torch_dtype is None:
                        torch_dtype = h5["acts"].attrs["torch_dtype"]
                for k in ("acts", "tokens", "valid"):
                    with read_context(path, k, (a, b)):
                        ds = h5[k]
                        if k not in out:
                            out[k] = np.empty((n, *ds.shape[1:]), dtype=ds.dtype)
                        if b > a:
                            ds.read_direct(out[k][pos : pos + b - a], np.s_[a:b])
                pos += b - a
                lo += b - a
        if torch_dtype is None:  # no rows asked for: empty arrays of the right shapes
            with read_context(self.root / self.manifest["shards"][0]["file"], "(file)", (0, 0)):
                h5 = self._file(0)
                torch_dtype = h5["acts"].attrs["torch_dtype"]
                out = {
                    k: np.empty((0, *h5[k].shape[1:]), dtype=h5[k].dtype) for k in ("acts", "tokens", "valid")
                }
        return {
            "acts": from_storage(out["acts"], torch_dtype),
            "tokens": torch.from_numpy(out["tokens"]),
            "valid": torch.from_numpy(out["valid"]),
        }

    def ground_truth(self) -> GroundTruth | None:
        """Static ground truth (true feature directions, groups; names as ``str``) stored in the shards,
        checked against its checksum; None when the source planted none."""
        path = self.root / self.manifest["shards"][0]["file"]
        with read_context(path, "ground_truth", (0, 0)):
            h5 = self._file(0)
            if "ground_truth" not in h5:
                return None
            out = {k: v[()] for k, v in h5["ground_truth"].items() if k != "coefficients"}
        if static_ground_truth_sha256(out) != self.manifest.get("static_ground_truth_sha256"):
            raise CacheReadError(
                f"cannot read {path}: dataset 'ground_truth' does not match the checksum in manifest.json "
                f"(static_ground_truth_sha256): the shard is corrupted; `mtsae cache verify {self.root} "
                "--repair` deletes bad shards so that the next build regenerates them"
            )
        return GroundTruth.from_arrays(out)

    def ground_truth_rows(self, name: str, rows: np.ndarray | list[int]) -> np.ndarray:
        """Per-row ground truth ``name`` (e.g. ``coefficients``) for the given global rows."""
        out = []
        for r in np.asarray(rows, dtype=np.int64):
            i = int(np.searchsorted(self._shard_start, r, side="right") - 1)
            local = int(r - self._shard_start[i])
            path = self.root / self.manifest["shards"][i]["file"]
            with read_context(path, f"ground_truth/{name}", (local, local + 1)):
                out.append(self._file(i)[f"ground_truth/{name}"][local])
        return np.stack(out)

    def close(self) -> None:
        for h5 in self._files.values():
            h5.close()
        self._files = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state
