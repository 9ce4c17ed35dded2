"""Training faults end with a message that names the cause: bad configs before any work, a full disk
(exit status 1, no crash), stale or reused checkpoint folders, SIGTERM (a checkpoint, exit status 143)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mtsae_app.cli as mtsae_cli
import train
from callbacks.checkpoint import CheckpointFolderInUseError
from tests.helpers.train import tiny_args
from train import ConfigError, cli_main

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _step(ckpt: str | Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def test_fewer_training_than_validation_sequences_is_refused_before_work(tmp_path: Path, capsys) -> None:
    args = ["fit", *tiny_args(tmp_path, "--data.n_sequences", "32", "--data.val_sequences", "64")]
    with pytest.raises(
        ConfigError, match=r"data.n_sequences \(32\) is smaller than data.val_sequences \(64\)"
    ):
        cli_main(args)
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "train.py: configuration error: data.n_sequences (32)" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()


def test_abbreviated_option_names_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", *tiny_args(tmp_path, "--model.sparsity_coef", "7")])  # the key is sparsity_coeff
    assert exc.value.code == 2
    assert "unrecognized arguments: --model.sparsity_coef" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_disk_full_exits_with_status_1_and_a_message(tmp_path: Path) -> None:
    """A real write failure from the OS (a file-size limit below one shard), not a mocked one: HDF5 used
    to report it while deallocating objects and the process then died with a segmentation fault."""
    args = tiny_args(tmp_path, "--trainer.max_steps", "2")  # shards of 256 x 16 x 16 float32: > 256 KB
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # a write past the limit fails with EFBIG
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))\n"
        "import train\n"
        f"sys.exit(train.main(['fit', *{args!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "train.py: CacheWriteError: cannot write cache shard" in proc.stderr
    assert "shard_00000.h5.tmp: File too large (errno 27)" in proc.stderr and "Free space" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_last_checkpoint_is_the_final_step_and_eval_names_it(tmp_path: Path, capsys) -> None:
    # validation (and so the monitored checkpoint) at steps 16 and 32 only; the run ends at step 40
    args = tiny_args(tmp_path, "--trainer.max_steps", "40", "--trainer.val_check_interval", "16")
    cli = cli_main(["fit", *args])
    ckpt = cli.trainer.checkpoint_callback
    assert Path(ckpt.last_model_path).name == "last.ckpt"
    assert _step(ckpt.last_model_path) == 40 == cli.trainer.global_step
    assert _step(ckpt.best_model_path) in (16, 32)
    summary = json.loads((Path(cli.trainer.log_dir) / "summary.json").read_text())
    assert summary["checkpoint"] == ckpt.last_model_path and summary["checkpoint_step"] == 40

    out = tmp_path / "eval"
    argv = ["eval", "core", "--no-lm", "--no-progress", "--ckpt", ckpt.last_model_path]
    config = str(Path(cli.trainer.log_dir) / "config.yaml")
    assert mtsae_cli.main([*argv, "--config", config, "--out", str(out)]) == 0
    assert f"(checkpoint {ckpt.last_model_path} at step 40)" in capsys.readouterr().out
    assert f"- checkpoint: `{ckpt.last_model_path}` (step 40)" in (out / "summary.md").read_text()


def test_checkpoint_loads_never_run_pickled_code(tmp_path: Path, monkeypatch) -> None:
    cli = cli_main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "2")])
    state = torch.load(cli.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=True)
    planted = tmp_path / "planted.ckpt"
    state["payload"] = _Payload(tmp_path / "ran")
    torch.save(state, planted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # would make an unspecified load unsafe
    from mtsae.training.checkpoint import load_sae_from_checkpoint
    from mtsae_app.run_inputs import load_module

    for load in (load_module, load_sae_from_checkpoint):
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            load(str(planted))
    assert not (tmp_path / "ran").exists()


class _Payload:
    """Pickles to a call that creates a file: proof that unpickling ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_ckpt_path_last_resumes_from_the_newest_version_folder(tmp_path: Path) -> None:
    first = cli_main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "12")])
    first_dir = Path(first.trainer.checkpoint_callback.dirpath)
    assert first_dir.parent.name == "version_0"
    second = cli_main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "20"), "--ckpt_path", "last"])
    assert second.trainer.ckpt_path == str(first_dir / "last.ckpt")  # found in version_0
    second_dir = Path(second.trainer.checkpoint_callback.dirpath)
    assert second_dir.parent.name == "version_1"  # a new run, a new version folder
    assert _step(second_dir / "last.ckpt") == 20
    assert _step(first_dir / "last.ckpt") == 12  # the earlier run's files are left alone


def test_new_run_into_a_used_checkpoint_folder_is_refused(tmp_path: Path, capsys) -> None:
    fixed = [  # a second checkpoint callback with a fixed folder (as configs/gemma_l19.yaml has)
        "--trainer.callbacks+=callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        str(tmp_path / "ckpts"),
        "--trainer.callbacks.save_last",
        "true",
    ]
    cli_main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "4", *fixed)])
    assert _step(tmp_path / "ckpts" / "last.ckpt") == 4
    with pytest.raises(
        CheckpointFolderInUseError, match=r"ckpts already holds checkpoints .*--ckpt_path last"
    ):
        cli_main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "8", *fixed)])
    assert train.main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "8", *fixed)]) == 1
    assert "CheckpointFolderInUseError" in capsys.readouterr().err
    assert _step(tmp_path / "ckpts" / "last.ckpt") == 4
    resumed = cli_main(
        ["fit", *tiny_args(tmp_path, "--trainer.max_steps", "8", *fixed), "--ckpt_path", "last"]
    )
    assert resumed.trainer.global_step == 8
    assert sorted(p.name for p in (tmp_path / "ckpts").glob("last*")) == ["last.ckpt"]  # no last-v1.ckpt
    assert _step(tmp_path / "ckpts" / "last.ckpt") == 8


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    marker = tmp_path / "training"
    args = tiny_args(tmp_path, "--trainer.max_steps", "100000", "--trainer.max_epochs", "1000")
    script = (
        "import sys\n"
        "from mtsae import SAEModule\n"
        "def mark(self, *a):\n"
        f"    if self.trainer.global_step == 5: open({str(marker)!r}, 'w').close()\n"
        "SAEModule.on_train_batch_end = mark\n"
        "import train\n"
        f"sys.exit(train.main(['fit', *{args!r}]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "training did not start"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "--ckpt_path last" in err and "Traceback" not in err
    (last,) = (tmp_path / "runs").glob("demo/version_0/checkpoints/last.ckpt")
    assert 5 <= _step(last) < 100000
