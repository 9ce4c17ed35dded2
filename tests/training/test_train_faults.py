"""Training faults end with a message that names the cause: bad configs before any work, a full disk
(exit status 1, no crash), stale or reused checkpoint folders, SIGTERM (a checkpoint, exit status 143)."""

from __future__ import annotations

import json
import os
import pickle
import re
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


def _train_with_file_size_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """``train.py fit args`` in a subprocess whose writes past ``limit`` bytes fail with EFBIG, as on a full
    disk (a real OS failure, not a mocked one)."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # a write past the limit fails with EFBIG
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"
        "import train\n"
        f"sys.exit(train.main(['fit', *{args!r}]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )


def _sigterm_when(marker: Path, script: str, not_reached: str) -> tuple[int, str]:
    """Run ``script`` in a subprocess, send it SIGTERM once ``marker`` exists; its exit status and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), not_reached
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


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
    proc = _train_with_file_size_limit(args, 200_000)
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
    from mtsae_app.run_inputs import EvalError, load_module

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_sae_from_checkpoint(str(planted))
    with pytest.raises(EvalError, match="holds pickled objects .* are never loaded") as err:
        load_module(str(planted))
    assert "weights_only=False" not in str(err.value)
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
    returncode, err = _sigterm_when(marker, script, "training did not start")
    assert returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "--ckpt_path last" in err and "Traceback" not in err
    (last,) = (tmp_path / "runs").glob("demo/version_0/checkpoints/last.ckpt")
    assert 5 <= _step(last) < 100000


def test_a_second_training_into_a_folder_in_use_is_refused(tmp_path: Path, capsys) -> None:
    """Race-free: the folder's lock is taken before it is checked, and held while the first run trains
    (here the test holds it, as a run started a moment earlier would)."""
    import fcntl

    fixed = [
        "--trainer.callbacks+=callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        str(tmp_path / "ckpts"),
        "--trainer.callbacks.save_last",
        "true",
    ]
    (tmp_path / "ckpts").mkdir()
    with open(tmp_path / "ckpts" / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node7")
        held.flush()
        for resume in ([], ["--ckpt_path", "last"]):
            assert train.main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "4", *fixed), *resume]) == 1
            err = capsys.readouterr().err
            assert "CheckpointFolderInUseError: another training (pid 4242 on node7) is writing" in err, err
        assert not list((tmp_path / "ckpts").glob("*.ckpt"))
    cli_main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "4", *fixed)])  # released: it trains
    assert _step(tmp_path / "ckpts" / "last.ckpt") == 4
    again = cli_main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "6", *fixed), "--ckpt_path", "last"])
    assert again.trainer.global_step == 6  # the finished run released the lock


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "--data.batch_size",
            "10000",
            r"data.batch_size \(10000\) is larger than the 512 training sequences",
        ),
        ("--data.num_workers", "-1", "data.num_workers must be >= 0, got -1"),
        ("--data.val_batch_size", "0", "data.val_batch_size must be >= 1, got 0"),
    ],
)
def test_bad_data_values_are_refused_before_the_cache_build(tmp_path: Path, option, value, message, capsys):
    assert train.main(["fit", *tiny_args(tmp_path, option, value)]) == 2
    err = capsys.readouterr().err
    assert re.search(f"train.py: configuration error: {message}", err) and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists()


def test_sigterm_during_the_cache_build_says_how_to_resume(tmp_path: Path) -> None:
    marker = tmp_path / "building"
    args = tiny_args(tmp_path, "--trainer.max_steps", "2")
    script = (
        "import sys, time\n"
        "from data import SyntheticSource\n"
        "original = SyntheticSource.generate\n"
        "def slow(self, lo, hi, batch):\n"
        "    for chunk in original(self, lo, hi, batch):\n"
        f"        if lo >= 256: open({str(marker)!r}, 'w').close(); time.sleep(60)\n"  # the second shard
        "        yield chunk\n"
        "SyntheticSource.generate = slow\n"
        "import train\n"
        f"sys.exit(train.main(['fit', *{args!r}]))\n"
    )
    returncode, err = _sigterm_when(marker, script, "the build did not reach the second shard")
    assert returncode == 143, err[-2000:]
    assert "train.py: stopped by SIGTERM while building the cache at" in err and "Traceback" not in err
    (root,) = (tmp_path / "cache").iterdir()
    manifest = json.loads((root / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard_00000.h5"] and not manifest["complete"]


def test_a_full_disk_under_the_run_folder_is_one_message(tmp_path: Path) -> None:
    """The cache is built; then every file the run writes (TensorBoard events, checkpoints) exceeds a
    file-size limit, as on a full disk: one message and exit status 1, no traceback (also none from
    TensorBoard's writer thread)."""
    cli_main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "1")])
    runs = tmp_path / "full"
    args = tiny_args(tmp_path, "--trainer.max_steps", "20", "--trainer.default_root_dir", str(runs))
    args += ["--trainer.logger.init_args.save_dir", str(runs)]
    proc = _train_with_file_size_limit(args, 20_000)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "train.py: cannot write" in proc.stderr and "File too large (errno 27)" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
