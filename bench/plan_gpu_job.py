"""The GPU job of ``configs/gemma_l19.yaml`` planned on paper: capture, cache reads and training time.

Reads the job's sizes from the config, takes Gemma-2-2B's shape from its published config and the
H100's from its datasheet, and prints the time of each phase on 1 and on N GPUs, the bottleneck, and
the read bandwidth a GPU needs. Assumptions are arguments (``--help``); ``docs/performance.md``
quotes this script's output with its defaults.

    python bench/plan_gpu_job.py [--config configs/gemma_l19.yaml] [--gpus 8] [--sae-mfu 0.5] ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

# google/gemma-2-2b config.json: hidden_size, intermediate_size, heads, kv heads, head_dim
GEMMA2_2B = dict(d_model=2304, d_ff=9216, n_heads=8, n_kv=4, head_dim=256, n_layers=26)
H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM5 datasheet (dense, no sparsity)


def block_flops_per_token(ctx: int, g: dict = GEMMA2_2B) -> float:
    """Forward FLOPs of one decoder block per token (matmuls; causal attention over ``ctx`` tokens)."""
    d, hd = g["d_model"], g["head_dim"]
    qkvo = d * g["n_heads"] * hd * 2 + d * g["n_kv"] * hd * 2  # q, o and k, v projections
    mlp = 3 * d * g["d_ff"]  # gate, up, down
    attn = 2 * g["n_heads"] * hd * (ctx + 1) / 2  # QK^T and AV, average causal length
    return 2 * (qkvo + mlp) + 2 * attn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/gemma_l19.yaml")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--capture-mfu", type=float, default=0.3, help="MFU of the LM forward (HF, eager)")
    ap.add_argument("--sae-mfu", type=float, default=0.5, help="MFU of the SAE step (two large matmuls)")
    ap.add_argument("--disk-gbps", type=float, nargs="+", default=[2.0, 7.0, 25.0], help="read GB/s")
    ap.add_argument(
        "--worker-gbps",
        type=float,
        default=1.2,
        help="GB/s one loader process reads (bench/RESULTS.md measured 2.3: 3940 rows/s x 590 KB)",
    )
    a = ap.parse_args()
    cfg = yaml.safe_load(Path(a.config).read_text())
    data, model = cfg["data"], cfg["model"]
    ctx, n_seq = data["source"]["init_args"]["ctx_len"], data["n_sequences"] + data["val_sequences"]
    layer = data["source"]["init_args"]["layer"]
    d, d_sae, S = GEMMA2_2B["d_model"], model["d_sae"], len(model["dilations"])
    tokens = data["n_sequences"] * ctx
    bytes_per_token = d * 2  # bf16
    cache_gb = data["n_sequences"] * ctx * bytes_per_token / 1e9

    capture = (layer + 1) * block_flops_per_token(ctx) * n_seq * ctx
    t_capture = capture / (H100_BF16_DENSE * a.capture_mfu)
    print(f"{a.config}: {tokens / 1e6:.1f}M training tokens, cache {cache_gb:.0f} GB (bf16)")
    print(f"capture to layer {layer}: {capture / n_seq / ctx / 1e9:.2f} GFLOP/token, {capture:.3g} FLOP")
    print(
        f"  1 H100 at {a.capture_mfu:.0%} MFU: {t_capture / 60:.1f} min (rank 0 builds the cache: also with {a.gpus} GPUs)"
    )
    for bw in a.disk_gbps:
        print(
            f"  writing the cache at {bw} GB/s: {cache_gb / bw / 60:.1f} min (overlaps capture: background writer)"
        )
    for enc in ("concat", "mix"):
        d_enc = d * (S if enc == "concat" else 1)
        per_tok = 6 * d_sae * (d_enc + d)
        rate = H100_BF16_DENSE * a.sae_mfu / per_tok  # tokens/s per GPU
        need = rate * bytes_per_token / 1e9
        t1, tn = tokens / rate, tokens / rate / a.gpus
        print(
            f"train, {enc} encoder: {per_tok / 1e9:.3f} GFLOP/token; per H100 at {a.sae_mfu:.0%} MFU "
            f"{rate / 1e6:.2f}M tokens/s = {need:.1f} GB/s of cache; epoch {t1 / 60:.1f} min on 1, "
            f"{tn / 60:.2f} min on {a.gpus}; workers per GPU at {a.worker_gbps} GB/s: {need / a.worker_gbps:.1f}"
        )
        for bw in a.disk_gbps:
            t_read = cache_gb / bw
            for n, t in ((1, t1), (a.gpus, tn)):
                bound = "disk" if t_read > t else "GPU"
                print(
                    f"    disk {bw:>4} GB/s, {n} GPU(s): read {t_read / 60:5.1f} min vs compute {t / 60:5.1f} min -> {bound}-bound"
                )


if __name__ == "__main__":
    main()
