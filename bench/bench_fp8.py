"""Would fp8 storage (e4m3 with one scale per token) keep SAE quality? Measured, not assumed.

For two kinds of activations, the demo's synthetic sequences (d_in 64) and the residual stream of a
tiny offline LM (``mtsae.tiny_lm``, layer 2 of 4, d_model 64):
1. the storage error alone: ``||x - deq(q(x))||^2 / ||x - mean||^2`` (the FVU of the round trip), for
   bf16 (the current storage) and fp8 with a per-token or a per-sequence scale;
2. SAEs (per-token and MTSAE mix, L1, same seed and steps) trained on bf16 vs on fp8 (per-token scale)
   activations, both evaluated on held-out bf16 activations: the FVU difference, against the
   difference between two training seeds on bf16 (what counts as noise).
fp8 would halve the disk of bf16 (1 byte per value plus 4 bytes per token for the scale). The
tolerance: the FVU change must be within ``TOLERANCE`` absolute and within the seed-to-seed spread.

    python bench/bench_fp8.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402

from bench.common import BenchConfig, Row  # noqa: E402
from mtsae.losses import fvu  # noqa: E402
from mtsae.module import SAEModule  # noqa: E402

TOLERANCE = 0.005  # absolute FVU
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_round_trip(x: torch.Tensor, per: str = "token") -> torch.Tensor:
    """``x [N, T, d]`` stored as float8_e4m3fn with one fp32 scale per token (or per sequence)."""
    dims = (-1,) if per == "token" else (-2, -1)
    scale = x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


def _storage_fvu(x: torch.Tensor, valid: torch.Tensor, y: torch.Tensor) -> float:
    return float(fvu(x, y, valid))


def _train(
    x: torch.Tensor, valid: torch.Tensor, kind: dict, steps: int, seed: int, batch: int = 16
) -> SAEModule:
    torch.manual_seed(seed)
    m = SAEModule(x.shape[-1], 256, sparsity_coeff=2.0, **kind)
    m.initialise_from_stats(
        {"mean_sq_norm": float(x[valid].pow(2).sum(-1).mean()), "mean": x[valid].mean(0).tolist()}
    )
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3, fused=True)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb, vb = x[idx] * m.act_scale, valid[idx]
        out = m.sae(xb, vb)
        loss = m._losses(xb, vb, out)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        m.sae.project_decoder_grad_()
        opt.step()
        m.sae.normalize_decoder_()
    return m


@torch.no_grad()
def _eval_fvu(m: SAEModule, x: torch.Tensor, valid: torch.Tensor) -> float:
    xs = x * m.act_scale
    return float(fvu(xs, m.sae(xs, valid).x_hat, valid))


def _synthetic(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from data import SyntheticSource

    chunk = next(SyntheticSource(d_in=64, ctx_len=64, seed=0).generate(0, n, n))
    return chunk.acts.float(), chunk.valid


def _tiny_lm(n: int, workdir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from data import LMSource
    from mtsae.tiny_lm import build_tiny_lm

    lm = build_tiny_lm(workdir / "tiny_lm_fp8")
    src = LMSource(
        model_name=str(lm),
        layer=2,
        dataset=str(lm / "corpus.jsonl"),
        ctx_len=32,
        device="cpu",
        progress=False,
    )
    chunks = list(src.generate(0, n, 64))
    src.close()
    return torch.cat([c.acts for c in chunks]).float(), torch.cat([c.valid for c in chunks])


def run(cfg: BenchConfig) -> list[Row]:
    rows = []
    steps = 300 if cfg.quick else 1500
    data = {"synthetic": _synthetic(1024 if cfg.quick else 2048), "tiny LM": _tiny_lm(512, cfg.workdir)}
    for name, (x, valid) in data.items():
        n_test = x.shape[0] // 8
        bf16_err = _storage_fvu(x[n_test:], valid[n_test:], x[n_test:].to(torch.bfloat16).float())
        x = x.to(torch.bfloat16).float()  # what the cache stores today; fp8 is made from it
        xt, vt, xs, vs = x[n_test:], valid[n_test:], x[:n_test], valid[:n_test]
        q_tok, q_seq = fp8_round_trip(xt, "token"), fp8_round_trip(xt, "sequence")
        tok_err, seq_err = _storage_fvu(xt, vt, q_tok), _storage_fvu(xt, vt, q_seq)
        rows.append(
            Row(
                f"fp8 storage FVU (round trip), {name}",
                tok_err,
                "",
                f"per-token scale; per-sequence scale {seq_err:.2e}; bf16 (from fp32) {bf16_err:.1e}",
            )
        )
        for kind_name, kind in (
            ("per-token SAE", dict(dilations=[], separation="none")),
            ("MTSAE mix", dict(encoder="mix")),
        ):
            base = _eval_fvu(_train(xt, vt, kind, steps, 0), xs, vs)
            seed = _eval_fvu(_train(xt, vt, kind, steps, 1), xs, vs)
            fp8 = _eval_fvu(_train(q_tok, vt, kind, steps, 0), xs, vs)
            delta, spread = fp8 - base, abs(seed - base)
            ok = abs(delta) <= TOLERANCE and abs(delta) <= max(spread, 1e-4)
            rows.append(
                Row(
                    f"SAE FVU trained on fp8 - on bf16: {kind_name}, {name}",
                    delta,
                    f"<= {TOLERANCE}",
                    f"FVU bf16 {base:.4f}, fp8 {fp8:.4f}; seed-to-seed {spread:.4f}; "
                    f"{'within' if ok else 'outside'} noise; {steps} steps",
                )
            )
        print(
            f"  {name}: storage FVU fp8/token {tok_err:.2e}, fp8/sequence {seq_err:.2e}, bf16 {bf16_err:.1e}"
        )
    return rows


if __name__ == "__main__":
    from bench.run_all import main

    raise SystemExit(main(["--only", "fp8"]))
