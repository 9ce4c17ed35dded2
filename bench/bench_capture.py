"""Benchmark: early-stopped resid_post capture vs a full forward pass, and cache-writing overhead.

A random-init Gemma-2-shaped model with 26 decoder layers (Gemma-2-2B's depth, tiny width so it runs
on a CPU in about a minute) is built offline. Side by side, in one run, with interleaved repeats:

1. ``capture_resid_post(model, 19, ids)`` (stops after layer 19: 20 of 26 layers run, no unembedding)
   vs ``model(ids, output_hidden_states=True)`` (all 26 layers + final norm + logits).
   Expected ratio of times: about 26 / 20 = 1.3 (a bit more, because of the logits).
2. Cache-writing overhead: ``data.cache.build_cache`` on an ``LMSource`` vs only consuming
   ``LMSource.generate`` for the same rows (skipped, with a message, while ``data.cache`` is missing).

Usage::

    python bench/bench_capture.py [--repeats 5] [--batch 8] [--ctx-len 128] [--hidden 128]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from mtsae.lm import capture_resid_post, hf_dtype_kwargs  # noqa: E402
from mtsae.tiny_lm import build_tiny_lm  # noqa: E402

N_LAYERS = 26
LAYER = 19


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time every function once per round, alternating, after one untimed warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rnd in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rnd > 0:
                times[name].append(time.perf_counter() - t0)
    return times


def _report(times: dict[str, list[float]], baseline: str, unit_rows: int | None = None) -> None:
    base = statistics.median(times[baseline])
    for name, ts in times.items():
        med = statistics.median(ts)
        extra = f"  {unit_rows / med:8.1f} rows/s" if unit_rows else ""
        print(
            f"  {name:<34s} median {med * 1e3:9.1f} ms  (min {min(ts) * 1e3:9.1f}){extra}  "
            f"ratio vs {baseline}: {med / base:5.2f}"
        )


def bench_capture(model_dir: Path, repeats: int, batch: int, ctx_len: int) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, **hf_dtype_kwargs(torch.float32)).eval()
    ids = torch.randint(4, model.config.vocab_size, (batch, ctx_len))  # [B, T]

    def full() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[LAYER + 1]

    def logits_only() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    def early() -> torch.Tensor:
        return capture_resid_post(model, LAYER, ids)

    torch.testing.assert_close(early(), full())  # same numbers, before timing anything
    print(
        f"\n[1] resid_post of layer {LAYER} of {N_LAYERS}, batch {batch} x {ctx_len} tokens, "
        f"d_model {model.config.hidden_size}, {torch.get_num_threads()} threads, {repeats} interleaved repeats"
    )
    times = _interleaved(
        {
            "full forward (output_hidden_states)": full,
            "full forward (logits only)": logits_only,
            "capture, early stop": early,
        },
        repeats,
    )
    _report(times, "capture, early stop")
    ratio = statistics.median(times["full forward (output_hidden_states)"]) / statistics.median(
        times["capture, early stop"]
    )
    print(
        f"  => full / early-stop = {ratio:.2f}  (expected about {N_LAYERS}/{LAYER + 1} = "
        f"{N_LAYERS / (LAYER + 1):.2f}, a little more for the logits)"
    )


# ------------------------------------------------------------------------------------------------
# Cache-writing overhead. Needs data.cache.build_cache (written separately); skipped until it exists.
# ------------------------------------------------------------------------------------------------
def bench_cache_overhead(model_dir: Path, repeats: int, batch: int, ctx_len: int, n_rows: int = 64) -> None:
    print(f"\n[2] cache-writing overhead: build_cache vs generate only, {n_rows} rows x {ctx_len} tokens")
    try:
        from data.cache import CacheSpec, build_cache
    except ImportError as e:
        print(f"  skipped: data.cache.build_cache is not importable yet ({e})")
        return
    from data.lm_source import LMSource

    def source() -> LMSource:
        # a fresh source each time: build_cache closes (unloads) its source, so both arms load the model
        return LMSource(
            model_name=str(model_dir),
            layer=LAYER,
            dataset=str(model_dir / "corpus.jsonl"),
            ctx_len=ctx_len,
            model_dtype="float32",
            device="cpu",
            llm_batch_size=batch,
            progress=False,
        )

    spec_kw = dict(n_sequences=n_rows, val_sequences=0, shard_size=max(1, n_rows // 4), dtype="bfloat16")
    try:
        spec = CacheSpec(**spec_kw)
        inspect.signature(build_cache).bind(source(), "cache_dir", spec, batch, False)
    except TypeError as e:
        print(f"  skipped: build_cache / CacheSpec signature changed ({e}); update bench_cache_overhead")
        return

    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**6))

        def generate_only() -> None:
            src = source()
            for _ in src.generate(0, n_rows, batch):
                pass
            src.close()

        def with_cache() -> None:
            build_cache(source(), Path(tmp) / f"c{next(counter)}", spec, batch, False)

        times = _interleaved(
            {"generate only": generate_only, "build_cache (HDF5, bf16)": with_cache}, repeats
        )
    _report(times, "generate only", unit_rows=n_rows)
    overhead = statistics.median(times["build_cache (HDF5, bf16)"]) / statistics.median(
        times["generate only"]
    )
    print(f"  => cache writing costs {100 * (overhead - 1):+.1f}% on top of generating the activations")


def main() -> None:
    p = argparse.ArgumentParser(description="early-stop capture vs full forward; cache-writing overhead")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128, help="d_model of the random model")
    p.add_argument("--skip-cache", action="store_true", help="only the capture benchmark")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_dir = build_tiny_lm(
            Path(tmp) / "gemma26", arch="gemma2", n_layers=N_LAYERS, hidden_size=args.hidden
        )
        print(
            f"built a random Gemma-2-style model with {N_LAYERS} layers, d_model {args.hidden} "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        bench_capture(model_dir, args.repeats, args.batch, args.ctx_len)
        if not args.skip_cache:
            bench_cache_overhead(model_dir, args.repeats, args.batch, args.ctx_len)


if __name__ == "__main__":
    main()
