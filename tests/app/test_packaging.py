"""Packaging: the wheel installs only ``mtsae`` and ``mtsae_app`` at the top level, the ``mtsae`` command
ignores same-named modules of other projects, and ``import mtsae`` stays light."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mtsae_app import checkout, cli

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, pythonpath: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True)


def test_wheel_installs_only_the_package_names(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "train.py"):
        shutil.copy(REPO / name, src / name)
    for name in ("mtsae", "mtsae_app", "data", "callbacks"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp_path / 'dist')!r}))"
    res = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mtsae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"mtsae", "mtsae_app"}
    assert "mtsae/sae/model.py" in names and "mtsae_app/cli.py" in names
    # the feature dashboard copies its script and style sheet from the package into every site
    assert {"mtsae/features/static/app.js", "mtsae/features/static/style.css"} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mtsae = mtsae_app.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_eval_help_with_a_foreign_evaluate_module_first_on_the_path(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "evaluate.py").write_text("NAME = 'foreign'\n")  # e.g. Hugging Face's evaluate library
    (foreign / "data.py").write_text("NAME = 'foreign'\n")
    code = (
        "import sys, evaluate; from mtsae_app.cli import main; rc = main(['eval', 'core', '--help']); "
        "assert evaluate.NAME == 'foreign'; sys.exit(rc)"
    )
    res = _run(code, [foreign, REPO], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--ckpt" in res.stdout and "--config" in res.stdout


def test_checkout_modules_win_over_foreign_ones(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.py").write_text("NAME = 'foreign'\n")
    code = "import sys; from mtsae_app.checkout import require_checkout; require_checkout('eval'); import data; print(data.ActivationDataModule.__name__)"
    res = _run(code, [foreign, REPO], cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ActivationDataModule"


def test_commands_that_need_a_checkout_say_so(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkout, "checkout_root", lambda: None)
    assert cli.main(["cache", "verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mtsae cache needs the training code of a checkout" in err and "cd path/to/mtsae" in err
    assert cli.main(["eval", "core", "--ckpt", "x.ckpt", "--config", "c.yaml", "--out", str(tmp_path)]) == 2
    assert "mtsae eval needs the training code of a checkout" in capsys.readouterr().err
    with pytest.raises(checkout.CheckoutNotFoundError):
        checkout.require_checkout("eval")


def test_import_mtsae_loads_neither_lightning_nor_transformers(tmp_path: Path) -> None:
    code = (
        "import sys, torch, mtsae\n"
        f"sae = mtsae.MTSAE(8, 16, dilations=[1, 2]); mtsae.save_sae(sae, {str(tmp_path / 'sae')!r})\n"
        f"loaded = mtsae.load_sae({str(tmp_path / 'sae')!r})\n"
        "out = loaded(torch.randn(2, 5, 8))\n"
        "assert out.x_hat.shape == (2, 5, 8)\n"
        "assert not any(p.requires_grad for p in loaded.parameters())\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers'))\n"
        "assert not heavy, heavy[:5]\n"
        "assert mtsae.SAEModule.__name__ == 'SAEModule' and 'lightning' in sys.modules\n"
    )
    res = _run(code, [REPO], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_checkouts_train_py_loads_as_the_console_script_runs(tmp_path: Path) -> None:
    """The ``mtsae`` console script has its bin folder, not the checkout, first on ``sys.path`` (``-P`` and
    no ``PYTHONPATH`` do the same here): ``mtsae eval`` / ``mtsae features`` still reach ``train.cli_main``."""
    code = (
        "import sys; from mtsae_app.checkout import require_checkout; require_checkout('eval')\n"
        "from train import cli_main\n"
        "print(sys.modules['train'].__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-P", "-c", code], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip()) == REPO / "train.py"
