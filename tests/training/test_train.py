"""train.py end to end: configs parse, fast_dev_run, learning, resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtsae import SAEModule, load_sae, read_metadata
from tests.helpers.train import tiny_args
from train import cli_main

# training configs; overlays (configs/baselines) and compare configs have tests of their own
CONFIGS = sorted(str(p) for p in Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses(config: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", config, "--print_config"])
    assert e.value.code == 0
    assert "model:" in capsys.readouterr().out


def test_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--model.separation" in out and "--data.source" in out


def test_fast_dev_run(tmp_path: Path) -> None:
    cli = cli_main(["fit", *tiny_args(tmp_path, "--trainer.fast_dev_run", "true")])
    assert cli.trainer.global_step == 1
    assert cli.model.hparams.d_in == 16  # linked from the data


def test_fast_dev_run_with_the_mix_encoder(tmp_path: Path) -> None:
    cli = cli_main(["fit", *tiny_args(tmp_path, "--trainer.fast_dev_run", "true", "--model.encoder", "mix")])
    assert cli.trainer.global_step == 1
    assert cli.model.sae.encoder == "mix" and cli.model.sae.W_enc.shape == (16, 64)


def test_the_activation_sink_rule_reaches_the_checkpoint_and_the_export(tmp_path: Path) -> None:
    """``--model.max_norm_multiple`` (docs/design.md §3) is saved with the SAE, read back by every loader."""
    from mtsae import load_sae_from_checkpoint

    cli = cli_main(
        ["fit", *tiny_args(tmp_path, "--trainer.max_steps", "4", "--model.max_norm_multiple", "10")]
    )
    assert cli.model.sae.max_norm_multiple == 10.0
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    assert load_sae_from_checkpoint(ckpt).max_norm_multiple == 10.0
    assert load_sae(Path(cli.trainer.logger.log_dir) / "sae").max_norm_multiple == 10.0
    with pytest.raises(ValueError, match="max_norm_multiple"):
        cli_main(["fit", *tiny_args(tmp_path, "--model.max_norm_multiple", "0.5")])


def test_training_lowers_val_fvu(tmp_path: Path) -> None:
    cli = cli_main(tiny_args(tmp_path, "--trainer.max_epochs", "3"), run=False)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("validate")
    assert cli.model.initialise_from_stats(cli.datamodule.stats)  # start from the data-initialised b_dec
    (before,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.trainer.callback_metrics
    schedule = cli.trainer.lr_scheduler_configs[0].scheduler
    assert schedule.total_steps == cli.trainer.global_step == 3 * 32  # filled in from the data
    assert after["val/fvu"] < 0.5 * before["val/fvu"], (before["val/fvu"], after["val/fvu"])
    assert 0 < after["val/l0"] < 64
    for key in ("val/mmcs", "val/recovered", "val/recovered/local", "val/mmcs/slow", "val/dead_fraction"):
        assert key in after
    run_dir = Path(cli.trainer.logger.log_dir)
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "summary.json").exists() and (run_dir / "config.yaml").exists()

    # the exported SAE acts on raw activations and reproduces the module's reconstructions
    sae = load_sae(run_dir / "sae")
    meta = read_metadata(run_dir / "sae")
    assert meta.act_scale == pytest.approx(float(cli.model.act_scale)) and meta.global_step == 3 * 32
    assert meta.training_tokens == 3 * 32 * 16 * 16 and meta.context_size == 16  # steps x rows x tokens
    assert meta.model_name is None and meta.data["source"] == "synthetic"
    batch = next(iter(cli.datamodule.val_dataloader()))
    module = cli.model.eval()
    with torch.no_grad():
        want = module(batch["acts"], batch["valid"]).x_hat / module.act_scale
        got = sae(batch["acts"], batch["valid"]).x_hat
    valid = batch["valid"]
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)


def test_resume_continues_without_reinitialising(tmp_path: Path) -> None:
    first = cli_main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "16")])
    ckpt = first.trainer.checkpoint_callback.last_model_path
    assert ckpt and Path(ckpt).exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 16 and bool(state["state_dict"]["data_initialised"])

    second = cli_main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "24"), "--ckpt_path", ckpt])
    assert second.trainer.global_step == 24
    assert second.model.act_scale == first.model.act_scale
    loaded = SAEModule.load_from_checkpoint(ckpt)
    assert loaded.act_scale == first.model.act_scale
    trained_b_dec = loaded.sae.b_dec.detach().clone()
    stats = {"mean_sq_norm": 1.0, "mean": [5.0] * 16}
    assert not loaded.initialise_from_stats(stats)  # a restored module keeps its trained values
    assert torch.equal(loaded.sae.b_dec, trained_b_dec) and loaded.act_scale == first.model.act_scale
    assert loaded.initialise_from_stats(stats, force=True)
    assert torch.equal(loaded.sae.b_dec, torch.full((16,), 20.0)) and loaded.act_scale == 4.0


def test_bad_model_config_fails_before_building_anything(tmp_path: Path) -> None:
    with pytest.raises((ValueError, SystemExit)):
        cli_main(["fit", *tiny_args(tmp_path, "--model.dilations", "[]")])  # 'scales' needs dilations
    assert not (tmp_path / "cache").exists()


def test_resumed_schedule_uses_the_new_length() -> None:
    from mtsae.training.schedulers import WarmupDecayLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    old = WarmupDecayLR(opt, warmup_steps=0, decay_fraction=0.5, total_steps=100)
    for _ in range(60):
        opt.step()
        old.step()
    state = old.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    new = WarmupDecayLR(opt2, warmup_steps=0, decay_fraction=0.5, total_steps=1000)
    new.load_state_dict(state)
    assert new.total_steps == 1000 and new.last_epoch == 60
    assert new._factor(150) == 1.0  # the old run would be at lr 0 here


def test_freeze_conv_keeps_the_identity(tmp_path: Path) -> None:
    cli = cli_main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "5", "--model.freeze_conv", "true")])
    w = cli.model.sae.conv_weight
    assert not w.requires_grad
    assert torch.equal(w[:, :, -1], torch.ones_like(w[:, :, -1])) and not w[:, :, :-1].any()


def _fingerprints(path: Path) -> dict[int, float]:
    return {step: fp for step, fp in (json.loads(line) for line in path.read_text().splitlines())}


@pytest.mark.parametrize("window", [[], ["--data.shuffle_buffer_rows", "64", "--data.block_rows", "4"]])
def test_mid_epoch_resume_continues_with_the_unseen_rows(tmp_path: Path, window: list[str]) -> None:
    """Interrupted mid-epoch and resumed, training sees exactly the batches of an uninterrupted run.

    With the default 1024-row shuffle window the epoch (512 rows) is one window; with 64-row windows
    the interruption (after 11 batches of 16) falls in the third window.
    """
    probe = "--trainer.callbacks+=tests.helpers.batch_probe.BatchProbe"
    every = "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint"
    full = tmp_path / "full.jsonl"
    cli_main(
        [
            "fit",
            *tiny_args(
                tmp_path / "a",
                "--trainer.max_steps",
                "40",
                probe,
                "--trainer.callbacks.path",
                str(full),
                *window,
            ),
        ]
    )

    part = tmp_path / "part.jsonl"
    ckpt_dir = tmp_path / "ckpt"
    first = [
        "--trainer.max_steps",
        "11",  # 32 batches per epoch: stops mid-epoch, off the validation points
        probe,
        "--trainer.callbacks.path",
        str(part),
        every,
        "--trainer.callbacks.dirpath",
        str(ckpt_dir),
        "--trainer.callbacks.every_n_train_steps",
        "11",
        "--trainer.callbacks.filename",
        "mid",
    ]
    cli_main(["fit", *tiny_args(tmp_path / "b", *first, *window)])
    second = [
        "--trainer.max_steps",
        "40",
        probe,
        "--trainer.callbacks.path",
        str(part),
        "--ckpt_path",
        str(ckpt_dir / "mid.ckpt"),
    ]
    cli_main(["fit", *tiny_args(tmp_path / "b", *second, *window)])
    assert _fingerprints(part) == _fingerprints(full)


def test_training_metrics_are_computed_only_on_logged_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-step host work: train/* metrics are reduced and passed to self.log every log_every_n_steps."""
    logged_at: list[int] = []
    original = SAEModule.log_dict

    def spy(self, metrics, *args, **kwargs):
        if "train/l0" in metrics:
            logged_at.append(self.global_step)
        return original(self, metrics, *args, **kwargs)

    monkeypatch.setattr(SAEModule, "log_dict", spy)
    args = [
        "--trainer.max_steps",
        "12",
        "--trainer.log_every_n_steps",
        "4",
        "--trainer.val_check_interval",
        "1.0",
    ]
    cli = cli_main(["fit", *tiny_args(tmp_path, *args)])
    assert logged_at == [3, 7, 11]  # Lightning writes steps 4, 8, 12 (global_step counts finished steps)
    assert "train/fvu" in cli.trainer.logged_metrics and "train/loss" in cli.trainer.logged_metrics
