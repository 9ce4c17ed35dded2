"""Exact resume at epoch boundaries: a run stopped right after an epoch's last batch (a checkpoint at the
end-of-epoch validation, or SIGTERM during that validation) resumes with the next epoch's first batch and
ends with the uninterrupted run's batches and weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tests.helpers.interrupt import Crash
from tests.helpers.train import tiny_args
from train import cli_main

PROBE = "--trainer.callbacks+=tests.helpers.batch_probe.BatchProbe"
INTERRUPT = "--trainer.callbacks+=tests.helpers.interrupt.Interrupt"
STEPS = 96  # three epochs of 32 batches; validation every 16 steps


def _run(root: Path, probe: Path, *extra: str):
    args = tiny_args(root, "--trainer.max_steps", str(STEPS), PROBE, "--trainer.callbacks.path", str(probe))
    return cli_main(["fit", *args, *extra])


def _batches(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[list], dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("full")
    cli = _run(root, root / "probe.jsonl")
    assert cli.trainer.global_step == STEPS
    return _batches(root / "probe.jsonl"), {k: v.clone() for k, v in cli.model.state_dict().items()}


def _check_resumed(tmp_path: Path, uninterrupted, step_saved: int) -> None:
    (last,) = (tmp_path / "runs").glob("demo/version_0/checkpoints/last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step_saved
    resumed = _run(tmp_path, tmp_path / "probe.jsonl", "--ckpt_path", "last")
    batches, weights = uninterrupted
    assert resumed.trainer.global_step == STEPS
    assert _batches(tmp_path / "probe.jsonl") == batches  # no batch skipped or trained on twice
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_resume_after_the_end_of_epoch_checkpoint_is_exact(tmp_path: Path, uninterrupted) -> None:
    """Killed after last.ckpt was written at step 32, the last batch of epoch 0 (the issue's kill -9)."""
    with pytest.raises(Crash):
        _run(tmp_path, tmp_path / "probe.jsonl", INTERRUPT, "--trainer.callbacks.crash_at_epoch", "1")
    _check_resumed(tmp_path, uninterrupted, step_saved=32)


def test_resume_after_sigterm_during_end_of_epoch_validation_is_exact(tmp_path: Path, uninterrupted) -> None:
    extra = [INTERRUPT, "--trainer.callbacks.sigterm_in_validation_at", "64"]  # the end of epoch 1
    with pytest.raises(SIGTERMException):
        _run(tmp_path, tmp_path / "probe.jsonl", *extra)
    _check_resumed(tmp_path, uninterrupted, step_saved=64)


def test_resume_mid_epoch_after_sigterm_during_validation_is_exact(tmp_path: Path, uninterrupted) -> None:
    extra = [INTERRUPT, "--trainer.callbacks.sigterm_in_validation_at", "48"]
    with pytest.raises(SIGTERMException):
        _run(tmp_path, tmp_path / "probe.jsonl", *extra)
    _check_resumed(tmp_path, uninterrupted, step_saved=48)
