"""``configs/gemma_l19.yaml`` (the real job) and ``configs/tiny_lm.yaml``, ``configs/smollm2.yaml``,
``configs/gemma3_270m.yaml`` (the same job, offline).

- gemma_l19.yaml parses with ``--print_config`` without touching the network;
- each of the others differs from it only in names and sizes: same keys, same classes, same values except an
  explicit allowlist, so a class or option added to one file only fails here;
- ``train.py fit --config configs/tiny_lm.yaml`` builds the bf16 cache from a tiny Gemma-2 and trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from data.cache import ActivationCache
from data.cache_format import from_storage
from tests.helpers.lm import offline_hub, tiny_lm_args, tiny_lm_dir
from train import cli_main

REPO = Path(__file__).resolve().parents[2]
GEMMA = REPO / "configs/gemma_l19.yaml"
TINY = REPO / "configs/tiny_lm.yaml"
SMOLLM2 = REPO / "configs/smollm2.yaml"
GEMMA3 = REPO / "configs/gemma3_270m.yaml"

# Leaves (by key name) that may differ between the two configs. Nothing else may: no class_path,
# no loss, optimizer, schedule shape, cache dtype or data option. Keep this list short.
NAMES = {"model_name", "dataset", "name", "dirpath"}
SIZES = {
    "layer",
    "ctx_len",
    "d_sae",
    "n_sequences",
    "val_sequences",
    "shard_size",
    "num_workers",
    "log_every_n_steps",
    "every_n_train_steps",
    "max_epochs",
    "warmup_steps",
    "sparsity_warmup_steps",
    "batch_size",  # CoreLMMetrics (n_sequences above)
    "max_batches",  # Disentanglement
    "llm_batch_size",
}
DEVICES = {"accelerator", "devices", "strategy", "precision", "model_dtype"}
# measured per model: the activation-sink rule (`mtsae cache norms`), the L1 weight (the L0 it reaches
# depends on the model's activations; configs/smollm2.yaml says what 5.0 gave) and the learning rate of a
# short CPU budget
MEASURED = {"max_norm_multiple", "sparsity_coeff", "lr"}
MAY_DIFFER = NAMES | SIZES | DEVICES
# configs of a real model (smollm2, gemma3_270m) may also differ in what was measured on that model
MAY_DIFFER_MEASURED = MAY_DIFFER | MEASURED


def config_differences(
    a: object, b: object, path: tuple = (), may_differ: set[str] = MAY_DIFFER
) -> list[str]:
    """Every place where ``a`` and ``b`` differ in structure (keys, list lengths, types) or in a leaf
    whose key is not in ``may_differ``."""
    where = ".".join(str(p) for p in path) or "<root>"
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}: key {k!r} only in one file" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += config_differences(a[k], b[k], (*path, k), may_differ)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in config_differences(x, y, (*path, i), may_differ)
        ]
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return [f"{where}: structure differs ({type(a).__name__} vs {type(b).__name__})"]
    key = next((p for p in reversed(path) if isinstance(p, str)), None)
    if a != b and key not in may_differ:
        return [f"{where}: {a!r} vs {b!r}"]
    return []


def class_paths(cfg: object) -> list[str]:
    if isinstance(cfg, dict):
        own = [cfg["class_path"]] if "class_path" in cfg else []
        return own + [c for v in cfg.values() for c in class_paths(v)]
    if isinstance(cfg, list):
        return [c for v in cfg for c in class_paths(v)]
    return []


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------- parsing
def test_gemma_config_parses_offline(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    offline_hub(monkeypatch)  # parsing must not reach the hub (no model config, no dataset)
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(GEMMA), "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    src = printed["data"]["source"]
    assert src["class_path"] == "data.LMSource"
    assert src["init_args"]["model_name"] == "google/gemma-2-2b" and src["init_args"]["layer"] == 19
    assert printed["model"]["d_sae"] == 16384 and printed["trainer"]["strategy"] == "ddp"


def test_gemma_config_is_the_issue_job() -> None:
    cfg = load(GEMMA)
    tr, model, data = cfg["trainer"], cfg["model"], cfg["data"]
    src = data["source"]["init_args"]
    assert data["source"]["class_path"] == "data.LMSource"
    assert (src["model_name"], src["layer"], src["ctx_len"]) == ("google/gemma-2-2b", 19, 128)
    assert (src["dataset"], src["split"], src["text_column"]) == (
        "monology/pile-uncopyrighted",
        "train",
        "text",
    )
    assert src["streaming"] and not src.get("trust_remote_code", False)
    assert data["dtype"] == "bfloat16" and data["num_workers"] > 0
    assert data["n_sequences"] * src["ctx_len"] >= 100_000_000  # a real token budget
    assert (model["d_sae"], model["dilations"]) == (16384, [1, 2, 4, 8])
    assert (model["separation"], model["separation_coeff"]) == ("scales", 0.1)
    assert model["sparsity_warmup_steps"] > 0
    assert model["lr_scheduler"]["class_path"] == "mtsae.training.schedulers.WarmupDecayLR"
    assert (tr["precision"], tr["strategy"], tr["devices"], tr["accelerator"]) == (
        "bf16-mixed",
        "ddp",
        -1,
        "gpu",
    )
    assert tr["logger"]["class_path"].endswith("TensorBoardLogger")
    assert tr["logger"]["init_args"]["name"] == "gemma_l19"
    ckpts = [c["init_args"] for c in tr["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert any(c.get("save_last") and c.get("every_n_train_steps") for c in ckpts)  # resumable
    paths = class_paths(cfg)
    assert not {"callbacks.GroundTruthRecovery", "callbacks.SyntheticUnlearning"} & set(
        paths
    )  # no ground truth
    demo_callbacks = {c["class_path"] for c in load(REPO / "configs/demo.yaml")["trainer"]["callbacks"]}
    assert demo_callbacks - {"callbacks.GroundTruthRecovery", "callbacks.SyntheticUnlearning"} <= set(paths)


# ------------------------------------------------------------------------------ same job, other sizes
def test_tiny_lm_differs_from_gemma_only_in_names_and_sizes() -> None:
    gemma, tiny = load(GEMMA), load(TINY)
    assert config_differences(gemma, tiny) == []
    assert class_paths(gemma) == class_paths(tiny)
    # it is really the small, offline, CPU version
    src = tiny["data"]["source"]["init_args"]
    assert (tiny["trainer"]["accelerator"], tiny["trainer"]["devices"]) == ("cpu", 1)
    assert src["model_dtype"] == "float32" and src["ctx_len"] < 128
    # and its model is the folder that `make tiny-lm` / `mtsae example tiny-lm` writes by default
    assert src["model_name"] == "artifacts/tiny_lm" and src["dataset"] == "artifacts/tiny_lm/corpus.jsonl"
    assert "--out artifacts/tiny_lm" in (REPO / "Makefile").read_text()


def _without_unlearning(cfg: dict) -> tuple[dict, list[dict]]:
    """``cfg`` without its ``callbacks.Unlearning`` entries (commented out in gemma_l19.yaml: its forget
    corpus is gated), and those entries."""
    cbs = cfg["trainer"]["callbacks"]
    unlearning = [c for c in cbs if c["class_path"] == "callbacks.Unlearning"]
    cfg["trainer"]["callbacks"] = [c for c in cbs if c["class_path"] != "callbacks.Unlearning"]
    return cfg, unlearning


def test_smollm2_differs_from_gemma_only_in_names_and_sizes() -> None:
    gemma, (smol, unlearning) = load(GEMMA), _without_unlearning(load(SMOLLM2))
    assert config_differences(gemma, smol, may_differ=MAY_DIFFER_MEASURED) == []
    assert class_paths(gemma) == class_paths(smol)
    src = smol["data"]["source"]["init_args"]
    assert src["model_name"].endswith(".gguf") and src["layer"] == 20 and src["ctx_len"] == 128
    assert smol["data"]["n_sequences"] * src["ctx_len"] >= 1_000_000  # >= 1M training tokens
    assert (smol["trainer"]["accelerator"], smol["trainer"]["devices"]) == ("cpu", 1)
    assert smol["model"]["max_norm_multiple"] == 10  # activation sinks (`mtsae cache norms`)
    # the unlearning callback in the small-model mode, reading what `make smollm2` writes
    ((cb),) = unlearning
    cfg = cb["init_args"]["config"]
    assert cfg["scoring"] == "cloze" and cfg["forget_heldout"] and cfg["retain_heldout"]
    for key in ("question_file", "forget_corpus", "retain_corpus", "forget_heldout", "retain_heldout"):
        assert cfg[key].startswith("artifacts/smollm2/data/")
    assert "mtsae_app.offline --out $(SMOLLM2)" in (REPO / "Makefile").read_text()


def test_smollm2_config_parses_with_its_unlearning_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    offline_hub(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(SMOLLM2), "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    (cb,) = [c for c in printed["trainer"]["callbacks"] if c["class_path"] == "callbacks.Unlearning"]
    cfg = cb["init_args"]["config"]
    assert cfg["scoring"] == "cloze" and cfg["saebench_exact"] is False  # the callback's defaults
    assert cfg["grid"]["retain_thresholds"] == [0.01, 0.1]


def test_gemma3_differs_from_gemma_only_in_names_and_sizes() -> None:
    gemma, g3 = load(GEMMA), load(GEMMA3)
    assert config_differences(gemma, g3, may_differ=MAY_DIFFER_MEASURED) == []
    assert class_paths(gemma) == class_paths(g3)  # core metrics only: no unlearning callback (a base model)
    src = g3["data"]["source"]["init_args"]
    assert src["model_name"] == "artifacts/gemma3/gemma-3-270m-q4_k_m.gguf" and src["ctx_len"] == 128
    # the residual stream after 14 of 18 blocks, as gemma-2-2b's layer 19 is after 20 of 26
    assert src["layer"] == 13 and abs((src["layer"] + 1) / 18 - 20 / 26) < 0.02
    assert src["dataset"] == "artifacts/smollm2/data/train.jsonl" and src["model_dtype"] == "float32"
    assert g3["model"]["d_sae"] == 4 * 640 and g3["model"]["max_norm_multiple"] == 10
    assert (g3["trainer"]["accelerator"], g3["trainer"]["devices"]) == ("cpu", 1)
    makefile = (REPO / "Makefile").read_text()
    assert (
        "mtsae_app.offline --model gemma3 --out $(GEMMA3)" in makefile
        and "GEMMA3 := artifacts/gemma3" in makefile
    )


def test_gemma3_config_parses_offline(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    offline_hub(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(GEMMA3), "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["source"]["init_args"]["layer"] == 13 and printed["model"]["d_sae"] == 2560


def test_config_comparison_catches_a_new_class_or_option() -> None:
    gemma, tiny = load(GEMMA), load(TINY)
    tiny["trainer"]["callbacks"].append({"class_path": "callbacks.GroundTruthRecovery"})
    assert config_differences(gemma, tiny)
    tiny = load(TINY)
    tiny["model"]["optimizer"]["class_path"] = "torch.optim.AdamW"
    assert config_differences(gemma, tiny)
    tiny = load(TINY)
    tiny["data"]["dtype"] = "float32"  # a different cache format is a different code path
    assert config_differences(gemma, tiny)
    tiny = load(TINY)
    tiny["model"]["cascade"] = True
    assert config_differences(gemma, tiny)


# --------------------------------------------------------------------------------------- end to end
def test_tiny_lm_config_builds_cache_and_trains(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    offline_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)  # relative paths of the config (checkpoint dirpath) land in tmp_path
    lm = tiny_lm_dir(tmp_path_factory)
    steps = 6
    cli = cli_main(["fit", *tiny_lm_args(lm, tmp_path / "cache", tmp_path / "runs", steps)])
    tiny = load(TINY)
    hidden = json.loads((lm / "config.json").read_text())["hidden_size"]

    # the cache: complete, bf16 as configured, d_in of the tiny model, rows start with BOS
    (root,) = list((tmp_path / "cache").iterdir())
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dtype"] == tiny["data"]["dtype"] == "bfloat16"
    assert (
        manifest["d_in"] == hidden and manifest["ctx_len"] == tiny["data"]["source"]["init_args"]["ctx_len"]
    )
    assert manifest["n_sequences"] == tiny["data"]["n_sequences"]
    cache = ActivationCache(root)
    assert len(cache.rows("train")) == tiny["data"]["n_sequences"]
    import h5py

    with h5py.File(root / manifest["shards"][0]["file"]) as h5:
        assert h5["acts"].dtype.name == "uint16" and h5["acts"].attrs["torch_dtype"] == "bfloat16"
        acts = from_storage(h5["acts"][:2], "bfloat16")  # [2, T, d]
        assert acts.isfinite().all() and acts.abs().sum() > 0
    batch = cache.read([0, 1])
    assert not batch["valid"][:, 0].any()  # BOS is never a training token

    # training: d_in linked from the data, the steps ran, validation metrics logged, checkpoints written
    assert cli.model.hparams.d_in == hidden
    assert cli.trainer.global_step == steps
    assert "val/fvu" in cli.trainer.callback_metrics
    assert 0 <= float(cli.trainer.callback_metrics["val/fvu"]) < 10
    run_dir = Path(cli.trainer.logger.log_dir)
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "summary.json").exists()
    assert (tmp_path / "runs/tiny_lm/checkpoints/last.ckpt").exists()
