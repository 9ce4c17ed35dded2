"""A finished run's unlearning record fills in the unlearning metrics its summary lacks."""

from __future__ import annotations

import json
from pathlib import Path

from mtsae import compare
from mtsae.compare.runner import run_dir

GRID = "configs/compare/smollm2.yaml"
REPO = Path(__file__).resolve().parents[2]


def _record(step: int, selectivities: list[float | None], score: float) -> dict:
    configs = [
        {"features": [1, 2], "text_selectivity": s}
        if s is not None
        else {"features": [], "text_selectivity": 0.0}
        for s in selectivities
    ]
    return {
        "unlearning_score": score,
        "wmdp_acc_best": 1.0 - score,
        "mmlu_acc_best": 1.0,
        "text_selectivity_best": None,  # no grid point kept the retain questions
        "configs": configs,  # no text_selectivity_max: a record written before it existed
        "global_step": step,
    }


def test_metrics_read_from_the_unlearning_record(tmp_path: Path) -> None:
    cfg = compare.load_compare_config(REPO / GRID)
    run = cfg.runs[0]
    rd = run_dir(tmp_path, cfg, run)
    (rd / "unlearning").mkdir(parents=True)
    logged = {"val/fvu": 0.3, "val/l0": 16.0, "val/unlearning_score": 0.0}
    (rd / "summary.json").write_text(json.dumps({"final_val_metrics": logged, "global_step": 384}))
    # an earlier evaluation and the one at the run's last step: the last one counts
    (rd / "unlearning" / "step128.json").write_text(json.dumps(_record(128, [0.2, 0.1], 0.5)))
    (rd / "unlearning" / "step384.json").write_text(json.dumps(_record(384, [0.4, None, 1.1], 0.25)))
    (result,) = compare.collect_results(tmp_path, cfg, runs=[run])
    m = result.metrics
    assert m["val/unlearning/text_selectivity_max"] == 1.1  # derived from step384.json's grid points
    assert m["val/unlearning/wmdp_acc_best"] == 0.75
    assert m["val/unlearning_score"] == 0.0  # what the run logged takes precedence
    assert "val/unlearning/text_selectivity_best" not in m  # None: not a metric
    assert m["val/fvu"] == 0.3


def test_a_run_without_an_unlearning_record_keeps_its_metrics(tmp_path: Path) -> None:
    cfg = compare.load_compare_config(REPO / GRID)
    run = cfg.runs[0]
    rd = run_dir(tmp_path, cfg, run)
    rd.mkdir(parents=True)
    (rd / "summary.json").write_text(json.dumps({"final_val_metrics": {"val/fvu": 0.3}, "global_step": 8}))
    (result,) = compare.collect_results(tmp_path, cfg, runs=[run])
    assert result.metrics == {"val/fvu": 0.3}


def test_an_earlier_record_never_stands_in_for_the_last_steps(tmp_path: Path) -> None:
    cfg = compare.load_compare_config(REPO / GRID)
    run = cfg.runs[0]
    rd = run_dir(tmp_path, cfg, run)
    (rd / "unlearning").mkdir(parents=True)
    (rd / "unlearning" / "step128.json").write_text(json.dumps(_record(128, [0.2], 0.5)))
    summary = {"final_val_metrics": {"val/fvu": 0.3}, "global_step": 384}
    (rd / "summary.json").write_text(json.dumps(summary))
    (result,) = compare.collect_results(tmp_path, cfg, runs=[run])
    assert result.metrics == {"val/fvu": 0.3}  # the end-of-run evaluation is missing: nothing filled in
    # with no step known, the highest-numbered record counts
    (rd / "unlearning" / "step1000.json").write_text(json.dumps(_record(1000, [0.7, 0.9], 0.1)))
    (rd / "unlearning" / "step256.json").write_text(json.dumps(_record(256, [0.3], 0.2)))
    (rd / "summary.json").write_text(json.dumps({**summary, "global_step": None}))
    (result,) = compare.collect_results(tmp_path, cfg, runs=[run])
    assert result.metrics["val/unlearning/text_selectivity_max"] == 0.9


def test_the_maximum_counts_only_grid_points_that_clamp_features() -> None:
    from mtsae.evals.unlearning.report import max_text_selectivity

    # a point with no eligible feature changes nothing (selectivity 0); it is not the SAE's best
    configs = [{"features": [], "text_selectivity": 0.0}, {"features": [3], "text_selectivity": -0.3}]
    assert max_text_selectivity(configs) == -0.3
    assert max_text_selectivity([{"features": [], "text_selectivity": 0.0}]) is None
