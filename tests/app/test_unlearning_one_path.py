"""``mtsae eval unlearning`` and ``callbacks.Unlearning`` run one entry point: same inputs, same results file.

A tiny LM whose tokenizer has a chat template is trained on for two steps with the callback (it runs once,
when training ends); the command then evaluates the last checkpoint (the same SAE) with the same
settings. Both results files must agree in every number and in the sets of questions kept, with the
chat template and without it (the command once filtered the questions under one prompt format and
scored them under another).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import mtsae_app.cli as mtsae_cli
from tests.app.test_eval_cli import tiny_lm_config
from tests.evals.unlearning.test_pipeline import build_mcq_lm, write_unlearning_files
from tests.helpers.lm import offline_hub
from tests.helpers.train import QUIET_OVERLAY
from train import cli_main

_TEMPLATE = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<model>"
GRID = {
    "retain_thresholds": [1.0],
    "n_features": [2],
    "multipliers": [10.0, 100.0],
    "min_mmlu_accuracy": 0.0,
}
#: what the callback and the command record about where the SAE came from (not results)
PROVENANCE = ("command", "checkpoint", "checkpoint_step", "global_step", "recipe")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny LM with a chat template (an "instruct" tokenizer), its unlearning files, one cache."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("one_path")
    lm_dir = build_mcq_lm(tmp / "lm")
    tok = AutoTokenizer.from_pretrained(lm_dir)
    tok.chat_template = _TEMPLATE
    tok.save_pretrained(lm_dir)
    return {"tmp": tmp, "lm": lm_dir, "files": write_unlearning_files(lm_dir, tmp / "data")}


def _settings(files: dict, chat_template: bool) -> dict:
    return {
        **files,
        "retain_config": None,
        "all_perms": False,
        "max_questions": 16,
        "n_sparsity_rows": 8,
        "seq_len": 32,
        "llm_batch_size": 8,
        "mcq_batch_size": 16,
        "saebench_exact": False,
        "chat_template": chat_template,
        "grid": GRID,
    }


def _cli_args(files: dict, chat_template: bool) -> list[str]:
    """:func:`_settings` as ``mtsae eval unlearning`` options."""
    argv = ["--forget-corpus", files["forget_corpus"], "--retain-corpus", files["retain_corpus"]]
    argv += ["--retain-config", "", "--wmdp-source", files["wmdp_source"], "--mmlu-file"]
    argv += [f"{k}={v}" for k, v in files["mmlu_source"].items()]
    argv += ["--no-all-perms", "--max-questions", "16", "--n-sparsity-rows", "8", "--seq-len", "32"]
    argv += ["--llm-batch-size", "8", "--mcq-batch-size", "16", "--no-saebench-exact"]
    argv += ["--chat-template" if chat_template else "--no-chat-template"]
    argv += ["--retain-thresholds", "1.0", "--n-features", "2", "--multipliers", "10", "100"]
    return argv + ["--min-mmlu-accuracy", "0", "--device", "cpu", "--no-progress"]


def _results(path: Path) -> dict:
    res = json.loads(path.read_text())
    for key in PROVENANCE:
        res.pop(key, None)
    return res


@pytest.mark.parametrize("chat_template", [False, True])
def test_cli_and_callback_write_the_same_results(
    inputs: dict,
    chat_template: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    offline_hub(monkeypatch)
    tmp, files = inputs["tmp"], inputs["files"]
    cfg = tiny_lm_config(tmp_path, inputs["lm"], files)
    cfg["data"]["cache_dir"] = str(tmp / "cache")  # built by the first case, read by the second
    cfg["trainer"].update({"max_steps": 2, "val_check_interval": 2})
    unlearning = {"config": _settings(files, chat_template)}  # once, when training ends
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
        {"class_path": "callbacks.unlearning.Unlearning", "init_args": unlearning},
    ]
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(tmp_path / "train.yaml"), "--config", QUIET_OVERLAY])
    run_dir = Path(cli.trainer.logger.log_dir)
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)

    out = tmp_path / "eval"
    argv = ["eval", "unlearning", "--ckpt", str(ckpt), "--config", str(run_dir / "config.yaml")]
    assert mtsae_cli.main([*argv, "--out", str(out), *_cli_args(files, chat_template)]) == 0

    from_cli = json.loads((out / "results.json").read_text())
    from_callback = json.loads((run_dir / "unlearning" / "step2.json").read_text())
    assert from_cli["checkpoint_step"] == from_callback["global_step"] == 2  # the same SAE
    assert from_callback["settings"]["chat_template"] is chat_template
    assert _results(out / "results.json") == _results(run_dir / "unlearning" / "step2.json")
    kept = from_cli["kept_questions"]
    assert sum(map(len, kept.values())) > 0 and from_cli["model"]["trust_remote_code"] is False
    # both filtered with the settings they scored with: the unmodified model gets every kept question right
    assert from_cli["baseline"] == {"wmdp_accuracy": 1.0, "mmlu_accuracy": 1.0}
    inputs.setdefault("kept", {})[chat_template] = kept
    assert "unlearning score" in (out / "summary.md").read_text()
    if not chat_template:
        _check_recipe(from_cli, out, tmp_path, capsys)
        # the callback writes the same recipe beside its results, naming its own export of the same SAE
        by_cli = json.loads((out / "recipe.json").read_text())
        by_callback = json.loads((run_dir / "unlearning" / "recipe_step2.json").read_text())
        assert from_callback["recipe"] == str(run_dir / "unlearning" / "recipe_step2.json")
        assert by_callback["sae_path"] == "sae_step2" and (run_dir / "unlearning" / "sae_step2").is_dir()
        same = ("features", "multiplier", "layer", "sae_sha256")
        assert {k: by_callback[k] for k in same} == {k: by_cli[k] for k in same}


def _check_recipe(res: dict, out: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The command writes the best config's recipe beside the results, with the exported SAE it names,
    and ``mtsae unlearn generate`` applies it."""
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["features"] == res["best"]["features"] and recipe["layer"] == 1
    assert recipe["sae_path"] == "sae" and (out / "sae" / "config.json").exists()
    assert recipe["model"]["name"] == res["model"]["name"]
    gen = ["unlearn", "generate", "--recipe", str(out / "recipe.json"), "--prompt", "The cell binds"]
    gen += ["--prompt", "A virus", "--max-new-tokens", "6", "--compare", "--device", "cpu"]
    capsys.readouterr()
    assert mtsae_cli.main([*gen, "--out", str(tmp_path / "gen.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The cell binds", "A virus"]
    assert all(r["clamped"] and r["original"] for r in rows)
    assert "[clamped]" in capsys.readouterr().out
    assert (
        mtsae_cli.main(["unlearn", "generate", "--recipe", str(tmp_path / "no.json"), "--prompt", "x"]) == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_the_chat_template_changes_the_questions_kept(inputs: dict) -> None:
    """The two cases above differ (so their equality means something): run after them."""
    kept = inputs.get("kept", {})
    if len(kept) != 2:
        pytest.skip("needs both cases of test_cli_and_callback_write_the_same_results")
    assert kept[False] != kept[True]
