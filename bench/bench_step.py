"""The SAE training step against the machine's matmul, the MTSAE encoders, Adam and the step's profile.

For each size, timed side by side (interleaved repeats, medians):
- a reference matmul ``[N, d_in] @ [d_in, d_sae]`` (the machine's matmul FLOP/s at this shape);
- the full training step (forward, losses, backward, decoder-norm projection, fused Adam, renorm) of a
  per-token SAE, an MTSAE with the ``concat`` encoder and one with the ``mix`` encoder (dilations
  1, 2, 4, 8; ``scales`` separation for both MTSAEs).
Achieved FLOP/s counts the matmuls only: ``6 N d_sae (d_enc + d_in)`` per step with ``d_enc = d_in``
(per-token, mix) or ``4 d_in`` (concat). At the first size it also times the pieces of the MTSAE step
(Adam variants, the decoder-norm constraint, the ``scales`` and ``context_decorr`` separation losses)
and reports their share of the step.

    python bench/bench_step.py [--quick] [--device auto]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402

from bench.common import BenchConfig, Row, autocast, interleaved, sae_step  # noqa: E402
from mtsae.training.losses import context_decorrelation, scales_separation  # noqa: E402
from mtsae.training.module import SAEModule  # noqa: E402

DILATIONS = [1, 2, 4, 8]
MODELS = {
    "per-token": dict(dilations=[], separation="none"),
    "MTSAE concat": dict(dilations=DILATIONS, encoder="concat"),
    "MTSAE mix": dict(dilations=DILATIONS, encoder="mix"),
}


def sizes(cfg: BenchConfig) -> list[tuple[int, int, int]]:
    """``(d_in, d_sae, tokens per step)``; the second size is Gemma-2-2B's width with a 16k dictionary."""
    if cfg.device.type == "cuda":
        return [(512, 4096, 4096), (2304, 16384, 4096)]
    if cfg.quick:
        return [(256, 2048, 512), (512, 4096, 256)]
    return [(512, 4096, 1024), (2304, 16384, 256)]


def _module(d_in: int, d_sae: int, kind: str, device: torch.device) -> SAEModule:
    m = SAEModule(d_in, d_sae, **MODELS[kind]).to(device)
    m.act_scale.fill_(1.0)
    return m


def _step_fn(
    m: SAEModule, opt: torch.optim.Optimizer, x: torch.Tensor, valid: torch.Tensor, cfg: BenchConfig
):
    def step() -> None:
        sae_step(m, opt, x, valid, autocast(cfg))

    return step


def step_flops(kind: str, d_in: int, d_sae: int, n_tokens: int) -> float:
    d_enc = d_in * (len(DILATIONS) if kind == "MTSAE concat" else 1)
    return 6.0 * n_tokens * d_sae * (d_enc + d_in)


def run(cfg: BenchConfig) -> list[Row]:
    rows: list[Row] = []
    dev = cfg.device
    torch.manual_seed(0)
    for i, (d_in, d_sae, n_tok) in enumerate(sizes(cfg)):
        T = 128 if n_tok >= 128 else n_tok
        x = torch.randn(n_tok // T, T, d_in, device=dev)
        valid = torch.ones(n_tok // T, T, dtype=torch.bool, device=dev)
        valid[:, 0] = False  # BOS
        a = torch.randn(n_tok, d_in, device=dev, dtype=cfg.dtype)
        b = torch.randn(d_in, d_sae, device=dev, dtype=cfg.dtype)
        fns = {"matmul": lambda a=a, b=b: a @ b}
        peer = _saelens_step(d_in, d_sae, x, cfg)
        if callable(peer):
            fns["SAELens"] = peer
        modules = {}
        for kind in MODELS:
            m = _module(d_in, d_sae, kind, dev)
            opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)
            modules[kind] = (m, opt)
            fns[kind] = _step_fn(m, opt, x, valid, cfg)
        t = interleaved(fns, cfg.repeats, dev)
        mm_flops = 2.0 * n_tok * d_in * d_sae / t["matmul"]
        size = f"{d_in}x{d_sae}, {n_tok} tokens"
        print(
            f"  {size}: matmul {mm_flops / 1e9:.1f} GFLOP/s; "
            + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items())
        )
        for kind in MODELS:
            achieved = step_flops(kind, d_in, d_sae, n_tok) / t[kind]
            rows.append(
                Row(
                    f"step FLOP/s / matmul FLOP/s: {kind}, {d_in}x{d_sae}",
                    achieved / mm_flops,
                    "",
                    f"{size}; step {t[kind] * 1e3:.1f} ms",
                )
            )
        if callable(peer):
            rows.append(
                Row(
                    f"SAELens step / project per-token step, {d_in}x{d_sae}",
                    t["SAELens"] / t["per-token"],
                    "",
                    "> 1: the project is faster; SAELens StandardTrainingSAE (L1), same tensors, "
                    "same fused Adam; the project's step also keeps decoder rows at unit norm",
                )
            )
        else:
            rows.append(Row(f"SAELens step / project per-token step, {d_in}x{d_sae}", None, "", peer))
        rows.append(
            Row(
                f"MTSAE mix step / per-token step, {d_in}x{d_sae}",
                t["MTSAE mix"] / t["per-token"],
                "<= 1.5",
                f"concat / per-token = {t['MTSAE concat'] / t['per-token']:.2f}",
            )
        )
        if i == 0:
            rows += _profile(modules["MTSAE concat"], x, valid, t["MTSAE concat"], cfg, size)
    return rows


