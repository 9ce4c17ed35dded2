"""The layering rule of the design: the library ``mtsae/`` never imports the application layers."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

FORBIDDEN = {
    "data",
    "callbacks",
    "tests",
    "train",
    "evaluate",
    "unlearn",
    "compare",
    "mtsae_cli",
    "mtsae_app",
}


def test_library_does_not_import_application_layers() -> None:
    offenders = []
    for path in sorted(Path("mtsae").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path}:{node.lineno} {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_sae_package_knows_nothing_about_lightning_or_transformers() -> None:
    offenders = {
        str(p): sorted(_imported(p) & {"lightning", "pytorch_lightning", "torchmetrics", "transformers"})
        for p in sorted(Path("mtsae/sae").rglob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}
    assert "lightning" not in Path("mtsae/sae/model.py").read_text()


def test_the_sae_package_imports_no_other_layer_of_the_library() -> None:
    """``mtsae/sae/`` is the bottom layer: no import (lazy ones included) of training, evals, lm, compare."""
    upward = ("mtsae.training", "mtsae.evals", "mtsae.lm", "mtsae.compare")
    offenders = []
    for path in sorted(Path("mtsae/sae").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(upward):
                offenders.append(f"{path}: from {node.module}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path}: import {a.name}" for a in node.names if a.name.startswith(upward)]
    assert not offenders


def test_tests_mirror_the_packages() -> None:
    for package in (
        "mtsae/sae",
        "mtsae/training",
        "mtsae/lm",
        "mtsae/evals",
        "mtsae/evals/unlearning",
        "mtsae/features",
        "data",
    ):
        assert Path("tests", package.removeprefix("mtsae/")).is_dir(), package


_REFERENCE = re.compile(r":(?:func|class|mod|meth|attr|data):`~?(mtsae[\w.]*)`")
_TEST_PATH = re.compile(r"``(tests/[\w/]+\.py)``")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def test_docstring_references_resolve() -> None:
    """Every ``:func:`mtsae....``` (and class, module, ...) reference and every ``tests/...py`` path cited in
    the library names something that exists (modules move; their citations must follow)."""
    root = Path(__file__).resolve().parents[1]
    stale = []
    for path in sorted((root / "mtsae").rglob("*.py")):
        text = path.read_text()
        stale += [
            f"{path.relative_to(root)}: {ref}" for ref in _REFERENCE.findall(text) if not _resolves(ref)
        ]
        stale += [
            f"{path.relative_to(root)}: {p}" for p in _TEST_PATH.findall(text) if not (root / p).is_file()
        ]
    assert not stale, "stale references:\n" + "\n".join(stale)


def test_one_public_home_per_name() -> None:
    """A module's ``__all__`` lists what it defines (aliases it defines included), not names re-exported from
    other modules: each name is imported from one place. Package ``__init__`` files gather the names users
    type (``mtsae.MTSAE``, ``data.LMSource``); ``mtsae.unlearning`` is a deprecated old path."""
    root = Path(__file__).resolve().parents[1]
    borrowed = []
    for package in ("mtsae", "data", "callbacks", "mtsae_app"):
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            if path.name in ("__init__.py", "__main__.py") or name == "mtsae.unlearning":
                continue
            module = importlib.import_module(name)
            for attr in getattr(module, "__all__", []):
                obj = getattr(module, attr)
                defined = getattr(obj, "__module__", name)
                if (
                    (inspect.isclass(obj) or inspect.isfunction(obj))
                    and defined != name
                    and obj.__name__ == attr
                ):
                    borrowed.append(f"{name}.{attr} (defined in {defined})")
    assert not borrowed, "re-exported names:\n" + "\n".join(borrowed)


def test_the_old_unlearning_path_warns_and_names_the_homes() -> None:
    import sys

    sys.modules.pop("mtsae.unlearning", None)
    with pytest.warns(DeprecationWarning, match="mtsae.evals.unlearning.intervention"):
        old = importlib.import_module("mtsae.unlearning")
    from mtsae.evals.unlearning.intervention import clamped

    assert old.clamped is clamped
