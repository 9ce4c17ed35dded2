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
from mtsae.hashing import file_sha256
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
    with pytest.raises(
        CacheMismatchError,
        match=r"shard_00000\.h5 has 'acts' of shape \(4, 16, 16\), manifest.json says \(3, 16, 16\)",
    ):
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


def test_a_shard_copied_from_another_cache_is_refused_at_open(tmp_path: Path) -> None:
    """The issue's case: shard_00001.h5 of a seed-1 cache copied into a seed-0 cache of the same settings."""
    root = _build(tmp_path / "a")
    other = build_cache(tiny_source(seed=1), tmp_path / "b", SPEC, source_batch_size=4, progress=False)
    (root / "shard_00001.h5").write_bytes((other / "shard_00001.h5").read_bytes())
    with pytest.raises(CacheMismatchError, match=rf"shard_00001\.h5 of the cache {other.name}\): copied"):
        ActivationCache(root)
    (bad,) = verify_cache(root, progress=False)
    assert bad.file.name == "shard_00001.h5"


def test_a_shard_without_identity_attributes_is_checked_against_its_hash(tmp_path: Path) -> None:
    root = _build(tmp_path / "a")
    other = build_cache(tiny_source(seed=1), tmp_path / "b", SPEC, source_batch_size=4, progress=False)
    for shard in (root / "shard_00001.h5", other / "shard_00001.h5"):  # as written before the attributes
        with h5py.File(shard, "r+") as h5:
            for k in list(h5.attrs):
                del h5.attrs[k]
    _edit_manifest(root, lambda m: m["shards"][1].update(sha256=file_sha256(root / "shard_00001.h5")))
    ActivationCache(root).close()  # an unchanged legacy shard opens
    (root / "shard_00001.h5").write_bytes((other / "shard_00001.h5").read_bytes())
    with pytest.raises(CacheMismatchError, match=r"its bytes do not match the sha256 recorded in manifest"):
        ActivationCache(root)


def _replace_acts(
    shard: Path, shape: tuple[int, ...], dtype: str, chunks=None, torch_dtype="float32"
) -> None:
    """Rewrite a shard's ``acts`` with another header (no data written: HDF5 allocates lazily)."""
    with h5py.File(shard, "r+") as h5:
        del h5["acts"]
        ds = h5.create_dataset(
            "acts", shape=shape, dtype=dtype, chunks=chunks or (1, *shape[1:]), fletcher32=True
        )
        ds.attrs["torch_dtype"] = torch_dtype


@pytest.mark.parametrize(
    ("shape", "dtype", "chunks", "torch_dtype", "message"),
    [
        (
            (4, 16, 8),
            "float32",
            None,
            "float32",
            r"'acts' of shape \(4, 16, 8\), manifest.json says \(4, 16, 16\)",
        ),
        ((4, 10**5, 10**5), "float32", (1, 100, 100), "float32", r"'acts' of shape \(4, 100000, 100000\)"),
        ((10**9, 16, 16), "float32", None, "float32", r"'acts' of shape \(1000000000, 16, 16\)"),
        (
            (4, 16, 16),
            "int64",
            None,
            "float32",
            "'acts' of dtype int64, the float32 cache format stores float32",
        ),
        (
            (4, 16, 16),
            "float32",
            None,
            "bfloat16",
            "declares acts as 'bfloat16', manifest.json says 'float32'",
        ),
        ((4, 16, 16), "float32", (4, 16, 16), "float32", r"stored in chunks \(4, 16, 16\)"),
    ],
    ids=["width", "huge", "rows", "int64", "bf16-attr", "chunks"],
)
def test_an_untrusted_shard_header_is_refused_before_allocation(
    tmp_path: Path, shape, dtype, chunks, torch_dtype, message
) -> None:
    root = _build(tmp_path)
    _replace_acts(root / "shard_00001.h5", shape, dtype, chunks, torch_dtype)
    new_sha = file_sha256(root / "shard_00001.h5")  # the hostile case: the manifest's hash updated to match
    _edit_manifest(root, lambda m: m["shards"][1].update(sha256=new_sha))
    with pytest.raises(CacheMismatchError, match=message):
        ActivationCache(root)
    (bad,) = verify_cache(root, progress=False)  # verify reads no data from it
    assert bad.file.name == "shard_00001.h5" and __import__("re").search(message, bad.reason)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["shards"][1].pop("n_sequences"), r"lists shard 1 without \['n_sequences'\]"),
        (
            lambda m: m["shards"][1].update(file="../elsewhere.h5"),
            "not a .h5 file name inside the cache folder",
        ),
        (lambda m: m.update(d_in="16"), "has no valid d_in"),
    ],
)
def test_a_malformed_manifest_entry_is_one_message(tmp_path: Path, edit, message: str) -> None:
    root = _build(tmp_path)
    _edit_manifest(root, edit)
    with pytest.raises(CacheMismatchError, match=message + ".*delete .* and build again"):
        ActivationCache(root)
    with pytest.raises(CacheMismatchError, match=message):
        verify_cache(root, progress=False)


def test_verify_reports_edited_statistics_with_a_remedy_that_works(tmp_path: Path) -> None:
    root = _build(tmp_path)
    _edit_manifest(root, lambda m: m["stats"].update(mean_sq_norm=1.0))
    for check in (ActivationCache, lambda r: verify_cache(r, progress=False)):
        with pytest.raises(CacheMismatchError, match=r"stats_sha256\).*delete .* and build") as err:
            check(root)
        assert "--repair" not in str(err.value)  # it deletes shards; it cannot mend the statistics


def test_a_read_only_complete_cache_needs_no_lock(tmp_path: Path) -> None:
    root = _build(tmp_path)
    (root / ".lock").unlink()
    for p in (root, *root.iterdir()):
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        assert _build(tmp_path) == root  # found complete: nothing is opened for writing
        assert not (root / ".lock").exists()
    finally:
        root.chmod(0o755)


def test_repair_on_a_read_only_cache_deletes_nothing_and_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    """Running as root, a read-only mount cannot be made here: the manifest write fails as it would."""
    import data.verify

    root = _build(tmp_path)
    _flip_byte_in_chunk(root / "shard_00001.h5", "acts", chunk=1)

    def read_only(path, obj):
        raise CacheWriteError(errno.EROFS, f"cannot write {path}: Read-only file system")

    monkeypatch.setattr(data.verify, "write_json_atomic", read_only)
    assert mtsae_cli.main(["cache", "verify", str(root), "--repair", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "cannot repair" in err and "Read-only file system; nothing was deleted" in err, err
    assert (root / "shard_00001.h5").exists()  # before: deleted, with the manifest still listing it


def test_edited_fingerprint_inputs_name_a_remedy(tmp_path: Path) -> None:
    root = _build(tmp_path)
    _edit_manifest(root, lambda m: m["fingerprint_inputs"].update(seed=99))
    with pytest.raises(
        CacheMismatchError, match=rf"fingerprint_inputs do not match .* delete {root} and build again"
    ):
        _build(tmp_path)  # was: "does not belong to this configuration (hash collision?)"
