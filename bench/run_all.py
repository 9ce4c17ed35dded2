"""Every benchmark in one process, one table of ratios (``make bench``; ``--quick`` for a smoke run).

    python bench/run_all.py [--quick] [--device auto|cpu|cuda] [--only step,trainer,...] [--markdown FILE]

On CUDA the SAE steps run in bf16 autocast (as ``precision: bf16-mixed``) at full size; on CPU in
float32 with one torch thread (stable timings on a shared machine; ``--threads`` to change).
Each row is a ratio of things measured side by side in this run (interleaved repeats, medians);
``bench/RESULTS.md`` records the last full run and its machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402

from bench.common import BenchConfig, Row, machine, markdown_table, print_table, stage  # noqa: E402

BENCHES = ["step", "trainer", "loader", "rss", "fp8", "conv", "capture", "generate", "separation"]


def _capture(cfg: BenchConfig) -> list[Row]:
    from bench.bench_capture import LAYER, N_LAYERS, bench_capture
    from mtsae.lm.tiny_lm import build_tiny_lm

    model_dir = build_tiny_lm(cfg.workdir / "gemma26", arch="gemma2", n_layers=N_LAYERS, hidden_size=128)
    ratio = bench_capture(model_dir, cfg.repeats, batch=8, ctx_len=128)
    return [
        Row(
            f"capture: full forward / early stop at layer {LAYER}",
            ratio,
            "",
            f"random Gemma-2-style LM, {N_LAYERS} layers, d_model 128; expected about {N_LAYERS}/{LAYER + 1}",
        )
    ]


def _conv(cfg: BenchConfig) -> list[Row]:
    from bench.bench_conv import compare

    sizes = [(64, 32, 64), (512, 16, 128)]  # (d_in, batch, ctx): the demo's, and a wider one
    rows = []
    for d_in, batch, ctx in sizes:
        ratio = compare(d_in, batch, ctx, 10 if cfg.quick else 30, cfg.device.type)
        rows.append(
            Row(
                f"conv: F.conv1d / shifted multiply-adds, d_in {d_in}",
                ratio,
                "",
                f"forward + backward, B {batch}, T {ctx}, dilations 1,2,4,8",
            )
        )
    return rows


def run_bench(name: str, cfg: BenchConfig) -> list[Row]:
    if name == "capture":
        return _capture(cfg)
    if name == "conv":
        return _conv(cfg)
    module = __import__(f"bench.bench_{name}", fromlist=["run"])
    return module.run(cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="small sizes, few repeats (about 3 minutes on 2 cores)"
    )
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per measurement (default 7, quick 3)"
    )
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {BENCHES}")
    ap.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    a = ap.parse_args(argv)
    only = [s for s in a.only.split(",") if s]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        ap.error(f"unknown benchmarks {unknown}; choose from {BENCHES}")
    device = torch.device(
        "cuda"
        if a.device == "auto" and torch.cuda.is_available()
        else ("cpu" if a.device == "auto" else a.device)
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(a.threads)
    import lightning  # noqa: F401  (it sets its loggers' level on import: import it first)

    for name in ("lightning.pytorch", "lightning.fabric"):  # no start-up banners between the stages
        logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mtsae-bench-") as tmp:
        cfg = BenchConfig(
            device=device,
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            quick=a.quick,
            repeats=a.repeats or (3 if a.quick else 7),
            workdir=Path(tmp),
        )
        print(f"machine: {machine(cfg)}", flush=True)
        for name in only:
            with stage(name):
                rows += run_bench(name, cfg)
    minutes = (time.perf_counter() - t0) / 60
    print_table(rows)
    print(f"\nmachine: {machine(cfg)}; {'quick' if a.quick else 'full'} run, {minutes:.1f} min")
    if a.markdown:
        Path(a.markdown).write_text(
            f"machine: {machine(cfg)}; {'quick' if a.quick else 'full'} run, {minutes:.1f} min\n\n"
            + markdown_table(rows)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
