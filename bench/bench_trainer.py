"""Lightning's ``Trainer`` against a plain loop doing the same maths on the same batches.

Both run ``SAEModule``'s step (forward, losses, backward, decoder-norm projection, fused Adam, renorm,
dead-latent tracking); the Trainer adds its loop, hooks and logging (TensorBoard, ``log_every_n_steps``
10 as in ``configs/demo.yaml``). Per-step times are the medians of the gaps between consecutive step
starts (start-up costs excluded), each side run ``repeats`` times alternately. The overhead in ms per
step is measured at a size where the maths is negligible, then compared with the step time of the
Gemma-sized model on an H100 (from its FLOPs at a stated MFU, see ``docs/performance.md``).

    python bench/bench_trainer.py [--quick] [--device auto]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from bench.bench_step import DILATIONS, step_flops  # noqa: E402
from bench.common import BenchConfig, Row, autocast  # noqa: E402
from mtsae.module import SAEModule  # noqa: E402

# an H100 SXM's dense bf16 peak and the MFU assumed for the SAE step (docs/performance.md)
H100_BF16_FLOPS, ASSUMED_MFU = 989e12, 0.5


class _StepClock(L.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())


def _gaps(starts: list[float]) -> list[float]:
    return [b - a for a, b in zip(starts[1:], starts[2:], strict=False)]  # drop the first (warm-up) gap


def _trainer_steps(make: callable, batches: list[dict], cfg: BenchConfig) -> list[float]:
    clock = _StepClock()
    with tempfile.TemporaryDirectory(dir=cfg.workdir) as tmp:
        trainer = L.Trainer(
            accelerator=cfg.device.type,
            devices=1,
            precision="bf16-mixed" if cfg.dtype == torch.bfloat16 else "32-true",
            max_steps=len(batches),
            logger=TensorBoardLogger(tmp, name="bench"),
            log_every_n_steps=10,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[clock],
        )
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(make(), train_dataloaders=loader)
    return _gaps(clock.starts)


def _plain_steps(make: callable, batches: list[dict], cfg: BenchConfig) -> list[float]:
    m = make().to(cfg.device)
    opt = m.configure_optimizers()
    starts = []
    for batch in batches:
        if cfg.device.type == "cuda":
            torch.cuda.synchronize()
        starts.append(time.perf_counter())
        x = batch["acts"].to(cfg.device, non_blocking=True).float() * m.act_scale
        valid = batch["valid"].to(cfg.device, non_blocking=True)
        with autocast(cfg):
            out = m.sae(x, valid)
            m.dead_tracker.update(out.f.detach(), valid)
            loss = m._losses(x, valid, out)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        m.sae.project_decoder_grad_()
        opt.step()
        m.sae.normalize_decoder_()
    return _gaps(starts)


def _compare(d_in: int, d_sae: int, kind: dict, n_rows: int, T: int, n_steps: int, cfg: BenchConfig):
    g = torch.Generator().manual_seed(0)
    batches = [
        {"acts": torch.randn(n_rows, T, d_in, generator=g), "valid": torch.ones(n_rows, T, dtype=torch.bool)}
        for _ in range(n_steps)
    ]

    def make() -> SAEModule:
        torch.manual_seed(0)
        opt = lambda params: torch.optim.Adam(params, lr=1e-4, fused=True)  # noqa: E731
        return SAEModule(
            d_in, d_sae, optimizer=opt, init_b_dec_from_data=False, scale_activations=False, **kind
        )

    tr, pl = [], []
    for _ in range(max(2, cfg.repeats // 2)):  # alternate whole runs: machine noise hits both alike
        tr += _trainer_steps(make, batches, cfg)
        pl += _plain_steps(make, batches, cfg)
    return statistics.median(tr), statistics.median(pl)


def run(cfg: BenchConfig) -> list[Row]:
    rows = []
    per_token = dict(dilations=[], separation="none")
    mtsae = dict(dilations=DILATIONS)
    # 1. the overhead itself, where the maths costs little
    t_tr, t_pl = _compare(64, 256, per_token, 2, 64, 40 if cfg.quick else 80, cfg)
    over_ms = (t_tr - t_pl) * 1e3
    gemma_ms = {
        enc: step_flops(enc, 2304, 16384, 4096) / (H100_BF16_FLOPS * ASSUMED_MFU) * 1e3
        for enc in ("MTSAE concat", "MTSAE mix")
    }
    rows.append(
        Row(
            "Trainer overhead per step / gemma MTSAE-mix step on H100",
            over_ms / gemma_ms["MTSAE mix"],
            "<= 0.03",
            f"{over_ms:.2f} ms per step (Trainer {t_tr * 1e3:.2f} vs plain {t_pl * 1e3:.2f} ms at 64x256); "
            f"H100 step at {ASSUMED_MFU:.0%} MFU: mix {gemma_ms['MTSAE mix']:.1f} ms, "
            f"concat {gemma_ms['MTSAE concat']:.1f} ms",
        )
    )
    # 2. Trainer / plain loop at a training size, both models
    d_in, d_sae, n_rows = (256, 2048, 2) if cfg.quick else (512, 4096, 4)
    if cfg.device.type == "cuda":
        d_in, d_sae, n_rows = 2304, 16384, 32
    for name, kind in (("per-token", per_token), ("MTSAE concat", mtsae)):
        t_tr, t_pl = _compare(d_in, d_sae, kind, n_rows, 128, 12 if cfg.quick else 16, cfg)
        rows.append(
            Row(
                f"Trainer / plain loop: {name}, {d_in}x{d_sae}",
                t_tr / t_pl,
                "<= 1.03",
                f"{n_rows * 128} tokens; {t_tr * 1e3:.1f} vs {t_pl * 1e3:.1f} ms per step",
            )
        )
    return rows


if __name__ == "__main__":
    from bench.run_all import main

    raise SystemExit(main(["--only", "trainer"]))
