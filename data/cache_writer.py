"""Writing the activation cache: :func:`build_cache` and its shards (format in :mod:`data.cache_format`).

Every shard is written as ``*.tmp``, flushed, fsynced, closed and renamed; the manifest is rewritten
atomically after each shard, so an interrupted build resumes at the first missing shard and never
rewrites a finished one. One builder at a time holds the cache folder's lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch

from data.cache_format import (
    FORMAT_VERSION,
    CacheBuildInterrupted,
    CacheMismatchError,
    CacheSpec,
    CacheWriteError,
    NonFiniteActivationsError,
    fingerprint,
    fingerprint_inputs,
    from_storage,
    manifest_stats,
    read_manifest,
    static_ground_truth_sha256,
    stats_sha256,
    to_storage,
    write_json_atomic,
)
from data.sources import ActivationSource, SourceChunk
from mtsae.progress import progress_bar

__all__ = ["build_cache"]

log = logging.getLogger(__name__)


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.h5"


def _check_finite(
    path: Path, first_row: int, acts: torch.Tensor, values: torch.Tensor, valid: torch.Tensor
) -> None:
    """Refuse NaN or infinite stored ``values`` ``[n, T, d]`` at valid positions, naming the first one.

    Invalid positions (BOS, padding) may hold anything: training and evaluation never read them.
    """
    bad = ~torch.isfinite(values).all(-1) & valid  # [n, T]
    if not bool(bad.any()):
        return
    r, t = (int(i) for i in bad.nonzero()[0])
    value = values[r, t][~torch.isfinite(values[r, t])][0].item()
    if bool(torch.isfinite(acts[r, t]).all()):
        why = (
            "the source's values overflow the storage dtype (float16 ends at 65504): set data.dtype to "
            "bfloat16 or float32"
        )
    else:
        why = "the source itself produced it (a NaN setting? a model run in a dtype that overflows?)"
    raise NonFiniteActivationsError(
        f"cannot write cache shard {path.name}: activation {value} at shard row {r} (global row "
        f"{first_row + r}), position {t}, a valid position ({int(bad.sum())} such positions in this shard); "
        f"{why}. Nothing non-finite is cached; the finished shards are kept"
    )


def _write_shard(
    path: Path, chunks: list[SourceChunk], static_gt: dict, dtype: str, first_row: int = 0
) -> dict:
    """Write one shard (via ``*.tmp``, fsync, rename); return its manifest entry with statistics.

    A failed write (``OSError``: disk full, quota, ...) closes the file, removes the ``*.tmp`` and
    raises :class:`CacheWriteError` naming the file; the finished shards are untouched, so the build
    resumes once space is freed. A non-finite activation at a valid position raises
    :class:`NonFiniteActivationsError` before anything is written.
    """
    acts = torch.cat([c.acts for c in chunks])  # [n, T, d_in]
    tokens = torch.cat([c.tokens for c in chunks]).to(torch.int32)
    valid = torch.cat([c.valid for c in chunks]).to(torch.bool)
    n = acts.shape[0]
    stored = to_storage(acts, dtype)
    values = from_storage(stored, dtype).float()  # what training will read
    _check_finite(path, first_row, acts, values, valid)
    # statistics of the stored values, over valid tokens, float64 sums
    x = values[valid]  # [n_valid, d]
    tmp = path.with_name(path.name + ".tmp")
    gt_rows = {k: np.concatenate([c.ground_truth[k] for c in chunks]) for k in chunks[0].ground_truth}
    # HDF5 writes the shard into memory; Python writes the bytes to disk. A full disk then raises an
    # ordinary OSError here, instead of failing inside HDF5's own writes, where h5py can only report it
    # while deallocating objects and the process later crashes (segmentation fault)
    image = io.BytesIO()
    identity = {"cache_fingerprint": path.parent.name, "shard_file": path.name}
    _write_h5(image, stored, tokens.numpy(), valid.numpy(), static_gt, gt_rows, dtype, identity)
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
    identity: dict[str, str],
) -> None:
    n, T, d = stored.shape
    h5 = h5py.File(target, "w", track_order=False)
    try:
        for k, v in identity.items():  # which cache and shard this file is (checked when a cache opens)
            h5.attrs[k] = v
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
    if _finished_shards(root, inputs) is None:
        return root  # complete, so never written again: reading needs no lock (a read-only cache works)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        try:  # one builder at a time: a second job on the same cache waits, then finds it done
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process is building the cache in %s; waiting for it", root)
            fcntl.flock(lock, fcntl.LOCK_EX)
        with _sigterm_stops_the_build(root):
            return _build_locked(source, root, inputs, spec, source_batch_size, progress)


@contextmanager
def _sigterm_stops_the_build(root: Path) -> Iterator[None]:
    """SIGTERM (preemption, ``scancel``) raises :class:`CacheBuildInterrupted` in the build, whose cleanup
    keeps every finished shard; otherwise the process would die without a word (Lightning handles SIGTERM
    only once training starts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise CacheBuildInterrupted(
            f"stopped by SIGTERM while building the cache at {root}; the finished shards are kept. Run the "
            "same command again: the build resumes at the first missing shard"
        )

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finished_shards(root: Path, inputs: dict) -> list[dict] | None:
    """The manifest entries of the shards already on disk; ``None`` if the cache is complete."""
    mpath = root / "manifest.json"
    if not mpath.exists():
        return []
    manifest = read_manifest(mpath)
    if manifest.get("fingerprint_inputs") != inputs:
        raise CacheMismatchError(
            f"{mpath}: its fingerprint_inputs do not match the settings its folder name was made from (the "
            f"manifest was edited or copied from another cache); delete {root} and build again"
        )
    if manifest.get("complete"):
        return None
    # keep the finished shards whose files are on disk (a repaired cache has gaps: exactly the deleted
    # shards are regenerated)
    return [e for e in manifest["shards"] if (root / e["file"]).exists()]


def _new_manifest(
    root: Path, inputs: dict, source: ActivationSource, spec: CacheSpec, done: list[dict], static_gt: dict
) -> dict:
    """The manifest of a build that starts (or resumes) with the shards ``done``, with its checksums."""
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
        "stats": manifest_stats(done),
        "static_ground_truth_sha256": static_ground_truth_sha256(static_gt),
        "complete": False,
    }
    manifest["stats_sha256"] = stats_sha256(manifest["stats"])
    return manifest


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
    done = _finished_shards(root, inputs)
    if done is None:
        return root  # complete
    for stale in root.glob("*.tmp"):
        stale.unlink()
    source.check()
    static_gt = source.static_ground_truth()
    manifest = _new_manifest(root, inputs, source, spec, done, static_gt)
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
        manifest["stats"] = manifest_stats(manifest["shards"])
        manifest["stats_sha256"] = stats_sha256(manifest["stats"])
        manifest["complete"] = len(manifest["shards"]) == len(plan)
        write_json_atomic(mpath, manifest)

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
                    writer.submit(_write_shard, root / _shard_name(i), chunks, static_gt, spec.dtype, a),
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
        write_json_atomic(mpath, manifest)
    return root
