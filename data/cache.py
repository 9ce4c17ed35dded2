"""The HDF5 activation-sequence cache (a public format, DESIGN §4): writer and reader.

Layout: ``<cache_dir>/<fingerprint>/manifest.json`` and ``shard_00000.h5`` ... Each shard holds
``acts [n, T, d_in]`` (bf16 stored as its ``uint16`` bits with attribute ``torch_dtype = "bfloat16"``;
float16 / float32 natively), ``tokens [n, T] int32``, ``valid [n, T] bool`` and optional
``ground_truth/...``. Every shard is written as ``*.tmp``, flushed, fsynced, closed and renamed; the
manifest is rewritten atomically after each shard, so an interrupted build resumes at the first missing
shard and never rewrites a finished one. Row order inside a sequence is the temporal order.

Integrity: the manifest records the SHA-256 of every shard file, of the static ground truth and of the
statistics. Opening a cache checks that every listed shard exists with the recorded row count, that no
file is listed twice, that the splits add up, and that the statistics match their checksum;
:func:`data.verify.verify_cache` (``mtsae cache verify``) re-reads everything.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
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

from data.sources import ActivationSource, SourceChunk
from mtsae.progress import progress_bar

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
    "CacheWriteError",
    "read_context",
    "read_manifest",
    "check_manifest",
    "file_sha256",
    "stats_sha256",
    "static_ground_truth_sha256",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: checksums of shards, static ground truth and statistics
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SPLITS = ("train", "val")


class CacheMismatchError(ValueError):
    """The cache on disk was built for another configuration."""


class CacheReadError(OSError):
    """A shard could not be read; the message names the file, the dataset and the rows."""


class CacheWriteError(OSError):
    """A shard could not be written (disk full, quota, permissions); the message names the file and what to do."""


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


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stats_sha256(stats: dict) -> str:
    """SHA-256 of the manifest's ``stats`` (canonical JSON)."""
    return hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()


def static_ground_truth_sha256(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the static ground-truth arrays."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, arr.dtype.str, list(arr.shape)]).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CacheWriteError(
            err.errno, f"cannot write {path}: {err.strerror or err}. Free space on that disk and run again"
        ) from None


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.h5"


def _write_shard(path: Path, chunks: list[SourceChunk], static_gt: dict, dtype: str) -> dict:
    """Write one shard (via ``*.tmp``, fsync, rename); return its manifest entry with statistics.

    A failed write (``OSError``: disk full, quota, ...) closes the file, removes the ``*.tmp`` and
    raises :class:`CacheWriteError` naming the file; the finished shards are untouched, so the build
    resumes once space is freed.
    """
    acts = torch.cat([c.acts for c in chunks])  # [n, T, d_in]
    tokens = torch.cat([c.tokens for c in chunks]).to(torch.int32)
    valid = torch.cat([c.valid for c in chunks]).to(torch.bool)
    n = acts.shape[0]
    stored = to_storage(acts, dtype)
    # statistics of the stored values (what training will read), over valid tokens, float64 sums
    x = from_storage(stored, dtype).float()[valid]  # [n_valid, d]
    tmp = path.with_name(path.name + ".tmp")
    gt_rows = {k: np.concatenate([c.ground_truth[k] for c in chunks]) for k in chunks[0].ground_truth}
    # HDF5 writes the shard into memory; Python writes the bytes to disk. A full disk then raises an
    # ordinary OSError here, instead of failing inside HDF5's own writes, where h5py can only report it
    # while deallocating objects and the process later crashes (segmentation fault)
    image = io.BytesIO()
    _write_h5(image, stored, tokens.numpy(), valid.numpy(), static_gt, gt_rows, dtype)
    data = image.getbuffer()
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename makes it a finished shard
        os.replace(tmp, path)
    except OSError as err:
        reason = f"{os.strerror(err.errno)} (errno {err.errno})" if err.errno else str(err)
        code = err.errno
    else:
        return {
            "file": path.name,
            "n_sequences": n,
            "sha256": hashlib.sha256(data).hexdigest(),
            "n_valid_tokens": int(x.shape[0]),
            "sum_sq_norm": float(x.pow(2).sum(dtype=torch.float64)),
            "sum": x.sum(0, dtype=torch.float64).tolist(),
        }
    tmp.unlink(missing_ok=True)
    hint = " Free space on that disk (or point data.cache_dir elsewhere) and run again: the build resumes"
    raise CacheWriteError(
        code,
        f"cannot write cache shard {tmp}: {reason}.{hint} at this shard; finished shards are kept.",
    )


