"""``configs/compare/smollm2.yaml``: the real-model grid shares the cache of ``configs/smollm2.yaml``, and a
quick-sized copy of it runs end to end on the tiny LM (LM columns, own-L0 ReLU pair, feature examples)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data.datamodule import ActivationDataModule
from data.lm_source import LMSource
from mtsae import compare
from mtsae.compare import frontier
from mtsae.compare.runner import train_args
from mtsae.features.examples import EXAMPLES_FILE, examples_markdown, long_branch_share
from mtsae.sae.model import MTSAE
from mtsae_app import compare as compare_cli
from tests.helpers.lm import offline_hub, tiny_lm_dir
from train import cli_main

REPO = Path(__file__).resolve().parents[2]
GRID = "configs/compare/smollm2.yaml"
LM_METRICS = (
    "val/ce_loss_score",
    "val/kl_div_score",
    "val/dead_fraction",
    "val/unlearning_score",
    "val/unlearning/text_selectivity_max",  # every run has one (the best point's may be missing)
)


def test_the_grid_is_the_issue_grid() -> None:
    cfg = compare.load_compare_config(GRID)
    fr = cfg.frontier
    assert cfg.base == "configs/smollm2.yaml" and cfg.seeds == [0, 1]
    assert list(fr.families) == ["token", "mtsae", "mtsae_frozen_conv"]
    topk, relu = fr.activations
    assert [v["k"] for v in topk.values] == [16, 32, 64] and topk.families is None
    base_l1 = yaml.safe_load((REPO / "configs/smollm2.yaml").read_text())["model"]["sparsity_coeff"]
    assert relu.values == [base_l1] and relu.families == ["token", "mtsae"]  # the method as configured
    assert len(cfg.runs) == 3 * 3 * 2 + 2 * 1 * 2
    for metric in ("val/ce_loss_score", "val/unlearning_score", "val/unlearning/text_selectivity_max"):
        assert metric in fr.metrics and fr.min_effect[metric] > 0
    mtsae_relu = next(r for r in cfg.runs if r.name == "relu-mtsae-0-s0")
    assert "--model.activation=relu" in mtsae_relu.args  # the base model: concat, scales separation


def _printed(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    with pytest.raises(SystemExit) as e:
        cli_main([*args, "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def _cache_key(data: dict) -> Path:
    """The cache folder a data section resolves to (the model file's hash stubbed: same file, same hash)."""
    source = LMSource(**data["source"]["init_args"])
    source._model_sha256 = "0" * 64
    return ActivationDataModule(source, **{k: v for k, v in data.items() if k != "source"}).cache_root


def test_every_run_reads_the_cache_of_configs_smollm2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Same resolved data section, hence the same cache folder, for one run of every (activation, family);
    every run keeps the base config's activation-sink rule (a model setting: not in the cache key)."""
    offline_hub(monkeypatch)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    reference = _printed(["fit", "--config", "configs/smollm2.yaml"], capsys)["data"]
    key = _cache_key(reference)
    assert key.parent == Path("cache") and len(key.name) == 16
    cfg = compare.load_compare_config(GRID)
    seen = set()
    for run in cfg.runs:
        if (run.activation, run.family) in seen:
            continue
        seen.add((run.activation, run.family))
        printed = _printed(train_args(tmp_path, cfg, run), capsys)
        data = printed["data"]
        assert data == reference and _cache_key(data) == key, run.name
        assert printed["model"]["max_norm_multiple"] == 10, run.name
    assert len(seen) == 5


def test_a_single_knob_value_compares_families_at_their_own_l0() -> None:
    pts = [
        frontier.Point(fam, "relu", s, l0, {"val/fvu": fvu + 0.001 * s, "val/l0": l0})
        for fam, l0, fvu in (("token", 40.0, 0.30), ("mtsae", 55.0, 0.20))
        for s in (0, 1)
    ]
    fa = frontier.frontier_analysis(
        pts, "relu", ["token", "mtsae"], ["val/fvu"], [("mtsae", "token")], single_value=True
    )
    assert not fa.matched and fa.l0_range == (40.0, 55.0)
    assert fa.table["val/l0"]["mtsae"][0].mean == 55.0 and fa.table["val/fvu"]["token"][0].n == 2
    assert [v.outcome for v in fa.verdicts] == ["better"]
    line = compare.frontier_report.verdict_lines(fa)[0]
    assert "at own L0" in line and "better" in line


def test_a_partial_grid_of_a_swept_activation_is_not_compared_at_own_l0() -> None:
    """A 3-value TopK sweep where each (family, seed) finished one run, at different k: one point each, but
    the families sit at different knob values, so no claim "at own L0" is made (no frontier either)."""
    pts = [
        frontier.Point(fam, "topk", s, l0, {"val/fvu": fvu, "val/l0": l0})
        for fam, s, l0, fvu in (
            ("token", 0, 8.0, 0.4),
            ("token", 1, 8.1, 0.4),
            ("mtsae", 0, 32.0, 0.1),
            ("mtsae", 1, 32.2, 0.1),
        )
    ]
    fa = frontier.frontier_analysis(pts, "topk", ["token", "mtsae"], ["val/fvu"], [("mtsae", "token")])
    assert fa.matched and fa.l0_range is None and not fa.verdicts
    assert "nothing is compared" in compare.frontier_report.verdict_lines(fa)[0]
    # the report decides it from the config: the grid's relu has one value, its topk three
    cfg = compare.load_compare_config(REPO / GRID)
    done = [
        r for r in cfg.runs if r.activation == "relu" or (r.point, r.family) in {(0, "token"), (2, "mtsae")}
    ]
    results = [
        compare.RunResult(r.name, r, {"val/l0": 8.0 + 4 * r.point, "val/fvu": 0.3}, {}, None, None, "")
        for r in done
    ]
    by_act = {fa.activation: fa for fa in compare.frontier_report.analyse_frontiers(cfg, results)}
    assert by_act["topk"].matched and by_act["topk"].l0_range is None and not by_act["topk"].verdicts
    assert not by_act["relu"].matched and by_act["relu"].verdicts


def test_an_activation_may_name_a_subset_of_the_families(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / GRID).read_text())
    raw["frontier"]["activations"]["relu"]["families"] = ["nope"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="families must list family names"):
        compare.load_compare_config(path)


