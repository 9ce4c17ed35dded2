"""Fixtures of the dashboard tests: a tiny synthetic run and a tiny-LM run, each with its dashboard built
once per session by ``mtsae features``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mtsae_app.cli as mtsae_cli
from tests.helpers.browser import Chromium, chromium_path
from tests.helpers.lm import offline_hub, tiny_lm_args, tiny_lm_dir
from tests.helpers.train import tiny_args
from train import cli_main


def read_site(out: Path) -> dict:
    """The dashboard's data as written: ``{"index": {...}, "features": {id: {...}}}``."""
    text = (out / "data" / "index.js").read_text()
    index = json.loads(text.split("=", 1)[1].rstrip().rstrip(";"))
    feats = {}
    for p in (out / "data" / "features").glob("*.js"):
        body = p.read_text().splitlines()[1]
        feats[int(p.stem)] = json.loads(body.split("=", 1)[1].rstrip().rstrip(";"))
    return {"index": index, "features": feats}


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny MTSAE on the synthetic demo source (d_in 16, d_sae 64, a few dozen steps)."""
    tmp = tmp_path_factory.mktemp("features_synthetic")
    cli = cli_main(["fit", *tiny_args(tmp, "--trainer.max_steps", "40")])
    run_dir = Path(cli.trainer.logger.log_dir)
    return {
        "tmp": tmp,
        "config": run_dir / "config.yaml",
        "ckpt": Path(cli.trainer.checkpoint_callback.last_model_path),
    }


@pytest.fixture(scope="session")
def synthetic_site(synthetic_run: dict) -> dict:
    out = synthetic_run["tmp"] / "site"
    args = ["features", "--ckpt", str(synthetic_run["ckpt"]), "--config", str(synthetic_run["config"])]
    assert mtsae_cli.main([*args, "--out", str(out), "--features", "0-23", "--no-progress"]) == 0
    return {"out": out, **read_site(out)}


@pytest.fixture(scope="session")
def lm_site(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """configs/tiny_lm.yaml on a tiny random Gemma-2 (6 steps), and its dashboard (tokens, logits)."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("features_lm")
    try:
        offline_hub(mp)
        mp.chdir(tmp)  # the config's relative checkpoint folder lands in tmp
        lm = tiny_lm_dir(tmp_path_factory)
        cli = cli_main(["fit", *tiny_lm_args(lm, tmp / "cache", tmp / "runs", 6)])
        config = Path(cli.trainer.logger.log_dir) / "config.yaml"
        ckpt = tmp / "runs/tiny_lm/checkpoints/last.ckpt"
        out = tmp / "site"
        args = ["features", "--ckpt", str(ckpt), "--config", str(config), "--out", str(out), "--no-progress"]
        assert mtsae_cli.main([*args, "--features", "first:12", "--device", "cpu"]) == 0
    finally:
        mp.undo()
    return {"out": out, "lm": lm, "config": config, "tmp": tmp, **read_site(out)}


@pytest.fixture(scope="session")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it where it can)")
    with Chromium(exe) as b:
        yield b
