"""The HDF5 activation-sequence cache (a public format, DESIGN §4): writer and reader.

Layout: ``<cache_dir>/<fingerprint>/manifest.json`` and ``shard_00000.h5`` ... Each shard holds
``acts [n, T, d_in]`` (bf16 stored as its ``uint16`` bits with attribute ``torch_dtype = "bfloat16"``;
float16 / float32 natively), ``tokens [n, T] int32``, ``valid [n, T] bool`` and optional
``ground_truth/...``. Every shard is written as ``*.tmp``, flushed, closed and renamed; the manifest is
rewritten atomically after each shard, so an interrupted build resumes at the first missing shard
and never rewrites a finished one. Row order inside a sequence is the temporal order.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from data.sources import ActivationSource, SourceChunk

__all__ = [
    "FORMAT_VERSION",
    "DTYPES",
    "CacheSpec",
    "ActivationCache",
    "build_cache",
    "to_storage",
    "from_storage",
    "CacheMismatchError",
    "CacheReadError",
    "read_context",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SPLITS = ("train", "val")


class CacheMismatchError(ValueError):
    """The cache on disk was built for another configuration."""


class CacheReadError(OSError):
    """A shard could not be read; the message names the file, the dataset and the rows."""


def _row_range(rows: np.ndarray | slice | tuple[int, int]) -> str:
    if isinstance(rows, slice):
        return f"{rows.start}..{rows.stop - 1}"
    if isinstance(rows, tuple):
        return f"{rows[0]}..{rows[1] - 1}"
    rows = np.asarray(rows)
    return f"{rows.min()}..{rows.max()}" if rows.size else "(none)"


@contextmanager
def read_context(
    path: str | os.PathLike, dataset: str, rows: np.ndarray | slice | tuple[int, int]
) -> Iterator[None]:
    """Turn an h5py read failure into a :class:`CacheReadError` naming file, dataset and local rows.

    Every read of a shard goes through this, so a checksum failure or a truncated file says where it is.
    """
    try:
        yield
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, CacheReadError):
            raise
        raise CacheReadError(
            f"cannot read {Path(path)}: dataset {dataset!r}, rows {_row_range(rows)} (shard-local): {err}. "
            f"The shard is corrupted or truncated; `mtsae cache verify {Path(path).parent} --repair` "
            f"deletes bad shards so that the next build regenerates them"
        ) from err


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """Convert activations to the array stored in HDF5 (bf16 -> its uint16 bits, bit-exact)."""
    t = acts.detach().cpu().to(DTYPES[dtype])
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_storage(arr: np.ndarray, torch_dtype: str) -> torch.Tensor:
    """Inverse of :func:`to_storage`."""
    if torch_dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


@dataclass(frozen=True)
class CacheSpec:
    """Everything about a cache that is not the source: how many rows, how stored."""

    n_sequences: int
    """training rows"""
    val_sequences: int
    """validation rows (generated after the training rows, stored in their own shards)"""
    shard_size: int
    """rows per shard"""
    dtype: str
    """storage dtype: bfloat16, float16 or float32"""

    def __post_init__(self) -> None:
        if self.n_sequences < 1 or self.val_sequences < 0:
            raise ValueError(
                f"need n_sequences >= 1 and val_sequences >= 0, got {self.n_sequences}, {self.val_sequences}"
            )
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    def shard_plan(self) -> list[tuple[str, int, int]]:
        """``(split, first_row, stop_row)`` of every shard, training shards first."""
        plan, lo = [], 0
        for split, n in (("train", self.n_sequences), ("val", self.val_sequences)):
            stop = lo + n
            for a in range(lo, stop, self.shard_size):
                plan.append((split, a, min(stop, a + self.shard_size)))
            lo = stop
        return plan


def fingerprint_inputs(source: ActivationSource, spec: CacheSpec) -> dict:
    return {
        **source.fingerprint(),
        "n_sequences": spec.n_sequences,
        "val_sequences": spec.val_sequences,
        "shard_size": spec.shard_size,
        "dtype": spec.dtype,
        "format_version": FORMAT_VERSION,
    }


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.h5"


def _write_shard(path: Path, chunks: list[SourceChunk], static_gt: dict, dtype: str) -> dict:
    """Write one shard (via ``*.tmp`` + rename); return its manifest entry with statistics."""
    acts = torch.cat([c.acts for c in chunks])  # [n, T, d_in]
    tokens = torch.cat([c.tokens for c in chunks]).to(torch.int32)
    valid = torch.cat([c.valid for c in chunks]).to(torch.bool)
    n, T, d = acts.shape
    stored = to_storage(acts, dtype)
    # statistics of the stored values (what training will read), over valid tokens, float64 sums
    x = from_storage(stored, dtype).float()[valid]  # [n_valid, d]
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", track_order=False) as h5:
        ds = h5.create_dataset("acts", data=stored, chunks=(1, T, d), fletcher32=True, track_times=False)
        ds.attrs["torch_dtype"] = dtype
        h5.create_dataset("tokens", data=tokens.numpy(), fletcher32=True, chunks=(1, T), track_times=False)
        h5.create_dataset("valid", data=valid.numpy(), fletcher32=True, chunks=(1, T), track_times=False)
        gt_rows = {k: np.concatenate([c.ground_truth[k] for c in chunks]) for k in chunks[0].ground_truth}
        for name, arr in {**static_gt, **gt_rows}.items():
            kw = {}
            if name in gt_rows and arr.ndim >= 2:
                kw = dict(chunks=(1, *arr.shape[1:]), compression="gzip", compression_opts=1, fletcher32=True)
            h5.create_dataset(f"ground_truth/{name}", data=arr, track_times=False, **kw)
        h5.flush()
    os.replace(tmp, path)
    return {
        "file": path.name,
        "n_sequences": n,
        "n_valid_tokens": int(x.shape[0]),
        "sum_sq_norm": float(x.pow(2).sum(dtype=torch.float64)),
        "sum": x.sum(0, dtype=torch.float64).tolist(),
    }


def _stats(shards: list[dict]) -> dict:
    train = [s for s in shards if s["split"] == "train"]
    n = sum(s["n_valid_tokens"] for s in train)
    if n == 0:
        return {"n_valid_tokens": 0, "mean_sq_norm": None, "mean": None}
    total = np.sum([np.asarray(s["sum"]) for s in train], axis=0)
    return {
        "n_valid_tokens": n,
        "mean_sq_norm": sum(s["sum_sq_norm"] for s in train) / n,
        "mean": (total / n).tolist(),
    }


def build_cache(
    source: ActivationSource,
    cache_dir: str | os.PathLike,
    spec: CacheSpec,
    source_batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Build (or finish building) the cache of ``source``; return its directory.

    Resumes at the first missing shard of an interrupted build; finished shards are never rewritten.
    """
    inputs = fingerprint_inputs(source, spec)
    root = Path(cache_dir) / fingerprint(inputs)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        try:  # one builder at a time: a second job on the same cache waits, then finds it done
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process is building the cache in %s; waiting for it", root)
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(source, root, inputs, spec, source_batch_size, progress)


