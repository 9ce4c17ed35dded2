"""The layering rule of the design: the library ``mtsae/`` never imports the application layers."""

from __future__ import annotations

import ast
from pathlib import Path

FORBIDDEN = {"data", "callbacks", "tests", "train", "evaluate", "unlearn", "compare", "mtsae_cli"}


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


def test_sae_module_knows_nothing_about_lightning() -> None:
    src = Path("mtsae/model.py").read_text() + Path("mtsae/activations.py").read_text()
    assert "lightning" not in src
