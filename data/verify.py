"""Read a whole activation cache and report every bad shard (the command: ``mtsae cache verify PATH
[--repair]``, :mod:`mtsae_app.cache`).

A shard is bad when its file is missing, its bytes do not match the SHA-256 recorded in
``manifest.json``, its row count differs from the manifest, any dataset fails to read (HDF5's
fletcher32 checksums are checked on every chunk) or its static ground truth differs from the
manifest's checksum. ``--repair`` deletes the bad shards and marks the manifest incomplete, so the
next build (``python train.py fit ...`` or anything that calls ``build_cache``) regenerates exactly
those shards and leaves the good ones untouched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import h5py

from data.cache_format import (
    SHARD_IDENTITY,
    CacheMismatchError,
    check_shard_identity,
    manifest_problem,
    manifest_stats,
    read_manifest,
    shard_layout_problem,
    static_ground_truth_sha256,
    stats_sha256,
    write_json_atomic,
)
from mtsae.hashing import file_sha256
from mtsae.progress import progress_bar

__all__ = ["BadShard", "verify_cache", "repair_cache"]

log = logging.getLogger(__name__)


class BadShard(NamedTuple):
    """One shard that failed verification."""

    file: Path
    """the shard file"""
    reason: str
    """what is wrong with it"""


def _check_shard(path: Path, entry: dict, manifest: dict) -> str | None:
    """The reason ``path`` is bad, or None."""
    if not path.is_file():
        return "missing"
    gt_sha = manifest.get("static_ground_truth_sha256")
    cache_fingerprint = manifest.get("fingerprint", path.parent.name)
    sha_differs = "sha256" in entry and file_sha256(path) != entry["sha256"]
    try:
        with h5py.File(path, "r") as h5:
            layout = shard_layout_problem(h5, entry["n_sequences"], manifest)
            if layout is not None:  # before any read: its sizes are not trusted
                return layout
            identity = {k: h5.attrs.get(k) for k in SHARD_IDENTITY}
            if all(v is not None for v in identity.values()):
                try:
                    check_shard_identity(path, entry, identity, cache_fingerprint)
                except CacheMismatchError:
                    return f"written for another cache or file ({identity})"
            names: list[str] = []
            h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            for name in names:
                ds = h5[name]
                if ds.ndim == 0:
                    ds[()]
                    continue
                step = ds.chunks[0] if ds.chunks else max(1, ds.shape[0])
                for a in range(0, ds.shape[0], step):  # chunk by chunk: bounded memory
                    try:
                        ds[a : a + step]
                    except (OSError, ValueError) as err:
                        return f"dataset {name!r}, rows {a}..{min(a + step, ds.shape[0]) - 1}: {err}"
            if "ground_truth" in h5 and gt_sha is not None:
                static = {k: v[()] for k, v in h5["ground_truth"].items() if k != "coefficients"}
                if static_ground_truth_sha256(static) != gt_sha:
                    return "static ground truth does not match static_ground_truth_sha256 in manifest.json"
    except (OSError, ValueError, KeyError) as err:
        return f"cannot open or read: {err}"
    if sha_differs:  # every dataset read, yet the bytes changed (e.g. in a dataset without checksums)
        return "file bytes do not match the sha256 in manifest.json"
    return None


def verify_cache(root: str | os.PathLike, progress: bool = True) -> list[BadShard]:
    """Read every shard of the cache at ``root``; return the bad ones (empty: the cache is sound).

    Raises :class:`~data.cache_format.CacheMismatchError` when the manifest itself is unusable.
    """
    root = Path(root)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        inside = sorted(p.parent.name for p in root.glob("*/manifest.json"))
        hint = (
            f"; it holds the caches {inside}: pass one of them, e.g. {root / inside[0]}"
            if inside
            else " (a cache is the <cache_dir>/<fingerprint>/ folder holding manifest.json)"
        )
        raise CacheMismatchError(f"no activation cache at {root} (missing manifest.json){hint}")
    manifest = read_manifest(mpath)
    problem = manifest_problem(manifest)
    if problem is None and manifest.get("stats_sha256") != stats_sha256(manifest["stats"]):
        problem = "holds statistics (mean_sq_norm, mean) that do not match their checksum (stats_sha256)"
    if problem is not None:  # no shard can be blamed: --repair would not help
        raise CacheMismatchError(f"{mpath} {problem}; delete {root} and build the cache again")
    shards = manifest["shards"]
    bad: list[BadShard] = []
    seen: set[str] = set()
    bar = progress_bar(total=len(shards), desc="verifying shards", unit="shard", disable=not progress)
    try:
        for entry in shards:
            path = root / entry["file"]
            if entry["file"] in seen:
                bad.append(BadShard(path, "listed more than once in manifest.json"))
            else:
                seen.add(entry["file"])
                reason = _check_shard(path, entry, manifest)
                if reason is not None:
                    bad.append(BadShard(path, reason))
            bar.update(1)
    finally:
        bar.close()
    return bad


def repair_cache(root: str | os.PathLike, bad: list[BadShard]) -> None:
    """Delete the bad shards, drop them from the manifest and mark it incomplete (the next build regenerates them)."""
    root = Path(root)
    mpath = root / "manifest.json"
    manifest = read_manifest(mpath)
    names = {b.file.name for b in bad}
    kept, seen = [], set()
    for e in manifest["shards"]:
        if e["file"] not in names and e["file"] not in seen:
            kept.append(e)
            seen.add(e["file"])
    manifest["shards"] = kept
    manifest["stats"] = manifest_stats(kept)
    manifest["stats_sha256"] = stats_sha256(manifest["stats"])
    manifest["complete"] = False
    # the manifest first: if it cannot be written (a read-only or full disk), no shard has been deleted,
    # and a manifest never lists a deleted shard
    write_json_atomic(mpath, manifest)
    for name in sorted(names):
        (root / name).unlink(missing_ok=True)
