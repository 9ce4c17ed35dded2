"""``mtsae eval`` on hostile or damaged inputs: one line and exit status 2, before the work where possible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mtsae_app.cli as mtsae_cli
from tests.helpers.train import tiny_args
from train import cli_main


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("run")
    cli = cli_main(["fit", *tiny_args(root, "--trainer.max_steps", "4")])
    log_dir = Path(cli.trainer.log_dir)
    return {"ckpt": Path(cli.trainer.checkpoint_callback.last_model_path), "config": log_dir / "config.yaml",
            "sae": log_dir / "sae", "cache": Path(cli.datamodule.cache.root)}  # fmt: skip


def _core(run: dict[str, Path], out: Path, ckpt: Path | None = None, *extra: str) -> list[str]:
    args = ["eval", "core", "--no-lm", "--no-progress", "--config", str(run["config"]), "--out", str(out)]
    return [*args, "--ckpt", str(ckpt or run["ckpt"]), *extra]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
            "is not a readable PyTorch checkpoint",
        ),
        (lambda p: p.write_bytes(b""), "is not a readable PyTorch checkpoint"),
        (lambda p: __import__("torch").save({"weights": 1}, p), "is not a Lightning checkpoint of an SAE"),
    ],
    ids=["truncated", "empty", "not-lightning"],
)
def test_a_damaged_checkpoint_is_one_line(run, tmp_path: Path, damage, message, capsys) -> None:
    ckpt = tmp_path / "c.ckpt"
    ckpt.write_bytes(run["ckpt"].read_bytes())
    damage(ckpt)
    assert mtsae_cli.main(_core(run, tmp_path / "out", ckpt)) == 2
    err = capsys.readouterr().err
    assert "mtsae eval core: error: " in err and message in err and "Traceback" not in err, err


def test_out_naming_an_existing_file_is_refused_before_work(run, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.json"
    out.write_text("{}")
    assert mtsae_cli.main(_core(run, out)) == 2
    assert "--out " + str(out) + " is a file; it must name a folder" in capsys.readouterr().err
    assert out.read_text() == "{}"


def test_a_corrupted_cache_is_one_line(run, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for p in run["cache"].iterdir():
        (cache / p.name).write_bytes(p.read_bytes())
    shard = sorted(cache.glob("shard_*.h5"))[-1]  # the validation shard
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a row of acts: its fletcher32 checksum fails on read
    shard.write_bytes(bytes(data))
    manifest = json.loads((cache / "manifest.json").read_text())  # (the identity check passes: same files)
    assert manifest["complete"]
    assert mtsae_cli.main(_core(run, tmp_path / "out", None, "--set", f"data.cache_path={cache}")) == 2
    err = capsys.readouterr().err
    assert "mtsae eval core: error: " in err and shard.name in err and "Traceback" not in err, err


def test_an_invalid_saelens_cfg_is_one_line(run, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "saelens"
    folder.mkdir()
    (folder / "cfg.json").write_text("{not json")
    (folder / "sae_weights.safetensors").write_bytes((run["sae"] / "sae.safetensors").read_bytes())
    args = ["eval", "core", "--no-lm", "--no-progress", "--config", str(run["config"])]
    assert mtsae_cli.main([*args, "--out", str(tmp_path / "out"), "--sae", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "cfg.json is not valid JSON" in err and "Traceback" not in err, err
