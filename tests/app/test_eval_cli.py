"""The evaluation callbacks inside a tiny LM training run, and ``mtsae eval`` on its checkpoint (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import mtsae_app.cli as mtsae_cli
from mtsae import MTSAE, SAEMetadata, load_sae, load_sae_from_checkpoint, read_metadata, save_sae
from mtsae.sae.saelens import save_saelens
from tests.evals.unlearning.test_pipeline import build_mcq_lm, write_unlearning_files
from tests.helpers.lm import offline_hub
from tests.helpers.train import QUIET_OVERLAY
from train import cli_main

TINY_GRID = {"retain_thresholds": [0.01, 1.0], "n_features": [2, 4], "multipliers": [10.0, 100.0]}


def tiny_lm_config(tmp: Path, lm_dir: Path, files: dict) -> dict:
    """A training config on the tiny LM (layer 1, ctx 16) with both evaluation callbacks.

    Run with ``configs/debug/quiet.yaml`` layered on top (no progress bars, no model summary).
    """
    unlearning = {
        "every_n_val": 1,  # at the validation of step 4, and (the default) when training ends at step 6
        "config": {
            **files,
            "retain_config": None,
            "max_questions": 16,
            "n_sparsity_rows": 8,
            "seq_len": 32,
            "llm_batch_size": 8,
            "grid": TINY_GRID,
            "question_cache_dir": str(tmp / "question_cache"),
        },
    }
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,
            "val_check_interval": 4,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp / "runs"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp / "runs"), "name": "tiny_lm"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True},
                },
                {
                    "class_path": "callbacks.core_metrics.CoreLMMetrics",
                    "init_args": {"config": {"n_sequences": 8, "batch_size": 4}},
                },
                {"class_path": "callbacks.unlearning.Unlearning", "init_args": unlearning},
                {"class_path": "callbacks.ExportSAE"},
            ],
        },
        "model": {"d_sae": 128, "dilations": [1, 2], "separation": "none", "sparsity_coeff": 0.1},
        "data": {
            "source": {
                "class_path": "data.LMSource",
                "init_args": {
                    "model_name": str(lm_dir),
                    "layer": 1,
                    "dataset": str(lm_dir / "corpus.jsonl"),
                    "ctx_len": 16,
                    "model_dtype": "float32",
                    "device": "cpu",
                    "llm_batch_size": 16,
                    "progress": False,
                },
            },
            "cache_dir": str(tmp / "cache"),
            "n_sequences": 64,
            "val_sequences": 16,
            "shard_size": 64,
            "batch_size": 8,
        },
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny training run with both callbacks (shared by the tests of this module)."""
    tmp = tmp_path_factory.mktemp("eval_run")
    lm_dir = build_mcq_lm(tmp / "lm")
    files = write_unlearning_files(lm_dir, tmp / "data")
    cfg_path = tmp / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_lm_config(tmp, lm_dir, files)))
    cli = cli_main(["fit", "--config", str(cfg_path), "--config", QUIET_OVERLAY])
    run_dir = Path(cli.trainer.logger.log_dir)
    return {
        "cli": cli,
        "tmp": tmp,
        "files": files,
        "run_dir": run_dir,
        "config": run_dir / "config.yaml",
        "ckpt": Path(cli.trainer.checkpoint_callback.last_model_path),
        "metrics": dict(cli.trainer.callback_metrics),
    }


def test_callbacks_log_their_metrics(run: dict) -> None:
    m = run["metrics"]
    for key in (
        "val/ce_loss_score",
        "val/kl_div_score",
        "val/ce_loss_clean",
        "val/ce_loss_sae",
        "val/ce_loss_zero",
    ):
        assert key in m and torch.isfinite(m[key]), key
    assert m["val/ce_loss_clean"] <= m["val/ce_loss_sae"] + 1e-6 or m["val/ce_loss_score"] <= 1
    for key in ("val/unlearning_score", "val/unlearning/wmdp_acc_best", "val/unlearning/mmlu_acc_best"):
        assert key in m, key
    assert 0 <= float(m["val/unlearning_score"]) <= 1
    outs = sorted((run["run_dir"] / "unlearning").glob("step*.json"))
    assert [p.name for p in outs] == ["step4.json", "step6.json"]  # one validation, then the train end
    res = json.loads(outs[-1].read_text())
    assert len(res["configs"]) == 8 and res["model"]["name"].endswith("lm") and res["global_step"] == 6
    assert res["unlearning_score"] == pytest.approx(float(m["val/unlearning_score"]))
    core = [cb for cb in run["cli"].trainer.callbacks if type(cb).__name__ == "CoreLMMetrics"][0]
    assert core.state_dict() == {"n_validations": 1}
    assert list((run["tmp"] / "question_cache").glob("filtered_*.json"))  # reused by later evaluations