def _build_locked(
    source: ActivationSource,
    root: Path,
    inputs: dict,
    spec: CacheSpec,
    source_batch_size: int,
    progress: bool,
) -> Path:
    mpath = root / "manifest.json"
    plan = spec.shard_plan()
    done: list[dict] = []
    if mpath.exists():
        manifest = json.loads(mpath.read_text())
        if manifest.get("fingerprint_inputs") != inputs:
            raise CacheMismatchError(f"{mpath} does not belong to this configuration (hash collision?)")
        if manifest.get("complete"):
            return root
        for entry in manifest["shards"]:  # keep the finished prefix whose files are on disk
            if not (root / entry["file"]).exists():
                break
            done.append(entry)
    for stale in root.glob("*.tmp"):
        stale.unlink()
    source.check()
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": root.name,
        "fingerprint_inputs": inputs,
        "source": source.kind,
        "d_in": source.d_in,
        "ctx_len": source.ctx_len,
        "dtype": spec.dtype,
        "n_sequences": spec.n_sequences,
        "val_sequences": spec.val_sequences,
        "shards": done,
        "stats": _stats(done),
        "complete": False,
    }
    todo = plan[len(done) :]
    if done:
        log.info("resuming cache build in %s at shard %d of %d", root, len(done), len(plan))
    static_gt = source.static_ground_truth()
    n_rows = sum(b - a for _, a, b in todo)
    bar = tqdm(total=n_rows, unit="seq", desc="caching activations", disable=not progress, dynamic_ncols=True)

    def record(write: Future, i: int, split: str) -> None:
        entry = write.result()
        if any(s["file"] == entry["file"] for s in manifest["shards"]):
            return  # already recorded (an interrupt landed while the manifest was being written)
        entry["split"] = split
        manifest["shards"].append(entry)
        manifest["stats"] = _stats(manifest["shards"])
        manifest["complete"] = i == len(plan) - 1
        _write_json_atomic(mpath, manifest)

    # shard i is written by a background thread while shard i + 1 is generated (the source's forward
    # pass releases the GIL); the manifest is updated in order as each write finishes
    pending: tuple[Future, int, str] | None = None
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
            for i, (split, a, b) in enumerate(todo, start=len(done)):
                chunks = []
                for chunk in source.generate(a, b, source_batch_size):
                    chunks.append(chunk)
                    bar.update(len(chunk))
                if pending is not None:
                    record(*pending)
                    pending = None
                pending = (
                    writer.submit(_write_shard, root / _shard_name(i), chunks, static_gt, spec.dtype),
                    i,
                    split,
                )
            if pending is not None:
                record(*pending)
                pending = None
    finally:
        if pending is not None and pending[0].exception() is None:
            record(*pending)  # an interrupted build keeps the last shard that was fully written
        bar.close()
        source.close()
    if not plan[len(done) :] and not manifest["complete"]:  # every shard was already there
        manifest["complete"] = True
        _write_json_atomic(mpath, manifest)
    return root


