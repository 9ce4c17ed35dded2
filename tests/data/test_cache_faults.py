"""Damaged caches fail at open (or at the read) with a message that names the file and the cause;
``mtsae cache verify`` finds every bad shard and ``--repair`` lets a rebuild regenerate exactly those."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import h5py
import pytest

import mtsae_app.cli as mtsae_cli
from data.cache import ActivationCache
from data.cache_format import CacheMismatchError, CacheReadError, CacheSpec, CacheWriteError
from data.cache_writer import build_cache
from data.verify import verify_cache
from tests.helpers.factories import tiny_source

SPEC = CacheSpec(n_sequences=8, val_sequences=4, shard_size=4, dtype="float32")


def _build(path: Path) -> Path:
    return build_cache(tiny_source(), path, SPEC, source_batch_size=4, progress=False)


def _flip_byte_in_chunk(path: Path, dataset: str, chunk: int = 0, at: int = 17) -> None:
    with h5py.File(path, "r") as h5:
        ds = h5[dataset]
        offset = ds.id.get_chunk_info(chunk).byte_offset if ds.chunks else ds.id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + at)
        b = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([b[0] ^ 0xFF]))


def _edit_manifest(root: Path, edit) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("dataset", ["acts", "valid"])
def test_corrupted_chunk_read_names_file_dataset_and_rows(tmp_path: Path, dataset: str) -> None:
    root = _build(tmp_path)
    _flip_byte_in_chunk(root / "shard_00001.h5", dataset, chunk=2)
    cache = ActivationCache(root)
    cache.read([0, 1, 4])  # rows of other chunks still read
    with pytest.raises(CacheReadError, match=rf"shard_00001\.h5: dataset '{dataset}', rows 0\.\.3"):
        cache.read([4, 5, 6, 7])
    cache.close()


def test_truncated_shard_is_named_at_open(tmp_path: Path) -> None:
    root = _build(tmp_path)
    shard = root / "shard_00002.h5"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(CacheReadError, match=r"shard_00002\.h5"):
        ActivationCache(root)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m["shards"][0].update(n_sequences=3),
            "train shards hold 7 rows but the cache was built with",
        ),
        (
            lambda m: m["shards"][1].update(file="shard_00000.h5"),
            r"lists \['shard_00000.h5'\] more than once",
        ),
        (lambda m: m["shards"][0].update(split="val"), r"splits \['val', 'train', 'val'\] are not training"),
        (
            lambda m: m["shards"][1].update(split="val"),
            "train shards hold 4 rows but the cache was built with",
        ),
        (
            lambda m: m["shards"][2].update(split="train"),
            "train shards hold 12 rows but the cache was built with",
        ),
        (lambda m: m["stats"].update(mean_sq_norm=m["stats"]["mean_sq_norm"] * 100), "stats_sha256"),
        (
            lambda m: m["shards"][0].update(file="shard_00009.h5"),
            r"shard_00009\.h5 listed in manifest.json is missing",
        ),
    ],
)
def test_edited_manifest_is_refused_at_open(tmp_path: Path, edit, message: str) -> None:
    root = _build(tmp_path)
    _edit_manifest(root, edit)
    with pytest.raises(CacheMismatchError, match=message):
        ActivationCache(root)


def test_row_count_differing_from_the_shard_is_refused(tmp_path: Path) -> None:
    root = _build(tmp_path)

    def swap(m: dict) -> None:  # rows still add up, but each file holds 4 rows, not 3 or 5
        m["shards"][0]["n_sequences"], m["shards"][1]["n_sequences"] = 3, 5

    _edit_manifest(root, swap)
    with pytest.raises(CacheMismatchError, match=r"shard_00000\.h5 holds 4 rows, manifest.json says 3"):
        ActivationCache(root)


def test_truncated_manifest_names_the_file(tmp_path: Path) -> None:
    root = _build(tmp_path)
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(CacheMismatchError, match=r"manifest.json is not valid JSON"):
        ActivationCache(root)
    with pytest.raises(CacheMismatchError, match=str(root / "manifest.json")):
        _build(tmp_path)  # the builder says the same instead of a bare JSONDecodeError


def test_corrupted_static_ground_truth_is_detected(tmp_path: Path) -> None:
    root = _build(tmp_path)
    _flip_byte_in_chunk(root / "shard_00000.h5", "ground_truth/features", at=40)
    cache = ActivationCache(root)
    with pytest.raises(
        CacheReadError, match=r"shard_00000\.h5: dataset 'ground_truth' does not match the checksum"
    ):
        cache.ground_truth()
    cache.close()
    (bad,) = verify_cache(root, progress=False)
    assert bad.file.name == "shard_00000.h5" and "sha256" in bad.reason


def test_verify_names_every_bad_shard_and_repair_rebuilds_exactly_those(tmp_path: Path, capsys) -> None:
    ref = _build(tmp_path / "ref")
    root = _build(tmp_path / "run")
    assert verify_cache(root, progress=False) == []
    assert mtsae_cli.main(["cache", "verify", str(root), "--no-progress"]) == 0
    assert "all 3 shards verified" in capsys.readouterr().out

    _flip_byte_in_chunk(root / "shard_00001.h5", "acts", chunk=1)
    (root / "shard_00002.h5").write_bytes((root / "shard_00002.h5").read_bytes()[:2000])
    untouched = (root / "shard_00000.h5").stat().st_mtime_ns
    assert mtsae_cli.main(["cache", "verify", str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"bad shard {root / 'shard_00001.h5'}: dataset 'acts', rows 1..1:" in err  # the flipped chunk
    assert f"bad shard {root / 'shard_00002.h5'}: cannot open or read:" in err  # truncated
    assert "shard_00000.h5" not in err and "--repair" in err

    assert mtsae_cli.main(["cache", "verify", str(root), "--repair", "--no-progress"]) == 0
    assert "deleted 2 bad shards" in capsys.readouterr().out
    assert sorted(p.name for p in root.glob("shard_*")) == ["shard_00000.h5"]
    with pytest.raises(CacheMismatchError, match="incomplete"):
        ActivationCache(root)
    assert mtsae_cli.main(["cache", "verify", str(root), "--no-progress"]) == 0
    assert "the cache is incomplete" in capsys.readouterr().out  # a repaired cache says it needs a build
    assert mtsae_cli.main(["cache", "verify", str(root.parent), "--no-progress"]) == 1
    assert f"pass one of them, e.g. {root}" in capsys.readouterr().err  # the cache_dir, not the cache

    build_cache(tiny_source(), tmp_path / "run", SPEC, source_batch_size=4, progress=False)
    assert (root / "shard_00000.h5").stat().st_mtime_ns == untouched  # the good shard was not rewritten
    for name in sorted(p.name for p in ref.iterdir()):
        assert (ref / name).read_bytes() == (root / name).read_bytes(), name
    assert verify_cache(root, progress=False) == []


def test_verify_reports_a_duplicate_listing_and_repairs_it(tmp_path: Path) -> None:
    root = _build(tmp_path)
    _edit_manifest(root, lambda m: m["shards"][1].update(file="shard_00000.h5"))
    bad = verify_cache(root, progress=False)
    assert [(b.file.name, b.reason) for b in bad] == [
        ("shard_00000.h5", "listed more than once in manifest.json")
    ]


def test_disk_full_names_the_shard_and_keeps_finished_ones(tmp_path: Path, monkeypatch) -> None:
    import data.cache_writer

    class FullDisk:
        """A file that takes 1000 bytes, then fails as a full disk does."""

        def __init__(self, path, mode):
            self.fh = open(path, mode)

        def write(self, data):
            self.fh.write(bytes(data)[:1000])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def second_shard_fails(path, mode="r", *args, **kwargs):
        if str(path).endswith("shard_00001.h5.tmp"):
            return FullDisk(path, mode)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(data.cache_writer, "open", second_shard_fails, raising=False)
    with pytest.raises(
        CacheWriteError, match=r"cannot write cache shard .*shard_00001\.h5\.tmp: No space left on device"
    ):
        build_cache(tiny_source(), tmp_path, SPEC, source_batch_size=4, progress=False)
    (root,) = tmp_path.iterdir()
    assert not list(root.glob("*.tmp"))  # the partial file is removed (it frees the space it took)
    assert [e["file"] for e in json.loads((root / "manifest.json").read_text())["shards"]] == [
        "shard_00000.h5"
    ]
    monkeypatch.undo()
    build_cache(tiny_source(), tmp_path, SPEC, source_batch_size=4, progress=False)  # resumes
    assert verify_cache(root, progress=False) == []
    ActivationCache(root).close()
