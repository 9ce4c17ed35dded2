"""The HDF5 activation-sequence cache format (docs/design.md §5): dtypes, fingerprint, checksums, manifest.

Storage dtypes, the build settings (:class:`CacheSpec`) and their fingerprint, the checksums, and the
manifest's open-time checks, shared by the writer, the reader and ``mtsae cache verify``.

Layout: ``<cache_dir>/<fingerprint>/manifest.json`` and ``shard_00000.h5`` ... Each shard holds
``acts [n, T, d_in]`` (bf16 stored as its ``uint16`` bits with attribute ``torch_dtype = "bfloat16"``;
float16 / float32 natively), ``tokens [n, T] int32``, ``valid [n, T] bool`` and optional
``ground_truth/...``. Row order inside a sequence is the temporal order.

Integrity: the manifest records the SHA-256 of every shard file, of the static ground truth and of the
statistics. Opening a cache checks that every listed shard exists with the recorded row count, that no
file is listed twice, that the splits add up, and that the statistics match their checksum;
:func:`data.verify.verify_cache` (``mtsae cache verify``) re-reads everything.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from data.sources import ActivationSource
from mtsae.hashing import file_sha256

__all__ = [
    "FORMAT_VERSION",
    "DTYPES",
    "SPLITS",
    "CacheSpec",
    "CacheMismatchError",
    "CacheReadError",
    "CacheWriteError",
    "NonFiniteActivationsError",
    "CacheBuildInterrupted",
    "to_storage",
    "from_storage",
    "read_context",
    "fingerprint_inputs",
    "fingerprint",
    "stats_sha256",
    "static_ground_truth_sha256",
    "manifest_stats",
    "write_json_atomic",
    "read_manifest",
    "check_manifest",
    "check_shard_identity",
    "manifest_problem",
    "shard_layout_problem",
    "SHARD_IDENTITY",
    "STORED_DTYPES",
]

FORMAT_VERSION = 2  # 2: checksums of shards, static ground truth and statistics
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SPLITS = ("train", "val")


class CacheMismatchError(ValueError):
    """The cache on disk was built for another configuration."""


class CacheReadError(OSError):
    """A shard could not be read; the message names the file, the dataset and the rows."""


class CacheWriteError(OSError):
    """A shard could not be written (disk full, quota, permissions); the message names the file and what to do."""


class CacheBuildInterrupted(Exception):
    """SIGTERM arrived while the cache was being built; the finished shards are kept."""


class NonFiniteActivationsError(ValueError):
    """A source produced a NaN or infinite activation at a valid position; the message names the shard,
    the row and the position."""


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


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON via ``*.tmp``, fsync and rename; a failed write raises :class:`CacheWriteError`."""
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


def manifest_stats(shards: list[dict]) -> dict:
    """The manifest's ``stats`` (token count, mean squared norm, mean) from the per-shard sums of the training shards."""
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
    rebuild = f"delete {root} and build again"  # --repair deletes bad shards; it cannot mend a manifest
    problem = manifest_problem(manifest)
    if problem is not None:
        raise CacheMismatchError(f"{where}: manifest.json {problem}; {rebuild}")
    shards = manifest["shards"]
    files = [e.get("file") for e in shards]
    dup = sorted({f for f in files if files.count(f) > 1})
    if dup:
        raise CacheMismatchError(f"{where}: the manifest lists {dup} more than once; {rebuild}")
    splits = [e.get("split") for e in shards]
    if any(s not in SPLITS for s in splits) or splits != sorted(splits, key=SPLITS.index):
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
    recomputed = manifest_stats(shards)
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
                layout = shard_layout_problem(h5, e["n_sequences"], manifest)
                identity = {k: h5.attrs.get(k) for k in SHARD_IDENTITY}
        if layout is not None:
            raise CacheMismatchError(
                f"{where}: shard {path} {layout}; `mtsae cache verify {root} --repair` deletes it so that the "
                "next build regenerates it"
            )
        check_shard_identity(path, e, identity, manifest.get("fingerprint", root.name))