def _write_h5(
    target: io.BytesIO,
    stored: np.ndarray,
    tokens: np.ndarray,
    valid: np.ndarray,
    static_gt: dict[str, np.ndarray],
    gt_rows: dict[str, np.ndarray],
    dtype: str,
) -> None:
    n, T, d = stored.shape
    h5 = h5py.File(target, "w", track_order=False)
    try:
        ds = h5.create_dataset("acts", data=stored, chunks=(1, T, d), fletcher32=True, track_times=False)
        ds.attrs["torch_dtype"] = dtype
        del ds
        h5.create_dataset("tokens", data=tokens, fletcher32=True, chunks=(1, T), track_times=False)
        h5.create_dataset("valid", data=valid, fletcher32=True, chunks=(1, T), track_times=False)
        for name, arr in {**static_gt, **gt_rows}.items():
            kw = {}
            if name in gt_rows and arr.ndim >= 2:
                kw = dict(chunks=(1, *arr.shape[1:]), compression="gzip", compression_opts=1, fletcher32=True)
            h5.create_dataset(f"ground_truth/{name}", data=arr, track_times=False, **kw)
        h5.flush()
    finally:
        h5.close()  # explicitly, also when a write failed


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
        manifest = read_manifest(mpath)
        if manifest.get("fingerprint_inputs") != inputs:
            raise CacheMismatchError(f"{mpath} does not belong to this configuration (hash collision?)")
        if manifest.get("complete"):
            return root
        # keep the finished shards whose files are on disk (a repaired cache has gaps: exactly the
        # deleted shards are regenerated)
        done = [e for e in manifest["shards"] if (root / e["file"]).exists()]
    for stale in root.glob("*.tmp"):
        stale.unlink()
    source.check()
    static_gt = source.static_ground_truth()
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
        "static_ground_truth_sha256": static_ground_truth_sha256(static_gt),
        "complete": False,
    }
    manifest["stats_sha256"] = stats_sha256(manifest["stats"])
    have = {e["file"] for e in done}
    todo = [(i, split, a, b) for i, (split, a, b) in enumerate(plan) if _shard_name(i) not in have]
    if done:
        log.info("resuming cache build in %s: %d of %d shards to write", root, len(todo), len(plan))
    n_rows = sum(b - a for _, _, a, b in todo)
    bar = progress_bar(total=n_rows, unit="seq", desc="caching activations", disable=not progress)

    def record(write: Future, i: int, split: str) -> None:
        entry = write.result()
        if any(s["file"] == entry["file"] for s in manifest["shards"]):
            return  # already recorded (an interrupt landed while the manifest was being written)
        entry["split"] = split
        manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: e["file"])  # plan order
        manifest["stats"] = _stats(manifest["shards"])
        manifest["stats_sha256"] = stats_sha256(manifest["stats"])
        manifest["complete"] = len(manifest["shards"]) == len(plan)
        _write_json_atomic(mpath, manifest)

    # shard i is written by a background thread while shard i + 1 is generated (the source's forward
    # pass releases the GIL); the manifest is updated in order as each write finishes
    pending: tuple[Future, int, str] | None = None
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
            for i, split, a, b in todo:
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
    if not todo and not manifest["complete"]:  # every shard was already there
        manifest["complete"] = True
        _write_json_atomic(mpath, manifest)
    return root


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed ``manifest.json``; an unreadable or truncated one raises a :class:`CacheMismatchError` naming it."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheMismatchError(
            f"the cache manifest {path} is not valid JSON ({err}); it is truncated or was edited. "
            f"Delete the folder {path.parent} and build the cache again"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise CacheMismatchError(
            f"the cache manifest {path} has no list of shards; delete {path.parent} and rebuild"
        )
    return manifest


