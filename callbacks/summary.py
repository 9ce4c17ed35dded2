"""Say where a run's logs, checkpoints and exported SAE are, and its final validation metrics."""

from __future__ import annotations

import json

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from callbacks.export import ExportSAE, run_dir
from callbacks.plateau import PlateauStopping

__all__ = ["RunSummary"]


def _step(last: str, best: str, trainer: L.Trainer) -> int | None:
    if last:  # callbacks.ModelCheckpoint writes last.ckpt at the final step
        return trainer.global_step
    if best:
        return int(torch.load(best, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    return None


class RunSummary(L.Callback):
    """At the end of ``fit``, log a summary and write it to ``<run dir>/summary.json``."""

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
        ckpts = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        exports = [cb.path for cb in trainer.callbacks if isinstance(cb, ExportSAE) and cb.path is not None]
        out = run_dir(trainer)
        summary = {
            "run_dir": str(out),
            "tensorboard": f"tensorboard --logdir {out.parent}",
            # the final model (last.ckpt at the last step) when the callback keeps one, else the best
            "checkpoint": (ckpts[0].last_model_path or ckpts[0].best_model_path) if ckpts else None,
            "checkpoint_step": _step(ckpts[0].last_model_path, ckpts[0].best_model_path, trainer)
            if ckpts
            else None,
            "exported_sae": str(exports[0]) if exports else None,
            "global_step": trainer.global_step,
            "max_steps": trainer.max_steps if trainer.max_steps > 0 else None,
            # how the run ended: a PlateauStopping record (plateaued or not), else None
            "stopping": next(
                (cb.summary() for cb in trainer.callbacks if isinstance(cb, PlateauStopping)), None
            ),
            "final_val_metrics": metrics,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        width = max((len(k) for k in metrics), default=0)
        lines = [
            "",
            "run finished",
            f"  logs:        {out}   (view: {summary['tensorboard']})",
            f"  checkpoint:  {summary['checkpoint']} (step {summary['checkpoint_step']})",
            f"  SAE:         {summary['exported_sae']}",
            f"  summary:     {out / 'summary.json'}",
            "  final validation metrics:",
            *[f"    {k:<{width}} {v:.4f}" for k, v in metrics.items()],
        ]
        rank_zero_info("\n".join(lines))
