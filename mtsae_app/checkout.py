"""The training application (``train.py``, ``data/``, ``callbacks/``, ``configs/``) lives in a checkout of
the repository and is not installed with the package: ``data`` and ``callbacks`` are names that other
projects use, so installing them at the top level of site-packages could shadow a user's own modules.
Subcommands that read a training configuration find the checkout here (see README, "Installing")."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["CheckoutNotFoundError", "checkout_root", "require_checkout"]

#: files that identify a checkout of this repository
_MARKERS = ("train.py", "data/datamodule.py", "callbacks/__init__.py")


class CheckoutNotFoundError(RuntimeError):
    """The command needs the training application of a checkout and none was found."""


def _is_checkout(path: Path) -> bool:
    return all((path / m).is_file() for m in _MARKERS)


def checkout_root() -> Path | None:
    """The checkout to use: the working directory, else the one this package was loaded from
    (an editable install or ``python -m mtsae_app`` inside a checkout); ``None`` if neither is one."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if _is_checkout(candidate):
            return candidate
    return None


def require_checkout(command: str) -> Path:
    """Put the checkout first on ``sys.path`` (so ``data``, ``callbacks`` and ``train`` are this project's
    modules) and return it; raises :class:`CheckoutNotFoundError` with what to do if there is none."""
    root = checkout_root()
    if root is None:
        raise CheckoutNotFoundError(
            f"mtsae {command} needs the training code of a checkout of the repository (train.py, data/, "
            f"callbacks/, configs/), which is not installed with the package: run it from the checkout's "
            f"folder (cd path/to/mtsae; mtsae {command} ...)"
        )
    entry = str(root)
    if entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)
    return root
