"""What ``mtsae eval`` reads from a trained run: the SAE (a Lightning checkpoint or an exported folder)
and the run's datamodule, built from its training configuration, with the checks that fail fast."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "add_sae_options",
    "run_command",
    "EvalError",
    "EvalSAE",
    "check_d_in",
    "check_sae_source",
    "config_overrides",
    "lm_source",
    "load_datamodule",
    "load_eval_sae",
    "load_module",
    "setup_cache",
    "val_batches",
]

log = logging.getLogger("mtsae.eval")

#: top-level keys of a training configuration; a config saved by ``train.py fit`` also has the fit
#: subcommand's own keys (``ckpt_path``, ``weights_only``, ...), which are dropped
_CONFIG_KEYS = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler")


class EvalError(RuntimeError):
    """A user error (missing file, mismatched config): printed as one message, exit status 2."""


def load_module(ckpt: str) -> Any:
    """The :class:`mtsae.SAEModule` of a Lightning checkpoint (on CPU, eval mode)."""
    from mtsae import SAEModule

    path = Path(ckpt).expanduser()
    if not path.is_file():
        raise EvalError(
            f"checkpoint {str(path)!r} does not exist: pass --ckpt with a Lightning checkpoint of a training "
            "run (e.g. runs/<name>/version_<n>/checkpoints/last.ckpt)"
        )
    import pickle

    from mtsae.training.checkpoint_file import CheckpointFileError, check_checkpoint_file, refused_pickle

    try:
        check_checkpoint_file(path)  # truncated, empty, bit-flipped: one message
        # weights_only: a checkpoint is data, never code (explicit, whatever torch's default is)
        module = SAEModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
    except CheckpointFileError as e:
        raise EvalError(str(e)) from None
    except pickle.UnpicklingError as e:
        raise EvalError(refused_pickle(path, e)) from None
    except KeyError as e:
        raise EvalError(
            f"{path} is not a Lightning checkpoint of an SAE training run (it has no {e}): pass a "
            "checkpoint written by train.py, or an exported SAE folder with --sae"
        ) from None
    step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    module.checkpoint_step = None if step is None else int(step)  # printed in every summary
    return module.eval()


class EvalSAE(NamedTuple):
    sae: Any
    """the :class:`mtsae.MTSAE` acting on raw activations (eval mode, on CPU)"""
    label: dict[str, Any]
    """where it came from, for results.json: ``{"checkpoint": path, "checkpoint_step": step}`` or
    ``{"sae": path}``"""
    metadata: Any
    """its :class:`mtsae.SAEMetadata` (``None`` for a checkpoint)"""


def load_eval_sae(args: argparse.Namespace) -> EvalSAE:
    """The SAE of ``--ckpt`` (exported: the input scale folded in) or of ``--sae`` (an SAE folder)."""
    if args.ckpt is not None:
        module = load_module(args.ckpt)
        label = {"checkpoint": str(args.ckpt), "checkpoint_step": module.checkpoint_step}
        return EvalSAE(module.export_sae(), label, None)
    from mtsae.sae.export import ExportFormatError, load_sae, read_metadata

    path = Path(args.sae).expanduser()
    if not path.is_dir():
        raise EvalError(
            f"--sae {str(path)!r} is not a folder: pass an exported SAE (runs/<name>/version_<n>/sae) or a "
            "SAELens folder (cfg.json + sae_weights.safetensors)"
        )
    try:
        return EvalSAE(load_sae(path), {"sae": str(args.sae)}, read_metadata(path))
    except ExportFormatError as e:
        raise EvalError(str(e)) from e


def check_sae_source(loaded: EvalSAE, source: Any, config: str) -> None:
    """An SAE folder that names its layer / hook must match the config's language model source."""
    meta = loaded.metadata
    if meta is None:
        return
    where = f"the SAE {loaded.label.get('sae')!r}"
    hook = str(meta.hook_name or "")
    if meta.hook_name is not None and (meta.layer is None or not hook.endswith(("resid_post", "resid_pre"))):
        raise EvalError(
            f"{where} reads {meta.hook_name!r}; the evaluations read the residual stream after a decoder "
            "layer (blocks.L.hook_resid_post, or blocks.L+1.hook_resid_pre)"
        )
    if meta.layer is not None and int(meta.layer) != int(source.layer):
        raise EvalError(
            f"{where} was trained on layer {meta.layer} but the config {config!r} reads layer {source.layer}: "
            f"pass --set data.source.init_args.layer={meta.layer} (or the config of that layer)"
        )
    ours, theirs = str(source.model_name).rstrip("/"), str(meta.model_name or "").rstrip("/")
    if theirs and ours.split("/")[-1].lower() != theirs.split("/")[-1].lower():
        log.warning("%s was trained on %r; the config's model is %r", where, theirs, ours)


