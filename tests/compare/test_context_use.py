"""The report's context-use table: tap magnitudes from each run's exported SAE, context share from its
examples."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from mtsae import compare
from mtsae.compare.examples_report import context_use_section, tap_magnitudes
from mtsae.compare.runner import run_dir
from mtsae.features.examples import EXAMPLES_FILE
from mtsae.sae.export import save_sae
from mtsae.sae.model import MTSAE

REPO = Path(__file__).resolve().parents[2]
GRID = REPO / "configs/compare/smollm2.yaml"


def _fake_run(
    out: Path,
    cfg,
    name: str,
    freeze: bool,
    taps: list[float] | None,
    shares: list[float],
    dilations: list[int] | None = None,
) -> None:
    run = next(r for r in cfg.runs if r.name == name)
    rd = run_dir(out, cfg, run)
    rd.mkdir(parents=True)
    (rd / "summary.json").write_text(json.dumps({"final_val_metrics": {"val/fvu": 0.3}, "global_step": 8}))
    dilations = [] if taps is None else dilations or [1, 2]
    model = {"dilations": dilations, "freeze_conv": freeze, "context_init_std": 0.01}
    (rd / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    sae = MTSAE(6, 8, dilations=dilations, activation="topk", activation_kwargs={"k": 2})
    if taps is not None:
        with torch.no_grad():
            sae.conv_weight.copy_(torch.tensor(taps).expand_as(sae.conv_weight))
            sae.conv_weight[:, ::2] *= -1  # magnitudes, not signed means
    save_sae(sae, rd / "sae")
    sample = [{"id": i, "context_share": s, "ablated_ratio": 1.0 - s} for i, s in enumerate(shares)]
    (rd / EXAMPLES_FILE).write_text(json.dumps({"meta": {}, "sample": sample, "long": []}))


def test_tap_magnitudes_are_mean_absolute_values_per_branch_and_tap() -> None:
    w = torch.tensor([[[0.1, -0.3, 1.0], [-0.3, 0.1, -0.5]], [[0.0, 0.2, 0.8], [0.0, -0.2, 0.8]]])
    got = tap_magnitudes(w)
    assert [[round(x, 6) for x in b] for b in got] == [[0.2, 0.2, 0.75], [0.0, 0.2, 0.8]]


def test_context_use_rows_for_trained_convolutions_only(tmp_path: Path) -> None:
    cfg = compare.load_compare_config(GRID)
    _fake_run(tmp_path, cfg, "topk-mtsae-0-s0", False, [0.02, 0.05, 0.9], [0.1, 0.3])
    _fake_run(tmp_path, cfg, "topk-mtsae_frozen_conv-0-s0", True, [0.0, 0.0, 1.0], [0.0])
    _fake_run(tmp_path, cfg, "topk-token-0-s0", False, None, [])
    results = compare.collect_results(tmp_path, cfg)
    assert len(results) == 3
    lines = context_use_section(tmp_path, cfg, results)
    assert lines[0] == "## How much context the MTSAEs use"
    rows = [line for line in lines if line.startswith("| `")]
    row = "| `topk-mtsae-0-s0` | 0.008 | 0.020 / 0.050 / 0.900 | 0.020 / 0.050 / 0.900 | 0.200 | 80% |"
    assert rows == [row]
    assert "r = 2: −4 / −2 / 0" in lines[lines.index(rows[0]) - 2]
    # no MTSAE with trained convolutions: no section
    assert context_use_section(tmp_path, cfg, [r for r in results if "frozen" in r.name]) == []
    # a run without feature examples (a grid without callbacks.FeatureExamples) has no row
    (run_dir(tmp_path, cfg, results[1].spec) / EXAMPLES_FILE).unlink()
    assert context_use_section(tmp_path, cfg, results) == []


def test_one_table_per_set_of_dilations(tmp_path: Path) -> None:
    cfg = compare.load_compare_config(GRID)
    _fake_run(tmp_path, cfg, "topk-mtsae-0-s0", False, [0.02, 0.05, 0.9], [0.1])
    _fake_run(tmp_path, cfg, "topk-mtsae-1-s0", False, [0.01, 0.03, 0.8], [0.2], dilations=[4])
    lines = context_use_section(tmp_path, cfg, compare.collect_results(tmp_path, cfg))
    heads = [line for line in lines if line.startswith("| run |")]
    assert len(heads) == 2 and "r = 4: −8 / −4 / 0" in heads[1] and "r = 4" not in heads[0]
    assert sum(line.startswith("| `") for line in lines) == 2
