"""Causal depth-wise dilated convolutions: shifted multiply-adds (the model's) vs ``F.conv1d``.

Prints the time of forward + backward of each, measured interleaved in one run, and their ratio.
    python bench/bench_conv.py [--d-in 64] [--batch 32] [--ctx 64] [--repeats 30]
"""

from __future__ import annotations

import argparse
import time

import torch

from mtsae.model import MTSAE, conv1d_scale_branches


def compare(d_in: int, batch: int, ctx: int, repeats: int, device: str) -> float:
    """Print the timings; return F.conv1d time / shifted multiply-add time (forward + backward)."""
    torch.manual_seed(0)
    sae = MTSAE(d_in, 4 * d_in).to(device)
    with torch.no_grad():
        sae.conv_weight.normal_()
    u = torch.randn(batch, ctx, d_in, device=device, requires_grad=True)
    impls = {"shift (model)": sae.scale_branches, "F.conv1d": lambda t: conv1d_scale_branches(sae, t)}
    assert torch.allclose(impls["shift (model)"](u), impls["F.conv1d"](u), atol=1e-5)
    times = {k: [] for k in impls}
    for _ in range(3):  # warm-up
        for fn in impls.values():
            fn(u).sum().backward()
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        for name, fn in impls.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(u).sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"device={device} B={batch} T={ctx} d_in={d_in} dilations={sae.dilations}")
    for k, v in med.items():
        print(f"  {k:<14} {v:8.3f} ms (median forward+backward)")
    ratio = med["F.conv1d"] / med["shift (model)"]
    print(f"  ratio F.conv1d / shift = {ratio:.2f}")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    compare(a.d_in, a.batch, a.ctx, a.repeats, a.device)


if __name__ == "__main__":
    main()