def load_datamodule(config: str, overrides: list[str] | None = None) -> Any:
    """The :class:`data.ActivationDataModule` of a training YAML (instantiated, nothing built or run).

    ``overrides`` are extra LightningCLI arguments (``--data.cache_dir /elsewhere``).
    """
    if not Path(config).expanduser().is_file():
        raise EvalError(f"config {config!r} does not exist: pass --config with the training YAML of the run")
    import tempfile
    from unittest import mock

    import yaml

    from train import cli_main

    cfg = yaml.safe_load(Path(config).expanduser().read_text()) or {}
    if not isinstance(cfg, dict):
        raise EvalError(f"config {config!r} is not a YAML mapping of a training configuration")
    # the config.yaml saved by `train.py fit` has the fit subcommand's own keys: not model/data/trainer
    cfg = {k: v for k, v in cfg.items() if k in _CONFIG_KEYS}
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "config.yaml"
        clean.write_text(yaml.safe_dump(cfg))
        try:
            # LightningCLI warns when given args while sys.argv has some (ours: `mtsae eval ...`)
            with mock.patch.object(sys, "argv", sys.argv[:1]):
                cli = cli_main(["--config", str(clean), *(overrides or [])], run=False)
        except SystemExit as e:  # jsonargparse reports parse errors on stderr and exits
            raise EvalError(
                f"config {config!r} (with {overrides or []}) does not parse; see the message above"
            ) from e
    return cli.datamodule


def check_d_in(loaded: EvalSAE, dm: Any, config: str) -> None:
    d_sae_in, d_cfg = int(loaded.sae.d_in), int(dm.d_in)
    if d_sae_in != d_cfg:
        kind, path = next(iter(loaded.label.items()))  # ("checkpoint", path) or ("sae", path)
        raise EvalError(
            f"the {kind} {path!r} has d_in={d_sae_in} but the config {config!r} gives activations of "
            f"width {d_cfg}: pass the config the {kind} was trained with (the config.yaml in its run dir)"
        )


def lm_source(dm: Any, what: str) -> Any:
    from callbacks.core_metrics import is_lm_source

    if not is_lm_source(dm.source):
        raise EvalError(
            f"{what} needs a language-model data source (data.LMSource); the config uses "
            f"{type(dm.source).__name__}"
            + (" (--no-lm: reconstruction metrics only)" if what == "eval core" else "")
        )
    return dm.source


def config_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for kv in args.set_args:
        if "=" not in kv:
            raise EvalError(f"--set expects KEY=VALUE (e.g. data.cache_dir=/x), got {kv!r}")
        out.append("--" + kv.lstrip("-"))
    return out


def setup_cache(dm: Any) -> None:
    try:
        dm.setup("validate")
    except FileNotFoundError as e:
        raise EvalError(
            f"{e}. The evaluation reads the validation rows of the activation cache: train first (the cache "
            "is built at the start of fit), or pass --set data.cache_path=DIR with an existing cache"
        ) from e


def val_batches(dm: Any, max_batches: int | None, progress: bool, desc: str) -> Iterator[dict]:
    from mtsae.progress import track

    loader = dm.val_dataloader()
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    for i, batch in enumerate(track(loader, total=total, desc=desc, disable=not progress, leave=False)):
        if max_batches is not None and i >= max_batches:
            break
        yield batch


def add_sae_options(p: argparse.ArgumentParser, out_help: str) -> None:
    """The options of every command that reads a trained run: the SAE (``--ckpt`` or ``--sae``), its
    training config, ``--out``, ``--set`` overrides, the device and the progress bars."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="Lightning checkpoint of the SAEModule (.ckpt)")
    which.add_argument(
        "--sae", help="exported SAE folder instead: this project's (run_dir/sae) or SAELens's (a public SAE)"
    )
    p.add_argument("--config", required=True, help="training YAML of the run (its saved config.yaml)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument(
        "--set",
        dest="set_args",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value after --config (repeatable), e.g. --set data.cache_dir=/elsewhere",
    )
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def run_command(
    command: str,
    label: str,
    run: Callable[[], Any],
    extra_errors: Callable[[], tuple[type, ...]] = tuple,
    out: str | None = None,
) -> int:
    """Run ``run()`` for the subcommand ``command`` with the checkout's training code loaded and logging
    set up; a user error (``out`` naming a file, missing checkout, :class:`EvalError`, unreachable source
    or LM, a cache of another config or a damaged one, an SAE folder of the wrong format, or one of
    ``extra_errors()``) is one line ``<label>: error: ...`` on stderr and exit status 2. ``extra_errors``
    is called after the checkout is found (its classes may live in ``data``)."""
    from mtsae_app.checkout import CheckoutNotFoundError, require_checkout

    if out is not None and Path(out).exists() and not Path(out).is_dir():
        sys.stderr.write(f"{label}: error: --out {out} is a file; it must name a folder\n")
        return 2  # before any work
    try:
        require_checkout(command)  # the training configuration's classes: data.*, callbacks.*
    except CheckoutNotFoundError as e:
        sys.stderr.write(f"{e}\n")
        return 2
    from data import CacheMismatchError, SourceUnavailableError
    from data.cache_format import CacheReadError
    from mtsae.lm.loading import LMUnavailableError
    from mtsae.sae.export import ExportFormatError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    user_errors = (
        EvalError,
        SourceUnavailableError,
        LMUnavailableError,
        CacheMismatchError,
        CacheReadError,
        ExportFormatError,
        *extra_errors(),
    )
    try:
        run()
    except user_errors as e:
        sys.stderr.write(f"{label}: error: {e}\n")
        return 2
    return 0