def _saelens_step(d_in: int, d_sae: int, x: torch.Tensor, cfg: BenchConfig):
    """SAELens's standard (L1) SAE training step on the same tokens, or why it cannot run."""
    try:
        import sae_lens
        from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError as err:
        return f"sae_lens is not importable ({err}); optional: pip install sae-lens"
    sl = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=5.0))
    sl = sl.to(cfg.device)
    opt = torch.optim.Adam(sl.parameters(), lr=1e-4, fused=True)
    x_ND = x.flatten(0, 1)  # SAELens trains on tokens [N, d_in]
    print(f"  SAELens {sae_lens.__version__}")

    def step() -> None:
        inp = TrainStepInput(
            x_ND, {"l1": 5.0}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
        )
        with autocast(cfg):
            loss = sl.training_forward_pass(inp).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _profile(
    mo, x: torch.Tensor, valid: torch.Tensor, t_step: float, cfg: BenchConfig, size: str
) -> list[Row]:
    """Shares of the MTSAE (concat) step: Adam (fused vs the default), decoder constraint, separation."""
    m, _ = mo
    dev = cfg.device
    params = [p for p in m.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    adams = {
        "Adam default": torch.optim.Adam(params, lr=1e-12),
        "Adam foreach": torch.optim.Adam(params, lr=1e-12, foreach=True),
        "Adam fused": torch.optim.Adam(params, lr=1e-12, fused=True),
    }
    u = torch.randn_like(x)

    def separation() -> None:
        z = m.sae.scale_branches(u.requires_grad_(True))
        scales_separation(z, valid).backward()

    def context_separation() -> None:
        z = m.sae.scale_branches(u.requires_grad_(True))
        context_decorrelation(m.sae.context_contributions(u, z), valid).backward()

    def constraint() -> None:
        m.sae.project_decoder_grad_()
        m.sae.normalize_decoder_()

    t = interleaved(
        {
            **{k: o.step for k, o in adams.items()},
            "constraint": constraint,
            "separation": separation,
            "context": context_separation,
        },
        cfg.repeats,
        dev,
    )
    note = f"MTSAE concat {size}, step {t_step * 1e3:.1f} ms"
    return [
        Row(
            "Adam default / Adam fused (optimizer step)",
            t["Adam default"] / t["Adam fused"],
            "",
            f"foreach / fused = {t['Adam foreach'] / t['Adam fused']:.2f}; fused {t['Adam fused'] * 1e3:.1f} ms",
        ),
        Row("fused Adam share of the MTSAE step", t["Adam fused"] / t_step, "", note),
        Row("decoder-norm constraint share of the step", t["constraint"] / t_step, "", note),
        Row("scales separation (fwd+bwd) share of the step", t["separation"] / t_step, "", note),
        Row("context_decorr separation (fwd+bwd) share of the step", t["context"] / t_step, "", note),
    ]


if __name__ == "__main__":
    from bench.run_all import main

    raise SystemExit(main(["--only", "step"]))
