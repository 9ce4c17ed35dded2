"""The ``mtsae`` command: ``mtsae eval ...`` (see :mod:`mtsae_app.eval`), ``mtsae features ...`` (see
:mod:`mtsae_app.features`), ``mtsae compare ...`` (see :mod:`mtsae_app.compare`), ``mtsae unlearn ...`` (see
:mod:`mtsae_app.unlearn`), ``mtsae cache verify ...`` (see :mod:`mtsae_app.cache`) and ``mtsae example ...``
(see :mod:`mtsae_app.example`).

Training has its own entry point, ``python train.py fit --config ...`` (LightningCLI).
"""

from __future__ import annotations

import importlib
import sys

from mtsae_app.checkout import CheckoutNotFoundError, require_checkout

__all__ = ["NEEDS_CHECKOUT", "SUBCOMMANDS", "main", "usage"]

#: subcommands that read a training configuration: they run from a checkout (see :mod:`mtsae_app.checkout`)
NEEDS_CHECKOUT = frozenset({"cache", "compare"})  # and eval, once its options are parsed

#: subcommand -> (module providing ``main(argv) -> int``, one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "eval": (
        "mtsae_app.eval",
        "evaluate a checkpoint: mtsae eval {core,unlearning,disentanglement} --ckpt CKPT --config YAML --out DIR",
    ),
    "compare": (
        "mtsae_app.compare",
        "train SAEs on equal terms and write a comparison report: mtsae compare --config YAML [--jobs N]",
    ),
    "features": (
        "mtsae_app.features",
        "write a static feature dashboard: mtsae features --ckpt CKPT --config YAML --out DIR [--features ...]",
    ),
    "cache": (
        "mtsae_app.cache",
        "check an activation cache: mtsae cache verify PATH [--repair] | norms PATH",
    ),
    "example": (
        "mtsae_app.example",
        "write offline example inputs: mtsae example {tiny-lm,unlearning} [--out DIR]",
    ),
    "unlearn": (
        "mtsae_app.unlearn",
        "apply an unlearning recipe: mtsae unlearn generate --recipe RECIPE --prompt TEXT [--compare]",
    ),
}


def usage() -> str:
    """The top-level help text, listing the subcommands."""
    width = max(len(k) for k in SUBCOMMANDS)
    lines = [
        "usage: mtsae {" + ",".join(SUBCOMMANDS) + "} ...",
        "",
        "Multi-Scale Temporal Sparse Autoencoders: evaluation and comparison of trained SAEs.",
        "(training: python train.py fit --config configs/demo.yaml)",
        "",
        "subcommands:",
        *[f"  {name:<{width}}  {desc}" for name, (_, desc) in SUBCOMMANDS.items()],
        "",
        "Run `mtsae <subcommand> --help` for its options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``mtsae <subcommand> ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"mtsae: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    if name in NEEDS_CHECKOUT:
        try:
            require_checkout(name)
        except CheckoutNotFoundError as e:
            print(e, file=sys.stderr)
            return 2
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # a missing dependency of that module: show the real error
        print(
            f"mtsae {name}: the module {module_name!r} ({module_name}.py) is not installed with this copy of "
            f"mtsae; reinstall the package (pip install -e .) from a checkout that has it",
            file=sys.stderr,
        )
        return 2
    try:
        return int(module.main(rest) or 0)
    except SystemExit as e:  # argparse --help / usage errors inside the subcommand, or sys.exit("message")
        if isinstance(e.code, int):
            return e.code
        if e.code is not None:
            print(f"mtsae {name}: {e.code}", file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
