"""``callbacks.ModelCheckpoint``: Lightning's ``ModelCheckpoint`` (same arguments) with the guarantees a long
run needs.

- With ``save_last``, ``last.ckpt`` is the model at the final step when ``fit`` ends (Lightning writes
  it only together with another checkpoint, so it can lag behind the end of training).
- SIGTERM (preemption, ``scancel``, a job's time limit) writes ``last.ckpt`` after the current step
  and stops the run; ``train.py`` then exits with status 143 and says how to resume.
- ``--ckpt_path last`` finds the newest ``last.ckpt`` also when checkpoints live in the logger's
  per-run ``version_<n>/checkpoints`` folder (the resumed run logs into a new version folder).
- A new run (not a resume) refuses a checkpoint folder that already holds checkpoints, instead of
  writing ``last-v1.ckpt`` beside an earlier run's ``last.ckpt``.
- One training at a time per checkpoint folder: a run holds ``<dirpath>/.lock`` (an exclusive
  ``flock``) while it trains; a second one started meanwhile, resume or not, is refused.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

__all__ = ["ModelCheckpoint", "CheckpointFolderInUseError"]


class CheckpointFolderInUseError(RuntimeError):
    """A new run was pointed at a checkpoint folder that holds an earlier run's checkpoints."""


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments) whose ``last.ckpt`` is always the final step; saves on SIGTERM.

    Args:
        args: see ``lightning.pytorch.callbacks.ModelCheckpoint``.
        kwargs: see ``lightning.pytorch.callbacks.ModelCheckpoint``.
    """

    #: with several ranks, how often they agree on whether one of them received SIGTERM (a collective)
    DDP_SIGTERM_CHECK_EVERY_N_STEPS = 10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_step_saved: int | None = None
        self._lock_key: str | None = None  # the folder whose lock this callback shares while training

    @override
    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_saved = trainer.global_step

    def _save_last_now(self, trainer: L.Trainer) -> None:
        if self.save_last and self._last_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.dirpath is None:
            return
        if trainer.is_global_zero:
            self._lock_folder()
        if trainer.ckpt_path is not None:
            return
        earlier = sorted(p.name for p in Path(self.dirpath).glob(f"*{self.FILE_EXTENSION}"))
        if earlier:
            raise CheckpointFolderInUseError(
                f"the checkpoint folder {self.dirpath} already holds checkpoints of an earlier run "
                f"({', '.join(earlier[:4])}{', ...' if len(earlier) > 4 else ''}). Resume that run with "
                "--ckpt_path last, or give this run its own folder (dirpath of the checkpoint callback), or "
                "delete the old checkpoints"
            )

    #: the folder locks this process holds: ``resolved dirpath -> [open lock file, callbacks sharing it]``
    #: (a config may give several checkpoint callbacks of one run the same folder: configs/tiny_lm.yaml)
    _held_locks: ClassVar[dict[str, list[Any]]] = {}

    def _lock_folder(self) -> None:
        """Hold ``<dirpath>/.lock`` until the run ends: one training per checkpoint folder at a time.

        The lock is taken before the folder is checked for earlier checkpoints, so two runs started at
        the same moment cannot both find it empty. The OS releases it if the process dies.
        """
        path = Path(self.dirpath)
        key = str(path.resolve())
        if key in self._held_locks:  # another checkpoint callback of this run writes there too
            self._held_locks[key][1] += 1
            self._lock_key = key
            return
        path.mkdir(parents=True, exist_ok=True)
        fh = open(path / ".lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise CheckpointFolderInUseError(
                f"another training ({holder}) is writing checkpoints into {self.dirpath} now; wait for it to "
                "end, or give this run its own folder (dirpath of the checkpoint callback, or another "
                "trainer.default_root_dir / logger version)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        self._held_locks[key] = [fh, 1]
        self._lock_key = key

    def _unlock_folder(self) -> None:
        key, self._lock_key = self._lock_key, None
        held = self._held_locks.get(key) if key is not None else None
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            held[0].close()  # releases the lock
            del self._held_locks[key]

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._unlock_folder()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if not self.save_last:
            return
        stop = trainer.received_sigterm
        if trainer.world_size > 1:  # every rank stops at the same step (saving is collective)
            if trainer.global_step % self.DDP_SIGTERM_CHECK_EVERY_N_STEPS:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._save_last_now(trainer)
            rank_zero_info(f"SIGTERM: saved {self.last_model_path} at step {trainer.global_step}; stopping")
            raise SIGTERMException

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, SIGTERMException):  # e.g. received during validation
            self._save_last_now(trainer)
        self._unlock_folder()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.received_sigterm:
            self._save_last_now(trainer)

    @override
    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        root = getattr(trainer.logger, "root_dir", None)  # e.g. runs/demo, holding version_<n>/
        if self.dirpath is None and root is not None:
            found |= {
                str(p) for p in Path(root).glob(f"version_*/checkpoints/{self.CHECKPOINT_NAME_LAST}*.ckpt")
            }
        return found
