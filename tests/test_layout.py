"""The layering rule of the design: the library ``mtsae/`` never imports the application layers."""

from __future__ import annotations

import ast
from pathlib import Path

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