class ActivationCache:
    """Read access to a finished cache directory. Safe to use from DataLoader worker processes.

    HDF5 files are opened lazily in each process (``h5py`` handles must not cross a fork).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"no activation cache at {self.root} (missing manifest.json)")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"{self.root} has cache format {self.manifest.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}; rebuild the cache"
            )
        if not self.manifest.get("complete"):
            raise CacheMismatchError(
                f"the cache at {self.root} is incomplete; run the build again (it resumes) before training"
            )
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
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        out = [
            np.arange(self._shard_start[i], self._shard_start[i + 1])
            for i, s in enumerate(self.manifest["shards"])
            if s["split"] == split
        ]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def shard_ranges(self, split: str) -> list[tuple[int, int]]:
        """Global ``(start, stop)`` rows of each shard of ``split``, in shard order."""
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
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

    def ground_truth(self) -> dict[str, np.ndarray]:
        """Static ground truth (true feature directions, groups) stored in the shards, if any."""
        h5 = self._file(0)
        if "ground_truth" not in h5:
            return {}
        return {k: v[()] for k, v in h5["ground_truth"].items() if k != "coefficients"}

    def ground_truth_rows(self, name: str, rows: np.ndarray | list[int]) -> np.ndarray:
        """Per-row ground truth ``name`` (e.g. ``coefficients``) for the given global rows."""
        out = []
        for r in np.asarray(rows, dtype=np.int64):
            i = int(np.searchsorted(self._shard_start, r, side="right") - 1)
            out.append(self._file(i)[f"ground_truth/{name}"][r - self._shard_start[i]])
        return np.stack(out)

    def close(self) -> None:
        for h5 in self._files.values():
            h5.close()
        self._files = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state
