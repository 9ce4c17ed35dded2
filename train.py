"""Train an SAE with LightningCLI: ``python train.py fit --config configs/demo.yaml``.

Run as a script, a plain configuration error, a damaged ``--ckpt_path`` file or a resume with other
settings than the checkpoint's prints one message (exit status 2) instead of a traceback; a full disk
(cache or run folder), a damaged or foreign cache, non-finite activations or loss, a checkpoint folder
in use, or an unreachable model ends with one message and exit status 1; SIGTERM saves ``last.ckpt``
and ends with exit status 143 (resume with ``--ckpt_path last``), also during the cache build (the
finished shards are kept).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from data import ActivationDataModule
from data.cache_format import CacheBuildInterrupted
from mtsae import SAEModule
from mtsae.training.checkpoint_file import CheckedCheckpointIO, CheckpointFileError, load_checkpoint_file
from mtsae.training.module import ResumeSettingsError, model_settings_differ

__all__ = ["ConfigError", "MTSAECLI", "cli_main", "main"]


#: what to add to a GPU config (configs/gemma_l19.yaml) to run it on a machine without a GPU
CPU_OVERRIDES = (
    "--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto --trainer.precision 32-true"
)
CPU_OVERRIDES_HINT = f"to run this config on the CPU (slowly), add: {CPU_OVERRIDES}"


class ConfigError(ValueError):
    """A configuration value was refused while the model, data or trainer were being built."""


class MTSAECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the data decides the activation width; it is never typed twice
        parser.link_arguments("data.d_in", "model.d_in", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            if self.subcommand == "fit" and isinstance(self.datamodule, ActivationDataModule):
                self.datamodule.check_training_batches(self.trainer.world_size)  # before the cache build
        except MisconfigurationException as err:
            if "gpu" in str(err).lower() and not torch.cuda.is_available():
                raise ConfigError(f"{err} This machine has no GPU; {CPU_OVERRIDES_HINT}") from err
            raise ConfigError(str(err)) from err
        except ValueError as err:  # raised by a class's own argument checks
            raise ConfigError(str(err)) from err

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        from lightning.pytorch.callbacks import ProgressBar

        from callbacks.progress import LogProgressBar

        configured = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            callbacks = [
                *callbacks,
                LogProgressBar(),
            ]  # readable in log files (SLURM), not only on a terminal
        trainer = super()._instantiate_trainer(config, callbacks)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a plugin the config chose
            trainer.strategy.checkpoint_io = CheckedCheckpointIO()  # --ckpt_path files are checked
        return trainer

    def _parse_ckpt_path(self) -> None:
        # Lightning merges the checkpoint's model settings over the configuration's. Check the file first
        # (one line for a damaged one, not a traceback) and refuse settings that differ, which would
        # otherwise be silently replaced (and `--ckpt_path last` would then load another model).
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and Path(ckpt_path).is_file():
            saved = load_checkpoint_file(ckpt_path).get("hyper_parameters") or {}
            model = self.config[sub].get("model")
            config = model.as_dict() if hasattr(model, "as_dict") else dict(model or {})
            config.pop("d_in", None)  # linked from the data when the classes are built
            differ = model_settings_differ(saved, config)
            if differ:
                raise ResumeSettingsError(differ)
        super()._parse_ckpt_path()

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") is not None and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = (
                True  # a resumed checkpoint is data, never code (--weights_only false opts out)
            )
        return kwargs


def cli_main(args: list[str] | None = None, run: bool = True) -> MTSAECLI:
    """Entry point that tests can call: ``cli_main(["fit", "--config", "configs/demo.yaml"])``."""
    return MTSAECLI(
        SAEModule,
        ActivationDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        # exact option names only: `--model.sparsity_coef` must not silently set `sparsity_coeff`
        parser_kwargs={"allow_abbrev": False},
    )


def _fault_types() -> tuple[type[BaseException], ...]:
    from callbacks.checkpoint import CheckpointFolderInUseError
    from data.cache_format import (
        CacheMismatchError,
        CacheReadError,
        CacheWriteError,
        NonFiniteActivationsError,
    )
    from data.lm_source import SourceUnavailableError
    from mtsae.training.module import NonFiniteLossError

    return (
        CacheWriteError,
        CacheReadError,
        CacheMismatchError,
        NonFiniteActivationsError,
        NonFiniteLossError,
        SourceUnavailableError,
        CheckpointFolderInUseError,
    )


#: write failures that freeing space (or another folder) fixes: disk full, quota, file-size limit, read-only
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _write_failure(err: BaseException) -> str | None:
    """The one-line reason of a failed write of the run's files (logs, checkpoints, export), or None."""
    if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
        where = f" {err.filename}" if err.filename else ""
        return f"cannot write{where}: {os.strerror(err.errno)} (errno {err.errno})"
    if isinstance(err, RuntimeError) and "PytorchStreamWriter failed writing file" in str(err):
        return "cannot write a checkpoint: the file write failed (disk full or a file-size limit?)"
    return None


def _quiet_write_failures_in_threads(hook: Any) -> Any:
    """A ``threading.excepthook`` that leaves a write failure in a background writer (TensorBoard's) to
    the main thread's one message instead of printing a traceback."""

    def excepthook(args: Any) -> None:
        if _write_failure(args.exc_value) is None:
            hook(args)

    return excepthook


def main(args: list[str] | None = None) -> int:
    """``python train.py ...``: the exit status, with one message (no traceback) for the errors a user can fix."""
    previous_hook = threading.excepthook
    threading.excepthook = _quiet_write_failures_in_threads(previous_hook)
    try:
        cli_main(args)
    except ConfigError as err:
        print(f"train.py: configuration error: {err}", file=sys.stderr)
        return 2
    except (CheckpointFileError, ResumeSettingsError) as err:  # --ckpt_path names a file that cannot resume
        print(f"train.py: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except CacheBuildInterrupted as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 143
    except SIGTERMException:
        print(
            "train.py: stopped by SIGTERM; last.ckpt holds the last finished step. Resume with the same "
            "command and --ckpt_path last",
            file=sys.stderr,
        )
        return 143
    except _fault_types() as err:
        message = getattr(err, "strerror", None) or err  # an OSError's text without "[Errno n]"
        print(f"train.py: {type(err).__name__}: {message}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as err:
        reason = _write_failure(err)
        if reason is None:
            raise
        print(
            f"train.py: {reason}. Free space where the run writes (trainer.default_root_dir, the checkpoint "
            "folder) or point them elsewhere; checkpoints already written are kept (--ckpt_path last resumes)",
            file=sys.stderr,
        )
        return 1
    finally:
        threading.excepthook = previous_hook
    return 0


if __name__ == "__main__":
    sys.exit(main())
