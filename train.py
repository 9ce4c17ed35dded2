"""Train an SAE with LightningCLI: ``python train.py fit --config configs/demo.yaml``.

Run as a script, a plain configuration error prints one message (exit status 2) instead of a
traceback; a full disk, a damaged or foreign cache, or an unreachable model ends with one message and
exit status 1; SIGTERM saves ``last.ckpt`` and ends with exit status 143 (resume with
``--ckpt_path last``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from data import ActivationDataModule
from mtsae import SAEModule

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
        return super()._instantiate_trainer(config, callbacks)

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
    from data.cache_format import CacheMismatchError, CacheReadError, CacheWriteError
    from data.lm_source import SourceUnavailableError

    return (
        CacheWriteError,
        CacheReadError,
        CacheMismatchError,
        SourceUnavailableError,
        CheckpointFolderInUseError,
    )


def main(args: list[str] | None = None) -> int:
    """``python train.py ...``: the exit status, with one message (no traceback) for the errors a user can fix."""
    try:
        cli_main(args)
    except ConfigError as err:
        print(f"train.py: configuration error: {err}", file=sys.stderr)
        return 2
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
