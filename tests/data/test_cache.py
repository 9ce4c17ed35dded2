"""The HDF5 sequence cache: bit-exact round trips, resumable builds, refusal of foreign caches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data.cache import ActivationCache
from data.cache_format import CacheMismatchError, CacheReadError, CacheSpec
from data.cache_writer import build_cache
from data.datamodule import ActivationDataModule
from data.sources import ActivationSource
from tests.helpers.factories import tiny_source


class FailAfter(ActivationSource):
    """Wraps a source and raises once ``limit`` rows have been generated (an interrupted build)."""

    def __init__(self, inner: ActivationSource, limit: int) -> None:
        self.inner, self.limit, self.kind = inner, limit, inner.kind
        self.rows_generated = 0

    d_in = property(lambda self: self.inner.d_in)
    ctx_len = property(lambda self: self.inner.ctx_len)

    def fingerprint(self) -> dict:
        return self.inner.fingerprint()

    def static_ground_truth(self) -> dict:
        return self.inner.static_ground_truth()

    def generate(self, start: int, stop: int, batch_size: int):
        for chunk in self.inner.generate(start, stop, batch_size):
            self.rows_generated += len(chunk)
            if self.rows_generated > self.limit:
                raise KeyboardInterrupt("simulated interruption")
            yield chunk


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_is_bit_exact(tmp_path: Path, dtype: str) -> None:
    src = tiny_source()
    spec = CacheSpec(n_sequences=10, val_sequences=3, shard_size=4, dtype=dtype)
    root = build_cache(src, tmp_path, spec, source_batch_size=3, progress=False)
    cache = ActivationCache(root)
    expected = next(src.generate(0, 13, 13))
    rows = [12, 0, 5, 5, 3]  # any order, repeats, across shards
    got = cache.read(rows)
    want = expected.acts[rows].to(getattr(torch, dtype))
    assert got["acts"].dtype == want.dtype
    assert torch.equal(got["acts"].view(torch.uint8), want.contiguous().view(torch.uint8))
    assert torch.equal(got["valid"], expected.valid[rows])
    assert torch.equal(got["tokens"], expected.tokens[rows])
    with h5py.File(root / "shard_00000.h5") as h5:
        assert h5["acts"].attrs["torch_dtype"] == dtype
        assert h5["acts"].fletcher32 and h5["acts"].chunks == (1, 16, 16)
        if dtype == "bfloat16":
            assert h5["acts"].dtype == np.uint16
    gt = cache.ground_truth()
    assert gt.features.shape == (20, 16) and gt.features.dtype == torch.float32
    assert gt.group_names == tuple(src.group_names) and all(type(n) is str for n in gt.group_names)
    assert gt.group_index.tolist() == src.group_index.tolist()
    coeff = cache.ground_truth_rows("coefficients", [12, 1])
    np.testing.assert_array_equal(coeff, expected.ground_truth["coefficients"][[12, 1]])


def test_read_ranges_reads_contiguous_slices_across_shards(tmp_path: Path) -> None:
    src = tiny_source()
    root = build_cache(src, tmp_path, CacheSpec(10, 3, 4, "bfloat16"), source_batch_size=3, progress=False)
    cache = ActivationCache(root)
    expected = next(src.generate(0, 13, 13))
    assert cache.shard_ranges("train") == [(0, 4), (4, 8), (8, 10)] and cache.shard_ranges("val") == [
        (10, 13)
    ]
    got = cache.read_ranges([(9, 12), (2, 6), (7, 7)])  # crosses shards 2 -> 3 and 0 -> 1; an empty range
    rows = [9, 10, 11, 2, 3, 4, 5]
    assert torch.equal(got["acts"], expected.acts[rows].to(torch.bfloat16))
    assert torch.equal(got["valid"], expected.valid[rows]) and torch.equal(
        got["tokens"], expected.tokens[rows]
    )
    assert cache.read_ranges([])["acts"].shape == (0, 16, 16)
    with pytest.raises(IndexError):
        cache.read_ranges([(11, 14)])


def test_a_corrupted_chunk_fails_the_checksum_with_its_location(tmp_path: Path) -> None:
    root = build_cache(tiny_source(), tmp_path, CacheSpec(8, 2, 4, "float32"), progress=False)
    path = root / "shard_00001.h5"
    with h5py.File(path) as h5:
        offset = h5["acts"].id.get_chunk_info(2).byte_offset  # row 2 of the shard = global row 6
    with open(path, "r+b") as fh:
        fh.seek(offset + 100)
        byte = fh.read(1)
        fh.seek(offset + 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    cache = ActivationCache(root)
    assert cache.read_ranges([(0, 6)])["acts"].shape[0] == 6  # the rows before it are fine
    with pytest.raises(CacheReadError, match=r"shard_00001.h5: dataset 'acts', rows 1..3"):
        cache.read_ranges([(5, 8)])


def test_manifest_contents(tmp_path: Path) -> None:
    src = tiny_source()
    root = build_cache(src, tmp_path, CacheSpec(9, 4, 4, "float32"), progress=False)
    m = json.loads((root / "manifest.json").read_text())
    assert m["complete"] and m["d_in"] == 16 and m["ctx_len"] == 16 and m["dtype"] == "float32"
    assert [(s["file"], s["n_sequences"], s["split"]) for s in m["shards"]] == [
        ("shard_00000.h5", 4, "train"),
        ("shard_00001.h5", 4, "train"),
        ("shard_00002.h5", 1, "train"),
        ("shard_00003.h5", 4, "val"),
    ]
    x = next(src.generate(0, 9, 9))
    xv = x.acts[x.valid].double()
    assert m["stats"]["mean_sq_norm"] == pytest.approx(xv.pow(2).sum(-1).mean().item(), rel=1e-6)
    np.testing.assert_allclose(m["stats"]["mean"], xv.mean(0).numpy(), rtol=1e-6, atol=1e-9)
    cache = ActivationCache(root)
    assert cache.rows("train").tolist() == list(range(9))
    assert cache.rows("val").tolist() == list(range(9, 13))


def test_interrupted_build_resumes_byte_identical(tmp_path: Path) -> None:
    spec = CacheSpec(n_sequences=10, val_sequences=3, shard_size=3, dtype="bfloat16")
    ref = build_cache(tiny_source(), tmp_path / "ref", spec, source_batch_size=2, progress=False)

    flaky = FailAfter(tiny_source(), limit=7)  # dies inside the third shard
    with pytest.raises(KeyboardInterrupt):
        build_cache(flaky, tmp_path / "run", spec, source_batch_size=2, progress=False)
    root = tmp_path / "run" / ref.name
    manifest = json.loads((root / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    finished = {p.name: p.stat().st_mtime_ns for p in root.glob("shard_*.h5")}
    assert sorted(finished) == ["shard_00000.h5", "shard_00001.h5"]

    resumed = FailAfter(tiny_source(), limit=10**9)
    build_cache(resumed, tmp_path / "run", spec, source_batch_size=2, progress=False)
    assert resumed.rows_generated == 13 - 6  # started at the first missing shard
    for name, mtime in finished.items():  # finished shards were not rewritten
        assert (root / name).stat().st_mtime_ns == mtime
    files = sorted(p.name for p in ref.iterdir())
    assert files == sorted(p.name for p in root.iterdir())
    for name in files:
        assert (ref / name).read_bytes() == (root / name).read_bytes(), name


def test_incomplete_cache_is_not_read(tmp_path: Path) -> None:
    spec = CacheSpec(6, 2, 2, "float32")
    with pytest.raises(KeyboardInterrupt):
        build_cache(FailAfter(tiny_source(), 3), tmp_path, spec, source_batch_size=1, progress=False)
    (root,) = tmp_path.iterdir()
    with pytest.raises(CacheMismatchError, match="incomplete"):
        ActivationCache(root)


def test_mismatched_cache_is_refused(tmp_path: Path) -> None:
    dm = ActivationDataModule(
        tiny_source(d_in=16),
        cache_dir=str(tmp_path),
        n_sequences=8,
        val_sequences=2,
        shard_size=4,
        progress=False,
    )
    dm.prepare_data()
    other = ActivationDataModule(
        tiny_source(d_in=24),
        cache_path=str(dm.cache_root),
        n_sequences=8,
        val_sequences=2,
        shard_size=4,
        progress=False,
    )
    with pytest.raises(CacheMismatchError, match=r"d_in: cache has 16, config has 24"):
        other.setup("fit")
    reseeded = ActivationDataModule(
        tiny_source(seed=1),
        cache_path=str(dm.cache_root),
        n_sequences=8,
        val_sequences=2,
        shard_size=4,
        progress=False,
    )
    with pytest.raises(CacheMismatchError, match="seed"):
        reseeded.setup("fit")


def test_bad_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="dtype"):
        CacheSpec(4, 1, 2, "int8")
    with pytest.raises(ValueError, match="shard_size"):
        CacheSpec(4, 1, 0, "float32")


def test_concurrent_builders_wait_for_each_other(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import sys; from data import CacheSpec, build_cache; from tests.helpers.factories import tiny_source; "
        "build_cache(tiny_source(), sys.argv[1], CacheSpec(40, 8, 8, 'float32'), 4, progress=False)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    (root,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    ref = build_cache(tiny_source(), tmp_path / "ref", CacheSpec(40, 8, 8, "float32"), 4, progress=False)
    for shard in sorted(ref.glob("shard_*.h5")):
        assert (root / shard.name).read_bytes() == shard.read_bytes()
