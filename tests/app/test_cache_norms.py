"""``mtsae cache norms``: the norms of a cache's activations at BOS, other invalid positions and ordinary
tokens, as stored and as the SAE's convolutions receive them (on a synthetic cache whose BOS vector has norm
100; tests/lm/test_gemma3.py runs it on the real Gemma)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mtsae_app.cli as mtsae_cli
from data.cache_format import CacheSpec
from data.cache_writer import build_cache
from mtsae_app.cache import position_norms
from tests.helpers.factories import tiny_source


def test_norms_at_bos_and_after_zeroing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = CacheSpec(n_sequences=8, val_sequences=4, shard_size=4, dtype="float32")
    root = build_cache(tiny_source(), tmp_path / "cache", spec, source_batch_size=4, progress=False)
    norms = position_norms(root, rows=8)
    assert norms["bos"]["n"] == 8 and norms["bos"]["median"] == pytest.approx(100.0, rel=1e-5)
    assert norms["valid"]["n"] > 0 and norms["bos_over_valid"] > 1
    assert norms["bos_zeroed"] == {"n": 8, "median": 0.0, "max": 0.0}
    assert norms["valid_zeroed"] == norms["valid"]  # a fresh SAE: b_dec = 0, only the zeroing acts
    # the activation-sink rule at 10x and 100x the median: how many ordinary tokens, their share of the norm
    assert [s["multiple"] for s in norms["sinks"]] == [10.0, 100.0]
    for s in norms["sinks"]:
        assert 0 <= s["n"] <= norms["valid"]["n"] and 0.0 <= s["share"] <= 1.0
        assert (s["n"] == 0) == (s["share"] == 0.0)
    assert mtsae_cli.main(["cache", "norms", str(root), "--rows", "8"]) == 0
    out = capsys.readouterr().out
    assert "BOS (position 0)" in out and "BOS / ordinary (medians)" in out
    n = norms["valid"]["n"]
    for s in norms["sinks"]:
        line = f"ordinary tokens above {s['multiple']:g} x median: {s['n']} of {n}, {100 * s['share']:.1f}%"
        assert line in out
    assert mtsae_cli.main(["cache", "norms", str(tmp_path / "none")]) == 1
    # the module run as a script too (its __main__ block once stood above the norms command's function)
    run = subprocess.run(
        [sys.executable, "-m", "mtsae_app.cache", "norms", str(root), "--rows", "8"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0 and "BOS / ordinary (medians)" in run.stdout, run.stderr


def test_norms_count_the_tokens_above_a_multiple_of_the_median(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ordinary token made 1000x larger: counted at 10x and 100x, with nearly all of the squared norm."""
    from data.cache import ActivationCache

    spec = CacheSpec(n_sequences=8, val_sequences=4, shard_size=4, dtype="float32")
    root = build_cache(tiny_source(), tmp_path / "cache", spec, source_batch_size=4, progress=False)
    read = ActivationCache.read

    def with_a_sink(self, rows):  # noqa: ANN001, ANN202
        batch = read(self, rows)
        assert batch["valid"][0, 1]
        batch["acts"][0, 1] *= 1000
        return batch

    monkeypatch.setattr(ActivationCache, "read", with_a_sink)
    norms = position_norms(root, rows=8)
    assert [s["n"] for s in norms["sinks"]] == [1, 1]
    assert all(s["share"] > 0.99 for s in norms["sinks"])