def test_long_branch_share_and_example_cells() -> None:
    sae = MTSAE(8, 4, dilations=[1, 2, 4, 8])
    W = sae.W_enc.detach()
    W.zero_()
    W[0:8, 0] = 1.0  # dilation 1 only
    W[24:32, 1] = 1.0  # dilation 8 only
    W[:, 2:] = 1.0  # even
    share = long_branch_share(sae, 4)
    assert share.tolist() == pytest.approx([0.0, 1.0, 0.5, 0.5])
    assert long_branch_share(MTSAE(8, 4, dilations=[]), 4) is None
    ex = {"kind": "top", "pos": 3, "start": 0, "acts": [0, 0, 0, 1.5], "tokens": [1, 2, 3, 4],
          "valid": [False, True, True, True], "text": ["<s>", "a|b", "\n", "c"]}  # fmt: skip
    table = examples_markdown([{"id": 7, "density": 0.01, "examples": [ex], "long_share": 0.9}])
    assert table[2].startswith("| 7 | 0.0100 | 0.90 |") and "a\\|b⏎[[c]] (1.50)" in table[2]
    # an activation sink (a valid token the SAE leaves out) is shown, marked; BOS is still left out
    sink = {**ex, "valid": [False, False, True, True], "sink": [False, True, False, False]}
    assert "⟦a\\|b⟧⏎[[c]] (1.50)" in examples_markdown([{"id": 7, "density": 0.01, "examples": [sink]}])[2]


