"""Test-only instrumentation of a (DDP) training run, used by ``tests/training/test_ddp.py``.

``DDPProbe`` is passed on the command line (``--trainer.callbacks+=...``) and writes, per rank,
``rank<R>.json`` with what that rank saw: a hash of every training row it was fed (batches carry no
row ids, so rows are identified by their contents), the cache files it read (inode and mtime), and a
hash of the trained SAE. It also captures the INFO logs of ``data.*`` (which say when a process loads
the language model) into ``log_rank<R>.txt``, so a test can tell which processes ran the LM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import lightning as L
import torch
from typing_extensions import override

__all__ = ["DDPProbe", "row_hashes", "state_hash"]


def row_hashes(batch: dict[str, torch.Tensor]) -> list[str]:
    """One hash per row (sequence) of a batch, over the exact bytes of its ``acts`` and ``tokens``."""
    acts = batch["acts"].detach().cpu().contiguous()  # [B, T, d]
    raw = acts.view(torch.int16) if acts.dtype in (torch.bfloat16, torch.float16) else acts
    tokens = batch["tokens"].detach().cpu().contiguous()  # [B, T]
    return [
        hashlib.sha1(raw[i].numpy().tobytes() + tokens[i].numpy().tobytes()).hexdigest()
        for i in range(acts.shape[0])
    ]


def state_hash(module: torch.nn.Module) -> str:
    """Hash of every tensor of ``module.state_dict()`` (names, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update((t.view(torch.uint8) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def _rank_from_env() -> int:
    # Lightning sets LOCAL_RANK (and friends) for the processes it launches; the launching one is rank 0
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


class DDPProbe(L.Callback):
    """Record, per rank, the rows fed to training, the cache files read and the final SAE hash.

    Args:
        out_dir: folder for ``rank<R>.json`` and ``log_rank<R>.txt``.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []  # {"epoch", "step", "hashes"} per training batch
        self.files_at_setup: dict[str, list[int]] = {}
        # attached at construction: prepare_data (where the cache is built) runs before any Callback hook
        handler = logging.FileHandler(self.out_dir / f"log_rank{_rank_from_env()}.txt")
        handler.setFormatter(logging.Formatter("%(process)d %(name)s %(message)s"))
        data_log = logging.getLogger("data")
        data_log.setLevel(logging.INFO)
        data_log.addHandler(handler)

    def _files(self, trainer: L.Trainer) -> dict[str, list[int]]:
        root = Path(trainer.datamodule.cache_root)
        return {p.name: [p.stat().st_ino, p.stat().st_mtime_ns] for p in sorted(root.iterdir())}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.files_at_setup = self._files(trainer)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int
    ) -> None:
        self.rows.append(
            {"epoch": trainer.current_epoch, "step": trainer.global_step, "hashes": row_hashes(batch)}
        )

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "global_step": trainer.global_step,
            "cache_root": str(Path(trainer.datamodule.cache_root).resolve()),
            "files_at_setup": self.files_at_setup,
            "files_at_end": self._files(trainer),
            "batches": self.rows,
            "sae_hash": state_hash(pl_module.sae),
            "act_scale": float(pl_module.act_scale),
        }
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(report))