def check_manifest(root: Path, manifest: dict) -> None:
    """Open-time checks of a finished cache (cheap: shard metadata only, no data read).

    Every listed shard exists, holds the recorded number of rows and is listed once; the splits add
    up to the configured ``n_sequences`` / ``val_sequences`` with the training shards first; the
    statistics match their checksum and the per-shard sums they derive from.
    """
    where = f"the cache at {root}"
    rebuild = f"delete {root} and build again, or run `mtsae cache verify {root} --repair`"
    shards = manifest["shards"]
    files = [e.get("file") for e in shards]
    dup = sorted({f for f in files if files.count(f) > 1})
    if dup:
        raise CacheMismatchError(f"{where}: the manifest lists {dup} more than once; {rebuild}")
    splits = [e.get("split") for e in shards]
    if any(s not in _SPLITS for s in splits) or splits != sorted(splits, key=_SPLITS.index):
        raise CacheMismatchError(
            f"{where}: the manifest's shard splits {splits} are not training shards followed by validation "
            f"shards; {rebuild}"
        )
    for split, key in (("train", "n_sequences"), ("val", "val_sequences")):
        n = sum(int(e["n_sequences"]) for e in shards if e["split"] == split)
        want = manifest["fingerprint_inputs"].get(key, manifest.get(key))
        if n != want or manifest.get(key) != want:
            raise CacheMismatchError(
                f"{where}: the manifest's {split} shards hold {n} rows but the cache was built with "
                f"{key}={want}; {rebuild}"
            )
    if manifest.get("stats_sha256") != stats_sha256(manifest["stats"]):
        raise CacheMismatchError(
            f"{where}: the statistics in manifest.json (mean_sq_norm, mean) do not match their checksum "
            f"(stats_sha256): they were edited or corrupted; {rebuild}"
        )
    recomputed = _stats(shards)
    if recomputed["n_valid_tokens"] != manifest["stats"].get("n_valid_tokens") or not np.isclose(
        recomputed["mean_sq_norm"] or 0.0, manifest["stats"].get("mean_sq_norm") or 0.0, rtol=1e-9
    ):
        raise CacheMismatchError(
            f"{where}: the statistics in manifest.json do not match the per-shard sums; {rebuild}"
        )
    for e in shards:
        path = root / e["file"]
        if not path.is_file():
            raise CacheMismatchError(f"{where}: shard {path} listed in manifest.json is missing; {rebuild}")
        with read_context(path, "acts", (0, int(e["n_sequences"]))):
            with h5py.File(path, "r") as h5:
                n = h5["acts"].shape[0]
        if n != e["n_sequences"]:
            raise CacheMismatchError(
                f"{where}: shard {path} holds {n} rows, manifest.json says {e['n_sequences']}; {rebuild}"
            )


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
        """Static ground truth (true feature directions, groups) stored in the shards, checked against its checksum."""
        path = self.root / self.manifest["shards"][0]["file"]
        with read_context(path, "ground_truth", (0, 0)):
            h5 = self._file(0)
            if "ground_truth" not in h5:
                return {}
            out = {k: v[()] for k, v in h5["ground_truth"].items() if k != "coefficients"}
        if static_ground_truth_sha256(out) != self.manifest.get("static_ground_truth_sha256"):
            raise CacheReadError(
                f"cannot read {path}: dataset 'ground_truth' does not match the checksum in manifest.json "
                f"(static_ground_truth_sha256): the shard is corrupted; `mtsae cache verify {self.root} "
                "--repair` deletes bad shards so that the next build regenerates them"
            )
        return out

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