def test_example_contexts_mark_the_activation_sinks() -> None:
    """The dashboard's example windows say which tokens the activation-sink rule left out (``sink``)."""
    from mtsae.features.collect import FeaturesConfig, _examples

    x = torch.randn(1, 6, 8)
    x[0, 1] *= 1000.0  # the first token after BOS: a sink
    valid = torch.tensor([[False, True, True, True, True, True]])
    sae = MTSAE(8, 4, dilations=[1, 2], max_norm_multiple=10.0)
    read = lambda rows: {"acts": x, "valid": valid, "tokens": torch.arange(6)[None]}  # noqa: E731
    cfg = FeaturesConfig(context_before=4, context_after=0)
    (ex,) = _examples(sae, read, [(0, 0, 4, "top")], torch.tensor([0]), cfg, "cpu", None, None, False)
    assert ex["valid"] == [False, False, True, True, True] and ex["sink"] == [
        False,
        True,
        False,
        False,
        False,
    ]
    assert "⟦<1>⟧<2><3>[[<4>]]" in examples_markdown([{"id": 0, "density": 0.1, "examples": [ex]}])[2]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _quick_grid(tmp_path: Path, lm: Path) -> Path:
    """configs/compare/smollm2.yaml on the tiny LM: the same families, activations, metrics, min effects and
    callbacks; two knob values, one seed (8 runs of 8 steps: each run is mostly its process's start-up),
    tiny corpora and questions for the cloze evaluation."""
    raw = yaml.safe_load((REPO / GRID).read_text())
    bio = "The cell divides and the gene is copied into the protein of the blood and the plant."
    other = "The river runs past the town and the old mill where the road turns to the hill."
    text = lambda t: [{"text": f"{t} Number {i}."} for i in range(40)]  # noqa: E731
    questions = [
        ("What carries oxygen in the blood?", ["red cells", "the river", "a stone"], "biology"),
        ("Where does the river flow?", ["to the sea", "into the gene", "up"], "other"),
        ("Which one is a plant?", ["a fern", "a rock", "the moon"], "biology"),
        ("What turns at the mill?", ["the wheel", "the cell", "a gene"], "other"),
    ]
    qrows = [
        {"question": q, "choices": c, "answer": a, "topic": t} for q, c, t in questions for a in range(len(c))
    ]
    callbacks = raw["overrides"]["trainer.callbacks"]
    for cb in callbacks:
        conf = (cb.get("init_args") or {}).get("config")
        if cb["class_path"] == "callbacks.Unlearning":
            conf.update(
                question_file=_jsonl(tmp_path / "questions.jsonl", qrows),
                forget_corpus=_jsonl(tmp_path / "forget.jsonl", text(bio)),
                retain_corpus=_jsonl(tmp_path / "retain.jsonl", text(other)),
                forget_heldout=_jsonl(tmp_path / "forget_h.jsonl", text(bio + " Held")),
                retain_heldout=_jsonl(tmp_path / "retain_h.jsonl", text(other + " Held")),
                question_cache_dir=str(tmp_path / "questions"),
                seq_len=24, n_sparsity_rows=6, n_selectivity_rows=3, max_questions=None, max_kept=None,
                grid={"retain_thresholds": [1.0], "n_features": [4], "multipliers": [5.0, 50.0]},
            )  # fmt: skip
        elif cb["class_path"] == "callbacks.CoreLMMetrics":
            conf["n_sequences"] = 8
        elif cb["class_path"] == "callbacks.FeatureExamples":
            conf.update(n_sample=3, n_long=3, max_rows=32)
    raw["name"] = "smollm2_quick"
    raw["seeds"] = [0]
    raw["base"] = "configs/tiny_lm.yaml"
    raw["overrides"] = {
        "data.source.init_args.model_name": str(lm),
        "data.source.init_args.dataset": str(lm / "corpus.jsonl"),
        "data.source.init_args.progress": False,
        "data.progress": False,
        "data.num_workers": 0,
        "data.cache_dir": str(tmp_path / "cache"),
        "model.d_sae": 128,
        "trainer.max_steps": 8,
        "trainer.val_check_interval": 4,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "trainer.callbacks": callbacks,
    }
    raw["frontier"]["activations"]["topk"]["values"] = [{"k": 4}, {"k": 12}]
    path = tmp_path / "smollm2_quick.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_quick_smollm2_grid_on_the_tiny_lm(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    offline_hub(monkeypatch)
    monkeypatch.chdir(REPO)
    config = _quick_grid(tmp_path, tiny_lm_dir(tmp_path_factory))
    out = tmp_path / "reports"
    assert compare_cli.main(["--config", str(config), "--out", str(out), "--jobs", "2"]) == 0
    cfg = compare.load_compare_config(config)
    results = compare.collect_results(out, cfg)
    assert len(results) == len(cfg.runs) == 3 * 2 + 2
    root = out / "smollm2_quick"
    for r in results:
        assert all(math.isfinite(r.metrics[m]) for m in LM_METRICS), (r.name, r.metrics)
        assert "val/disentanglement/persistence/lag_1" in r.metrics
        assert (root / "runs" / r.name / "checkpoints" / "last.ckpt").exists()  # moved into the run folder
        assert (root / "runs" / r.name / EXAMPLES_FILE).exists()
    summary, report = (root / "summary.md").read_text(), (root / "report.md").read_text()
    for metric in LM_METRICS + (
        "val/disentanglement/persistence/lag_1",
        "val/unlearning/text_selectivity_max",
    ):
        assert f"**{metric.removeprefix('val/')}** at common L0" in summary, metric
    assert "**fvu** at each family's own L0" in summary and "**l0** at each family's own L0" in summary
    relu = [line for line in summary.splitlines() if line.startswith("- **relu**")]
    assert relu and all("mtsae vs token: no claim (n < 2) (at own L0:" in v for v in relu), relu
    assert "## Feature examples" in report
    context = report.split("## How much context the MTSAEs use")[1].split("## Feature examples")[0]
    rows = {line.split("`")[1] for line in context.splitlines() if line.startswith("| `")}
    assert rows == {r.name for r in results if r.spec.family == "mtsae"}, rows  # trained convolutions only
    section = report.split("## Feature examples")[1].split("## Commands")[0]
    for family in cfg.frontier.families:  # the middle k, first seed
        assert f"### `{family}` (run `topk-{family}-1-s0`)" in section
    assert "[[" in section and "long-branch share" in section and "dilation [4, 8] branches" in section
    assert (root / "timing.json").exists() and "wall time of the comparison" in report