#: the numpy dtype ``acts`` is stored as, per storage dtype
STORED_DTYPES = {
    "float32": np.dtype("float32"),
    "float16": np.dtype("float16"),
    "bfloat16": np.dtype("uint16"),
}


def manifest_problem(manifest: dict) -> str | None:
    """What makes a parsed manifest unusable (missing or mistyped fields, unsafe file names), or None.

    Checked before any size in it is used, so a hostile or damaged manifest is one message.
    """

    def count(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    for key in ("d_in", "ctx_len"):
        if not count(manifest.get(key)) or not manifest[key]:
            return f"has no valid {key} (got {manifest.get(key)!r})"
    if manifest.get("dtype") not in STORED_DTYPES:
        return f"has dtype {manifest.get('dtype')!r}, not one of {sorted(STORED_DTYPES)}"
    if not isinstance(manifest.get("fingerprint_inputs"), dict) or not isinstance(
        manifest.get("stats"), dict
    ):
        return "has no fingerprint_inputs or stats"
    for i, e in enumerate(manifest["shards"]):
        if not isinstance(e, dict):
            return f"lists shard {i} as {e!r}, not an entry"
        missing = [
            k for k in ("file", "n_sequences", "split", "n_valid_tokens", "sum_sq_norm", "sum") if k not in e
        ]
        if missing:
            return f"lists shard {i} without {missing}"
        name = e["file"]
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".h5"):
            return f"lists shard {i} as {name!r}, not a .h5 file name inside the cache folder"
        if not count(e["n_sequences"]):
            return f"lists {name} with n_sequences {e['n_sequences']!r}"
    return None


def shard_layout_problem(h5: h5py.File, n: int, manifest: dict) -> str | None:
    """How a shard's datasets differ from the format the manifest promises (shapes, dtypes, one-row
    chunks, checksums), or None. Reads metadata only: sizes in an untrusted header are checked before
    anything is allocated from them."""
    T, d, dtype = manifest["ctx_len"], manifest["d_in"], manifest["dtype"]
    for name, shape, want in (
        ("acts", (n, T, d), STORED_DTYPES[dtype]),
        ("tokens", (n, T), np.dtype("int32")),
        ("valid", (n, T), np.dtype("bool")),
    ):
        ds = h5.get(name)
        if not isinstance(ds, h5py.Dataset):
            return f"has no dataset {name!r}"
        if ds.shape != shape:
            return f"has {name!r} of shape {ds.shape}, manifest.json says {shape} (rows, ctx_len, d_in)"
        if ds.dtype != want:
            return f"has {name!r} of dtype {ds.dtype}, the {dtype} cache format stores {want}"
        if ds.chunks != (1, *shape[1:]) or not ds.fletcher32:
            return f"has {name!r} stored in chunks {ds.chunks} (fletcher32={ds.fletcher32}), not checksummed rows"
    if h5["acts"].attrs.get("torch_dtype") != dtype:
        return f"declares acts as {h5['acts'].attrs.get('torch_dtype')!r}, manifest.json says {dtype!r}"
    return None


#: the attributes naming the cache and the file a shard was written for
SHARD_IDENTITY = ("cache_fingerprint", "shard_file")


def check_shard_identity(path: Path, entry: dict, identity: dict, cache_fingerprint: str) -> None:
    """Refuse a shard written for another cache or under another name (a file copied between caches).

    Shards carry their identity as attributes (cheap to read); a shard written before they existed is
    compared with the SHA-256 recorded in the manifest instead (one read of the file).
    """
    fp, name = (identity.get(k) for k in SHARD_IDENTITY)
    if fp is None and name is None:
        if "sha256" in entry and file_sha256(path) != entry["sha256"]:
            found = "its bytes do not match the sha256 recorded in manifest.json"
        else:
            return
    elif (str(fp), str(name)) != (cache_fingerprint, path.name):
        found = f"it was written as {name} of the cache {fp}"
    else:
        return
    raise CacheMismatchError(
        f"shard {path} does not belong to the cache {cache_fingerprint} ({found}): copied from another "
        f"cache or replaced. Run `mtsae cache verify {path.parent} --repair` (it deletes the shard) and "
        "build again: exactly that shard is regenerated"
    )
