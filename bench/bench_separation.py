"""Does each separation loss move its own term? Short demo trainings with and without it, side by side.

For each kind that compares the dilation branches (``scales``, ``scales_decorr``, ``context_decorr``):
``configs/demo.yaml`` (1024 sequences, no validation, ``log_every_n_steps 1``) trained for 60 steps at
the loss's default weight (0.1) and again at weight 0, where the term is still computed and logged but
does not train. The row is the logged ``train/separation`` of the last step without the loss minus with
it: how much the loss lowered what it penalises (the runs see the same batches from the same model).

    python bench/bench_separation.py     # = python bench/run_all.py --only separation
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from lightning.pytorch.callbacks import Callback  # noqa: E402

from bench.common import BenchConfig, Row  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KINDS = ("scales", "scales_decorr", "context_decorr")
STEPS = 60
WEIGHT = 0.1  # the default separation_coeff
TARGET = 5e-3  # the new kind must move its term by at least this much (issue 21)


class SeparationTrace(Callback):
    """``train/separation`` after every training step (the run must log every step)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train/separation"]))


def separation_trace(workdir: Path, kind: str, coeff: float, steps: int = STEPS) -> list[float]:
    """``train/separation`` at each of ``steps`` steps of ``configs/demo.yaml`` (1024 sequences, no
    validation, no callbacks, cache under ``workdir``) with separation ``kind`` at weight ``coeff``."""
    from train import cli_main

    trace = SeparationTrace()
    cli = cli_main(
        [
            "--config", str(REPO / "configs/demo.yaml"),
            "--config", str(REPO / "configs/debug/quiet.yaml"),
            "--data.cache_dir", str(workdir / "cache"),
            "--data.n_sequences", "1024",
            "--trainer.default_root_dir", str(workdir / "runs"),
            "--trainer.logger", "false",
            "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false",
            "--trainer.limit_val_batches", "0",
            "--trainer.max_steps", str(steps),
            "--trainer.log_every_n_steps", "1",
            "--model.separation", kind,
            "--model.separation_coeff", str(coeff),
        ],
        run=False,
    )  # fmt: skip
    cli.trainer.callbacks.append(trace)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return trace.values


def run(cfg: BenchConfig) -> list[Row]:
    rows = []
    for kind in KINDS:
        with_loss = separation_trace(cfg.workdir, kind, WEIGHT)
        without = separation_trace(cfg.workdir, kind, 0.0)
        rows.append(
            Row(
                f"{kind}: term without - with the loss, {STEPS} demo steps",
                without[-1] - with_loss[-1],
                f">= {TARGET}" if kind == "context_decorr" else "",
                f"step 0 {with_loss[0]:.5f}; step {STEPS}: {with_loss[-1]:.5f} at weight {WEIGHT}, "
                f"{without[-1]:.5f} at 0",
            )
        )
    return rows


if __name__ == "__main__":
    from bench.run_all import main

    raise SystemExit(main(["--only", "separation"]))
