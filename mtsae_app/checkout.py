"""The training application (``train.py``, ``data/``, ``callbacks/``, ``configs/``) lives in a checkout of
the repository and is not installed with the package: ``data`` and ``callbacks`` are names that other
projects use, so installing them at the top level of site-packages could shadow a user's own modules.
Subcommands that read a training configuration find the checkout here (see README, "Installing") and load
its two packages, ``data`` and ``callbacks``, and its entry point ``train.py`` from their files (``sys.path`` is left as it is, so no other
folder of the checkout can shadow an installed module)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["CheckoutNotFoundError", "checkout_root", "require_checkout"]

#: files that identify a checkout of this repository
_MARKERS = ("train.py", "data/datamodule.py", "callbacks/__init__.py")

#: the checkout's packages that training configurations name (``data.LMSource``, ``callbacks.ExportSAE``)
PACKAGES = ("data", "callbacks")


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


def _load(root: Path, name: str) -> None:
    """Import the checkout's package ``root/name/`` or module ``root/name.py`` under its own name, unless
    that very file is imported already; a module of that name from elsewhere (and its submodules) is replaced."""
    package = (root / name / "__init__.py").resolve()
    path = package if package.is_file() else (root / f"{name}.py").resolve()
    current = sys.modules.get(name)
    if (
        current is not None
        and getattr(current, "__file__", None)
        and Path(current.__file__).resolve() == path
    ):
        return
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    search = [str(path.parent)] if path == package else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=search)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def require_checkout(command: str) -> Path:
    """Import the checkout's ``data`` and ``callbacks`` packages (so a training configuration's classes are
    this project's) and ``train`` and return the checkout; raises :class:`CheckoutNotFoundError` with what to do if
    there is none."""
    root = checkout_root()
    if root is None:
        raise CheckoutNotFoundError(
            f"mtsae {command} needs the training code of a checkout of the repository (train.py, data/, "
            f"callbacks/, configs/), which is not installed with the package: run it from the checkout's "
            f"folder (cd path/to/mtsae; mtsae {command} ...)"
        )
    for name in (*PACKAGES, "train"):  # train: the entry point whose LightningCLI reads a training config
        _load(root, name)
    return root
