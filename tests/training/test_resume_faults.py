"""Resuming refuses what it cannot honour, in one line (exit status 2) and before training: a damaged or
foreign checkpoint file, a checkpoint of another model, and optimizer settings that differ from the
checkpoint's (which the optimizer state would silently override while config.yaml recorded them)."""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import train
from mtsae.training.checkpoint_file import CheckpointFileError, load_checkpoint_file
from tests.helpers.train import tiny_args
from train import ConfigError, cli_main


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny run of 8 steps: its folder and its last.ckpt."""
    root = tmp_path_factory.mktemp("run")
    cli = cli_main(["fit", *tiny_args(root, "--trainer.max_steps", "8")])
    return root, Path(cli.trainer.checkpoint_callback.last_model_path)


def _resume(root: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["fit", *tiny_args(root, "--trainer.max_steps", "12", *extra), "--ckpt_path", str(ckpt)]


def _flip_a_byte_in_the_largest_member(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
            "is not a readable PyTorch checkpoint",
        ),
        (lambda p: p.write_bytes(b""), r"\(0 bytes\) is not a readable PyTorch checkpoint"),
        (_flip_a_byte_in_the_largest_member, "is corrupted: the checksum of its member"),
        (
            lambda p: torch.save({"weights": torch.zeros(3)}, p),
            "is not a Lightning checkpoint",
        ),
        (lambda p: torch.save({"state_dict": {}, "payload": ConfigError("x")}, p), "holds pickled objects"),
    ],
    ids=["truncated", "empty", "flipped-byte", "not-lightning", "pickled-object"],
)
def test_a_damaged_or_foreign_checkpoint_is_one_line(
    tmp_path: Path, run, damage, message: str, capsys
) -> None:
    root, last = run
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(last.read_bytes())
    damage(ckpt)
    assert train.main(_resume(tmp_path, ckpt)) == 2
    err = capsys.readouterr().err
    assert re.search(rf"train.py: CheckpointFileError: (checkpoint )?{ckpt}.*{message}", err), err
    assert "Traceback" not in err and "weights_only=False" not in err  # torch's advice: wrong here
    with pytest.raises(CheckpointFileError, match=message):
        load_checkpoint_file(ckpt)


def test_a_changed_learning_rate_on_resume_is_refused(tmp_path: Path, run, capsys) -> None:
    root, last = run
    lr = ["--model.optimizer.init_args.lr", "0.1"]
    assert train.main(_resume(tmp_path, last, *lr)) == 2
    err = capsys.readouterr().err
    assert "ResumeSettingsError: the resumed checkpoint's optimizer settings differ" in err, err
    assert "lr[0]: checkpoint 0.003, config 0.1" in err
    warmup = ["--model.lr_scheduler.init_args.warmup_steps", "7"]
    assert train.main(_resume(tmp_path, last, *warmup)) == 2
    assert "warmup_steps: checkpoint 100, config 7" in capsys.readouterr().err
    resumed = cli_main(_resume(tmp_path, last))  # the same settings resume
    assert resumed.trainer.global_step == 12


@pytest.mark.parametrize(
    ("option", "value", "shown"),
    [
        ("d_sae", "32", "d_sae: checkpoint 64, config 32"),
        ("dilations", "[1,2]", "dilations: checkpoint [1, 2, 4, 8], config [1, 2]"),
        ("sparsity_coeff", "0.5", "sparsity_coeff: checkpoint 2.0, config 0.5"),
    ],
)
@pytest.mark.parametrize("by", ["path", "last"])
def test_resume_with_other_model_settings_is_refused(tmp_path: Path, run, option, value, shown, by, capsys):
    """Lightning would replace the configured value by the checkpoint's (a path), or fail to load the
    weights (``last``, which it resolves later): either way the request is refused, in one line."""
    root, last = run
    args = _resume(root if by == "last" else tmp_path, last, f"--model.{option}", value)
    if by == "last":
        args[-1] = "last"
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "ResumeSettingsError: the checkpoint's model settings differ" in err and shown in err, err
    assert "Error(s) in loading state_dict" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--model.optimizer.init_args.lr", "-1", "Invalid learning rate: -1"),
        ("--model.optimizer.init_args.lr", ".nan", "Invalid learning rate: nan"),
        ("--model.lr_scheduler.init_args.warmup_steps", "-3", "warmup_steps must be >= 0, got -3"),
        ("--model.d_sae", "1", "d_sae must be >= 2, got 1"),  # was: a traceback at the first validation
    ],
)
def test_bad_optimizer_values_are_refused_before_the_cache_build(
    tmp_path: Path, option, value, message, capsys
):
    assert train.main(["fit", *tiny_args(tmp_path, option, value)]) == 2
    err = capsys.readouterr().err
    assert "train.py: configuration error:" in err and message in err and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists()
