"""``mtsae cache norms``: the norms of a cache's activations at BOS, other invalid positions and ordinary
tokens, as stored and as the SAE's convolutions receive them (on a synthetic cache whose BOS vector has norm
100; tests/lm/test_gemma3.py runs it on the real Gemma)."""

from __future__ import annotations

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
    assert mtsae_cli.main(["cache", "norms", str(root), "--rows", "8"]) == 0
    out = capsys.readouterr().out
    assert "BOS (position 0)" in out and "BOS / ordinary (medians)" in out
    assert mtsae_cli.main(["cache", "norms", str(tmp_path / "none")]) == 1