def test_eval_core_writes_results(run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_hub(monkeypatch)
    out = tmp_path / "core"
    args = ["--ckpt", str(run["ckpt"]), "--config", str(run["config"]), "--out", str(out)]
    assert (
        mtsae_cli.main(["eval", "core", *args, "--n-sequences", "8", "--device", "cpu", "--no-progress"]) == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert {"fvu", "l0", "dead_fraction"} <= set(res["reconstruction"])
    assert {"ce_loss_score", "kl_div_score", "ce_loss_clean", "ce_loss_sae", "ce_loss_zero"} <= set(res["lm"])
    assert res["n_sequences"] == 8 and res["layer"] == 1
    assert "ce_loss_score" in (out / "summary.md").read_text()


def _unlearning_data_args(run: dict) -> list[str]:
    """The tiny run's corpora and questions, and a one-point grid (SAEBench-exact unless told otherwise)."""
    f = run["files"]
    argv = [
        "--forget-corpus",
        f["forget_corpus"],
        "--retain-corpus",
        f["retain_corpus"],
        "--retain-config",
        "",
    ]
    argv += [
        "--wmdp-source",
        f["wmdp_source"],
        "--mmlu-file",
        *[f"{k}={v}" for k, v in f["mmlu_source"].items()],
    ]
    argv += ["--no-all-perms", "--max-questions", "16", "--n-sparsity-rows", "8", "--seq-len", "32"]
    return argv + [
        "--retain-thresholds",
        "1.0",
        "--n-features",
        "2",
        "--multipliers",
        "10",
        "--device",
        "cpu",
    ]


def _unlearning_args(run: dict) -> list[str]:
    return ["--no-saebench-exact", *_unlearning_data_args(run)]  # the tiny LM is not an instruct model


def test_eval_unlearning_saebench_exact_refuses_a_base_model(
    run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """SAEBench-exact (the default) refuses a model without a chat template, before loading it. The full
    command (results, recipe, ``mtsae unlearn generate``) is run by tests/app/test_unlearning_one_path.py."""
    offline_hub(monkeypatch)
    argv = ["eval", "unlearning", "--ckpt", str(run["ckpt"]), "--config", str(run["config"])]
    argv += [*_unlearning_data_args(run), "--no-progress", "--out", str(tmp_path / "exact")]
    assert mtsae_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "instruct model" in err and "--no-saebench-exact" in err
    assert not (tmp_path / "exact" / "results.json").exists()


def test_eval_disentanglement_writes_results(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "dis"
    argv = ["eval", "disentanglement", "--ckpt", str(run["ckpt"]), "--config", str(run["config"])]
    assert mtsae_cli.main([*argv, "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert (out / "results.json").exists() and (out / "summary.md").exists()
    assert "coherence/max" in (out / "summary.md").read_text()


def test_clear_errors(run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["eval", "core", "--config", str(run["config"]), "--out", str(tmp_path / "x"), "--no-progress"]
    assert mtsae_cli.main([*base, "--ckpt", str(tmp_path / "missing.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "missing.ckpt" in err and "does not exist" in err
    # a config whose activations have another width than the checkpoint's
    argv = ["eval", "core", "--ckpt", str(run["ckpt"]), "--config", "configs/demo.yaml"]
    argv += ["--set", "data.source.init_args.d_in=16", "--out", str(tmp_path / "y"), "--no-progress"]
    assert mtsae_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "d_in=64" in err and "width 16" in err
    # the unlearning eval without the gated forget corpus says how to get it, before loading any model
    argv = ["eval", "unlearning", "--ckpt", str(run["ckpt"]), "--config", str(run["config"])]
    argv += ["--out", str(tmp_path / "z"), "--wmdp-source", run["files"]["wmdp_source"]]
    argv += ["--mmlu-file", *[f"{k}={v}" for k, v in run["files"]["mmlu_source"].items()]]
    assert mtsae_cli.main([*argv, "--no-saebench-exact"]) == 2
    assert "cais/wmdp-bio-forget-corpus" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_mtsae_help_lists_subcommands(capsys: pytest.CaptureFixture) -> None:
    assert mtsae_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "eval" in out and "compare" in out and "unlearn" in out
    assert mtsae_cli.main(["eval", "--help"]) == 0
    assert "core,unlearning,disentanglement" in capsys.readouterr().out
    assert mtsae_cli.main(["nope"]) == 2


# ---------------------------------------------------------------------------------------------- --sae
def test_export_records_the_language_model(run: dict) -> None:
    meta = read_metadata(run["run_dir"] / "sae")
    source = run["cli"].datamodule.source
    assert meta.model_name == source.model_name and meta.model_revision is None
    assert meta.layer == 1 and meta.hook_name == "blocks.1.hook_resid_post"
    assert meta.context_size == 16 and meta.prepend_bos and meta.model_dtype == "float32"
    assert meta.activation_dtype == run["cli"].datamodule.spec.dtype
    assert meta.training_tokens == 6 * 8 * 16  # 6 steps of 8 rows of 16 tokens
    assert 0 < meta.training_valid_tokens < meta.training_tokens  # the BOS of every row is not valid
    assert meta.act_scale == pytest.approx(float(run["cli"].model.act_scale)) and meta.global_step == 6
    assert meta.data["dataset"] == source.dataset
    assert meta.git_commit is None or len(meta.git_commit.split("+")[0]) == 40


def test_eval_sae_folder_equals_checkpoint(
    run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--sae` on the export of a checkpoint gives the checkpoint's numbers, with the same code."""
    offline_hub(monkeypatch)
    exported = save_sae(load_sae_from_checkpoint(run["ckpt"]), tmp_path / "exported")
    res = {}
    for flag, value in (("--ckpt", run["ckpt"]), ("--sae", exported)):
        out = tmp_path / flag.strip("-")
        argv = ["eval", "core", flag, str(value), "--config", str(run["config"]), "--out", str(out)]
        assert mtsae_cli.main([*argv, "--n-sequences", "8", "--device", "cpu", "--no-progress"]) == 0
        res[flag] = json.loads((out / "results.json").read_text())
    assert res["--sae"]["sae"] == str(exported) and "checkpoint" not in res["--sae"]
    for part in ("reconstruction", "lm"):
        for k, v in res["--ckpt"][part].items():
            assert res["--sae"][part][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (part, k)


def _public_like_sae(run: dict, tmp_path: Path, layer: int) -> Path:
    """A per-token JumpReLU SAE in SAELens's format, as a public release would be (random weights)."""
    d_in = int(run["cli"].datamodule.d_in)
    sae = MTSAE(d_in, 96, dilations=[], activation="jumprelu")
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.b_enc.normal_(0, 0.01)
    meta = SAEMetadata(model_name="tiny-gemma", layer=layer, hook_name=f"blocks.{layer}.hook_resid_post")
    return save_saelens(sae, tmp_path / f"public_l{layer}", meta)


def test_eval_a_saelens_sae(run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_hub(monkeypatch)
    path = _public_like_sae(run, tmp_path, layer=1)
    assert load_sae(path).d_sae == 96
    base = ["--sae", str(path), "--config", str(run["config"]), "--no-progress"]
    out = tmp_path / "dis"
    assert mtsae_cli.main(["eval", "disentanglement", *base, "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["sae"] == str(path) and "coherence/max" in res["scalars"]
    assert "scale_attribution" not in res["scalars"]  # a per-token SAE has no scales
    out = tmp_path / "unl"
    assert mtsae_cli.main(["eval", "unlearning", *base, "--out", str(out), *_unlearning_args(run)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["sae"] == str(path) and 0 <= res["unlearning_score"] <= 1


def test_eval_sae_errors(run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["eval", "core", "--config", str(run["config"]), "--no-progress", "--device", "cpu"]
    # an SAE of another layer than the config's
    path = _public_like_sae(run, tmp_path, layer=0)
    assert mtsae_cli.main([*base, "--sae", str(path), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "layer 0" in err and "layer 1" in err and "data.source.init_args.layer=0" in err
    # an SAE of another hook point than the residual stream
    mlp = save_saelens(
        load_sae(path), tmp_path / "mlp", SAEMetadata(model_name="m", hook_name="blocks.1.hook_mlp_out")
    )
    assert mtsae_cli.main([*base, "--sae", str(mlp), "--out", str(tmp_path / "a")]) == 2
    assert "'blocks.1.hook_mlp_out'" in capsys.readouterr().err
    # a folder that holds no SAE
    (tmp_path / "empty").mkdir()
    assert mtsae_cli.main([*base, "--sae", str(tmp_path / "empty"), "--out", str(tmp_path / "b")]) == 2
    assert "not an SAE folder" in capsys.readouterr().err
    # --ckpt and --sae together
    argv = [*base, "--sae", str(path), "--ckpt", str(run["ckpt"]), "--out", str(tmp_path / "c")]
    assert mtsae_cli.main(argv) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")
