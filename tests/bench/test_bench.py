"""Pieces of the benchmarks that decide what the table says (bench/ itself is not a test suite)."""

from __future__ import annotations

import torch

from bench.bench_fp8 import fp8_round_trip
from bench.bench_step import step_flops
from bench.common import Row


def test_row_status_reads_the_target() -> None:
    assert Row("a", 0.6, ">= 0.5").status == "met" and Row("a", 0.4, ">= 0.5").status == "NOT MET"
    assert Row("a", 1.6, "<= 1.5").status == "NOT MET" and Row("a", None, "<= 1.5").status == "skipped"
    assert Row("a", 3.0).status == ""


def test_fp8_per_token_scale_isolates_a_huge_token() -> None:
    x = torch.randn(2, 16, 32)
    x[:, 0] *= 1e6  # an outlier token far beyond the others
    tok, seq = fp8_round_trip(x, "token"), fp8_round_trip(x, "sequence")
    rel = (tok - x).abs().amax(-1) / x.abs().amax(-1)  # e4m3 keeps 3 mantissa bits: <= 2^-4
    assert rel.max() <= 2**-4
    err_tok = (tok - x)[:, 1:].pow(2).sum() / x[:, 1:].pow(2).sum()
    err_seq = (seq - x)[:, 1:].pow(2).sum() / x[:, 1:].pow(2).sum()
    assert err_tok < 1e-2 < err_seq  # one scale per sequence crushes the ordinary tokens


def test_step_flops_count_the_concat_encoder() -> None:
    assert step_flops("per-token", 8, 16, 10) == step_flops("MTSAE mix", 8, 16, 10) == 6 * 10 * 16 * 16
    assert step_flops("MTSAE concat", 8, 16, 10) == 6 * 10 * 16 * (4 * 8 + 8)


def test_every_benchmark_module_imports() -> None:
    """``make bench`` imports each benchmark lazily: a stale import would only show after minutes."""
    import importlib
    from pathlib import Path

    from bench.run_all import BENCHES

    names = {p.stem for p in Path("bench").glob("bench_*.py")}
    assert {f"bench_{b}" for b in BENCHES} <= names
    for name in sorted(names):
        importlib.import_module(f"bench.{name}")
