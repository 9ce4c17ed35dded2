"""``mtsae compare``: config validation, two tiny runs -> report + figures, skip/resume, --only-report."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

import compare

TINY = "configs/compare/tiny.yaml"
COMPARE_CONFIGS = sorted(str(p) for p in Path("configs/compare").glob("*.yaml"))


@pytest.mark.parametrize("path", COMPARE_CONFIGS)
def test_compare_configs_load(path: str) -> None:
    cfg = compare.load_compare_config(path)
    assert cfg.runs and len({r.name for r in cfg.runs}) == len(cfg.runs)


def test_demo_comparison_runs_compose(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Every run of the synthetic comparison parses, shares data/seed/budget, and is the model it claims."""
    from train import cli_main

    cfg = compare.load_compare_config("configs/compare/demo.yaml")
    shared = None
    for run in cfg.runs:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli_main([*compare.train_args(tmp_path, cfg, run), "--print_config"])
        assert e.value.code == 0, run.name
        printed = yaml.safe_load(capsys.readouterr().out)
        common = {k: printed[k] for k in ("data", "seed_everything")} | {
            "epochs": printed["trainer"]["max_epochs"]
        }
        shared = shared or common
        assert common == shared, run.name
        model = printed["model"]
        assert model["d_sae"] == 256
        if run.name == "mtsae_d1":
            assert (model["dilations"], model["separation"]) == ([1], "none")
        if run.name in ("relu", "topk", "batchtopk", "jumprelu"):
            assert model["dilations"] == [] and model["activation"] == run.name


def _write(tmp_path: Path, content: dict) -> str:
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_runs_may_change_only_the_model(tmp_path: Path) -> None:
    base = {"name": "x", "base": "configs/demo.yaml"}
    cfg = compare.load_compare_config(
        _write(tmp_path, {**base, "runs": [{"name": "a", "args": {"model.dilations": [1, 2]}}]})
    )
    assert cfg.runs[0].args == ["--model.dilations=[1, 2]"]
    with pytest.raises(ValueError, match="only model"):
        compare.load_compare_config(
            _write(tmp_path, {**base, "runs": [{"name": "a", "args": ["--trainer.max_epochs=9"]}]})
        )
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model: {d_sae: 8}\ndata: {batch_size: 2}\n")
    with pytest.raises(ValueError, match="only the model section"):
        compare.load_compare_config(
            _write(tmp_path, {**base, "runs": [{"name": "a", "configs": [str(overlay)]}]})
        )
    with pytest.raises(ValueError, match="duplicate"):
        compare.load_compare_config(_write(tmp_path, {**base, "runs": [{"name": "a"}, {"name": "a"}]}))


def test_dry_run_prints_fixed_run_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert compare.main(["--config", TINY, "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"--trainer.default_root_dir {tmp_path}/tiny/runs/topk" in out
    assert "--config configs/baselines/demo_topk.yaml" in out
    assert not (tmp_path / "tiny").exists()


def test_compare_tiny_report_skip_resume_only_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    argv = ["--config", TINY, "--out", str(tmp_path), "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    root = tmp_path / "tiny"
    caplog.set_level(logging.INFO, logger="mtsae.compare")
    assert compare.main(argv) == 0
    report = (root / "report.md").read_text()
    for png in ("frontier.png", "recovery.png"):
        assert (root / png).stat().st_size > 1000 and f"]({png})" in report
    for text in (
        "| mtsae |",
        "| topk |",
        "FVU",
        "rec slow",
        "torch",
        "cpu_count",
        f"mtsae compare {argv[0]}",
    ):
        assert text in report, text
    summaries = {r: root / "runs" / r / "summary.json" for r in ("mtsae", "topk")}
    topk = yaml.safe_load(summaries["topk"].read_text())
    assert topk["final_val_metrics"]["val/l0"] <= 10.0 + 1e-6  # k = 10
    assert topk["global_step"] > 0
    mtime = summaries["mtsae"].stat().st_mtime_ns

    # interrupted after its last checkpoint: topk resumes from it, the finished mtsae is skipped
    summaries["topk"].unlink()
    caplog.clear()
    assert compare.main(argv) == 0
    assert "run mtsae: finished, skipped" in caplog.text and "run topk: resuming" in caplog.text
    assert "--ckpt_path" in caplog.text
    assert summaries["mtsae"].stat().st_mtime_ns == mtime
    resumed = yaml.safe_load(summaries["topk"].read_text())
    assert resumed["final_val_metrics"]["val/fvu"] == pytest.approx(topk["final_val_metrics"]["val/fvu"])

    # --only-report trains nothing and rebuilds the report and figures
    for f in ("report.md", "frontier.png", "recovery.png"):
        (root / f).unlink()
    mtimes = {r: p.stat().st_mtime_ns for r, p in summaries.items()}
    caplog.clear()
    assert compare.main([*argv, "--only-report"]) == 0
    assert (
        (root / "report.md").exists()
        and (root / "frontier.png").exists()
        and (root / "recovery.png").exists()
    )
    assert {r: p.stat().st_mtime_ns for r, p in summaries.items()} == mtimes
    assert "training" not in caplog.text

    # a finished run whose specification changed is an error, not silently reused
    with pytest.raises(ValueError, match="different specification"):
        compare.main([*argv, "--set", "trainer.max_epochs=2"])


def test_pinned_checkpoint_folder_moves_into_the_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """gemma_l19.yaml pins ModelCheckpoint(dirpath=runs/gemma_l19/checkpoints): each run gets its own."""
    from train import cli_main

    cfg = compare.load_compare_config("configs/compare/gemma.yaml")
    run = cfg.runs[2]
    args = compare.train_args(tmp_path, cfg, run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main([*args, "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    base = yaml.safe_load(Path(cfg.base).read_text())
    callbacks = printed["trainer"]["callbacks"]
    assert len(callbacks) == len(base["trainer"]["callbacks"])
    rd = compare.run_dir(tmp_path, cfg, run)
    dirs = {
        cb["init_args"].get("dirpath") for cb in callbacks if cb["class_path"].endswith("ModelCheckpoint")
    }
    assert dirs == {str(rd / "checkpoints")}
    logger = printed["trainer"]["logger"]["init_args"]
    assert (logger["save_dir"], logger["name"], logger["version"]) == (str(rd.parent), run.name, "")
    assert printed["model"]["activation"] == "topk" and printed["model"]["d_sae"] == base["model"]["d_sae"]
