"""``mtsae features`` at scale: a 16k-feature SAE, its streaming pass over 1x and 16x as many tokens.

Each measurement runs in a fresh process (``--child``) and reports its wall time and peak resident
memory (``VmHWM``):

- **pass**: :func:`mtsae.features.collect._stream`, the one pass over every token (encode + streaming
  top-k, sample, histograms, firing counts) of a per-token ReLU SAE (``d_in`` 64, 16384 features, random
  unit encoder rows, ``b_enc = -2.88``: about 33 features fire per token of unit-Gaussian activations) on
  ``n`` = 65,536 and ``16 n`` = 1,048,576 tokens. The time must grow linearly with the tokens (ratio of
  the time per token, 16n vs n, about 1) and the memory must not grow (it holds one batch of codes and
  ``O(features)`` statistics).
- **dashboard**: :func:`mtsae.features.collect_dashboard` + :func:`mtsae.features.write_site` for all
  16384 features on ``n`` tokens (pass, re-reading the example rows, one page of data per feature).

Activations are drawn per row from a seeded generator (no cache on disk: the disk would be measured
too), ``ctx_len`` 128, one torch thread.

    python bench/bench_features.py [--quick]       # prints a markdown table (bench/RESULTS.md)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

D_IN, D_SAE, CTX = 64, 16384, 128
B_ENC = -2.88  # P(N(0, 1) > 2.88) = 0.002: about 33 of 16384 features per token


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, n_tokens: int, out: str) -> None:
    import numpy as np
    import torch

    from mtsae import MTSAE
    from mtsae.features import FeaturesConfig, collect_dashboard, write_site
    from mtsae.features.collect import _stream

    torch.set_num_threads(1)
    torch.manual_seed(0)
    sae = MTSAE(D_IN, D_SAE, dilations=[], activation="relu").eval()
    with torch.no_grad():
        sae.b_enc.fill_(B_ENC)

    def read_rows(rows: np.ndarray) -> dict[str, torch.Tensor]:
        acts = []
        for r in rows.tolist():
            acts.append(torch.randn(CTX, D_IN, generator=torch.Generator().manual_seed(r)))
        n = len(acts)
        return {
            "acts": torch.stack(acts),
            "tokens": torch.full((n, CTX), -1, dtype=torch.int32),
            "valid": torch.ones(n, CTX, dtype=torch.bool),
        }

    rows = np.arange(n_tokens // CTX)
    cfg = FeaturesConfig()
    t0 = time.perf_counter()
    if kind == "pass":
        res = _stream(sae, read_rows, rows, torch.arange(D_SAE), cfg, "cpu", progress=False)
        assert res.n_tokens == len(rows) * CTX
    else:
        data = collect_dashboard(sae, read_rows, rows, cfg, progress=False)
        write_site(data, out)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}))


def measure(kind: str, n_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(
            [sys.executable, __file__, "--child", kind, str(n_tokens), tmp],
            capture_output=True,
            text=True,
            check=True,
            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1/16 of the tokens (a smoke run)")
    p.add_argument("--child", nargs=3, metavar=("KIND", "TOKENS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    n = 4096 if args.quick else 65536
    small, large = measure("pass", n), measure("pass", 16 * n)
    dash = measure("dashboard", n)
    per_tok = [m["seconds"] / t * 1e6 for m, t in ((small, n), (large, 16 * n))]
    print("| measurement | value | note |\n|---|---:|---|")
    print(
        f"| pass, {n:,} tokens | {small['seconds']:.1f} s | {per_tok[0]:.1f} us/token, peak RSS {small['peak_rss_mb']:.0f} MB |"
    )
    print(
        f"| pass, {16 * n:,} tokens | {large['seconds']:.1f} s | {per_tok[1]:.1f} us/token, peak RSS {large['peak_rss_mb']:.0f} MB |"
    )
    print(
        f"| time per token, {16 * n:,} / {n:,} tokens | {per_tok[1] / per_tok[0]:.3f} | 1 = linear in tokens |"
    )
    print(
        f"| peak RSS, {16 * n:,} / {n:,} tokens | {large['peak_rss_mb'] / small['peak_rss_mb']:.3f} | 1 = memory independent of tokens |"
    )
    print(
        f"| whole dashboard, {D_SAE} features, {n:,} tokens | {dash['seconds']:.1f} s | pass + example rows + {D_SAE} pages; peak RSS {dash['peak_rss_mb']:.0f} MB |"
    )


if __name__ == "__main__":
    main()
