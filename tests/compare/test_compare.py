"""``mtsae compare``: config validation, runs as processes -> report + figures, skip/resume, --only-report,
the frontier grid (``configs/compare/quick.yaml``) end to end, and the frontier statistics."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import yaml

import mtsae.compare as compare
import mtsae_app.compare as compare_cli
from mtsae.compare import frontier
from mtsae.compare.config import frontier_runs

TINY = "configs/compare/tiny.yaml"
TINY_BASE = "configs/demo.yaml"
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
    assert compare_cli.main(["--config", TINY, "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"--trainer.default_root_dir {tmp_path}/tiny/runs/topk" in out
    assert "--config configs/baselines/demo_topk.yaml" in out
    assert not (tmp_path / "tiny").exists()


def test_compare_tiny_report_skip_resume_only_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    argv = ["--config", TINY, "--out", str(tmp_path), "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    root = tmp_path / "tiny"
    caplog.set_level(logging.INFO, logger="mtsae.compare")
    # a timing.json left from an earlier grid (no run of this one finished) is not added to this grid's time
    root.mkdir()
    (root / "timing.json").write_text('{"wall_s": 1e6, "jobs": 2, "started": "old", "invocations": 5}')
    assert compare_cli.main(argv) == 0
    timing = json.loads((root / "timing.json").read_text())
    assert timing["invocations"] == 1 and timing["wall_s"] < 1e6 and timing["started"] != "old"
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
    assert compare_cli.main(argv) == 0
    assert "run mtsae: finished, skipped" in caplog.text and "run topk: resuming" in caplog.text
    assert "--ckpt_path" in caplog.text
    assert summaries["mtsae"].stat().st_mtime_ns == mtime
    # a run resumed at its very end has no final metrics of its own: the report reads its curves' last values
    cfg = compare.load_compare_config(TINY)
    resumed = {r.name: r for r in compare.collect_results(tmp_path, cfg, argv[-1:])}["topk"]
    assert resumed.metrics["val/fvu"] == pytest.approx(topk["final_val_metrics"]["val/fvu"])
    assert resumed.curves["val/fvu"][-1][0] == topk["global_step"] - 1

    # --only-report trains nothing and rebuilds the report and figures
    for f in ("report.md", "frontier.png", "recovery.png"):
        (root / f).unlink()
    mtimes = {r: p.stat().st_mtime_ns for r, p in summaries.items()}
    caplog.clear()
    assert compare_cli.main([*argv, "--only-report"]) == 0
    assert (
        (root / "report.md").exists()
        and (root / "frontier.png").exists()
        and (root / "recovery.png").exists()
    )
    assert {r: p.stat().st_mtime_ns for r, p in summaries.items()} == mtimes
    assert "training" not in caplog.text

    # a finished run whose specification changed is an error (one line, exit 2), not silently reused
    capsys.readouterr()
    assert compare_cli.main([*argv, "--set", "trainer.max_epochs=2"]) == 2
    assert "different specification" in capsys.readouterr().err


def test_a_bad_compare_config_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert compare_cli.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no compare config" in err and "Traceback" not in err


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


def test_frontier_grid_expands_to_one_run_per_family_point_and_seed(tmp_path: Path) -> None:
    cfg = compare.load_compare_config("configs/compare/temporal.yaml")
    fr = cfg.frontier
    n_points = sum(len(a.values) for a in fr.activations)
    assert len(cfg.runs) == len(fr.families) * n_points * len(cfg.seeds) == 3 * 6 * 3
    run = next(r for r in cfg.runs if r.name == "topk-mtsae-2-s1")
    assert (run.family, run.activation, run.point, run.seed) == ("mtsae", "topk", 2, 1)
    assert run.args == [
        "--model.separation=scales",
        "--model.activation=topk",
        '--model.activation_kwargs={"k": 8}',
        "--seed_everything=1",
    ]
    assert ("mtsae", "token") in fr.contrasts and fr.n_l0 == 3
    # the default contrasts: every family against the first
    assert frontier_runs(fr, [0])[0].name == "relu-token-0-s0"
    base = {"name": "x", "base": "configs/synthetic/temporal.yaml"}
    fam = {"a": {"model.dilations": []}, "b": {}}
    act = {"relu": {"knob": "model.sparsity_coeff", "values": [1, 2]}}
    cfg = compare.load_compare_config(
        _write(tmp_path, {**base, "frontier": {"families": fam, "activations": act}})
    )
    assert cfg.frontier.contrasts == [("b", "a")] and cfg.seeds == [0]
    bad = [
        ({"families": fam, "activations": {"relu": {"knob": "data.batch_size", "values": [1, 2]}}}, "model"),
        ({"families": fam, "activations": {"relu": {"knob": "model.sparsity_coeff", "values": []}}}, "list"),
        ({"families": {"a-b": {}}, "activations": act}, "family name"),
        ({"families": {"a": {"trainer.max_steps": 3}}, "activations": act}, "only model"),
        ({"families": fam, "activations": act, "contrasts": [["a", "c"]]}, "pair of family names"),
    ]
    for frontier_cfg, match in bad:
        with pytest.raises(ValueError, match=match):
            compare.load_compare_config(_write(tmp_path, {**base, "frontier": frontier_cfg}))
    with pytest.raises(ValueError, match="seeds"):
        compare.load_compare_config(
            _write(tmp_path, {**base, "seeds": [1, 1], "frontier": {"families": fam, "activations": act}})
        )


def test_interpolation_stays_inside_the_covered_range() -> None:
    assert frontier.interpolate([2.0, 4.0, 8.0], [1.0, 3.0, 0.0], 3.0) == pytest.approx(2.0)
    assert frontier.interpolate([8.0, 2.0, 4.0], [0.0, 1.0, 3.0], 6.0) == pytest.approx(1.5)  # unsorted
    assert frontier.interpolate([2.0, 2.0, 4.0], [1.0, 3.0, 4.0], 3.0) == pytest.approx(3.0)  # ties averaged
    assert math.isnan(frontier.interpolate([2.0, 4.0], [1.0, 3.0], 4.5))
    assert math.isnan(frontier.interpolate([2.0, 4.0], [1.0, 3.0], 1.9))
    assert frontier.common_l0_range([[1, 5], [2, 9], [0, 4]]) == (2, 4)
    assert frontier.common_l0_range([[1, 2], [3, 4]]) is None


def test_claims_follow_non_overlapping_intervals() -> None:
    a, b = frontier.summarise([0.2, 0.22, 0.24]), frontier.summarise([0.3, 0.31, 0.32])
    assert (a.mean, a.n) == (pytest.approx(0.22), 3) and a.std == pytest.approx(0.02)
    assert frontier.compare_stats(a, b, "min") == "better"  # e.g. a lower FVU
    assert frontier.compare_stats(a, b, "max") == "worse"
    close = frontier.summarise([0.27, 0.33])
    assert frontier.compare_stats(close, b, "min") == "no difference"
    assert frontier.compare_stats(frontier.summarise([0.1]), b, "min") == "no claim (n < 2)"
    assert (
        frontier.better_direction("val/fvu") == "min" and frontier.better_direction("val/recovered") == "max"
    )


def test_a_difference_below_the_min_effect_is_negligible() -> None:
    a, b = frontier.summarise([0.200, 0.201, 0.202]), frontier.summarise([0.204, 0.205, 0.206])
    assert frontier.compare_stats(a, b, "min") == "better"  # apart, by 0.004
    assert frontier.compare_stats(a, b, "min", min_effect=0.005) == "negligible"
    assert frontier.compare_stats(a, b, "min", min_effect=0.004) == "better"
    far = frontier.summarise([0.30, 0.31, 0.32])
    assert frontier.compare_stats(a, far, "min", min_effect=0.005) == "better"
    assert frontier.min_effect_of("val/fvu") == 0.005
    assert (
        frontier.min_effect_of("val/recovered/slow")
        == frontier.min_effect_of("val/recovered/any_group")
        == 0.05
    )
    assert frontier.min_effect_of("val/recovered/a/b") == 0.0  # {group} is one path segment
    assert frontier.min_effect_of("val/l0") == 0.0
    assert frontier.min_effect_of("val/mmcs/slow", {"val/mmcs/slow": 0.2}) == 0.2


def test_min_effect_in_the_compare_config(tmp_path: Path) -> None:
    base = {"name": "x", "base": TINY_BASE}
    grid = {"families": {"a": {}, "b": {"model.d_sae": 32}},
            "activations": {"relu": {"knob": "model.sparsity_coeff", "values": [1, 2]}}}  # fmt: skip
    cfg = compare.load_compare_config(
        _write(tmp_path, {**base, "frontier": {**grid, "min_effect": {"val/fvu": 0.02}}})
    )
    assert cfg.frontier.min_effect["val/fvu"] == 0.02  # the config's value on top of the defaults
    assert cfg.frontier.min_effect["val/mmcs/{group}"] == frontier.DEFAULT_MIN_EFFECT["val/mmcs/{group}"]
    with pytest.raises(ValueError, match="min_effect must map"):
        compare.load_compare_config(_write(tmp_path, {**base, "frontier": {**grid, "min_effect": {"x": -1}}}))


def test_late_change_and_how_runs_ended() -> None:
    from mtsae.compare import convergence as conv

    flat = [(s, 0.9 + 0.001 * (s % 2)) for s in range(100, 4100, 100)]
    rising = [(s, s / 4000) for s in range(100, 4100, 100)]
    assert abs(conv.late_change(flat)) < 0.002
    # last 3 validations (3800-4000) vs the 3 nearest step 3000: 0.975 - 0.75
    assert conv.late_change(rising) == pytest.approx(0.225)
    assert math.isnan(conv.late_change(rising[:5]))
    assert conv.run_end(900, 1000, {"plateaued": True, "stopped_step": 900}).kind == "plateau"
    assert conv.run_end(1000, 1000, {"plateaued": False}).capped
    assert conv.run_end(700, 1000, None).kind == "early"
    assert conv.run_end(700, None, None).kind == "unknown"
    # a run's end value: the mean of its last 3 validations (a jittering recovery), else its final value
    jitter = {"val/recovered/slow": [(100, 0.0), (200, 0.5), (300, 0.25), (400, 0.5), (500, 0.75)]}
    ends = conv.end_values({"val/recovered/slow": 0.75, "val/l0": 3.0}, jitter)
    assert ends == {"val/recovered/slow": pytest.approx(0.5), "val/l0": 3.0}
    # a metric evaluated on every 2nd of 6 validations: the step-128 value is not an end value
    sparse = {"val/ce_loss_score": [(128, 0.80), (256, 0.90), (384, 0.92)]}
    assert conv.end_values({"val/ce_loss_score": 0.92}, sparse) == {"val/ce_loss_score": pytest.approx(0.91)}


def test_verdicts_say_when_runs_behind_them_had_not_settled() -> None:
    from mtsae.compare import convergence as conv
    from mtsae.compare.config import RunSpec
    from mtsae.compare.results import RunResult

    def run(name: str, family: str, curve: list, step: int) -> RunResult:
        spec = RunSpec(name, family=family, activation="topk", point=0, seed=0)
        return RunResult(name, spec, {}, {}, step, None, "", {"val/recovered/slow": curve}, 100, 4000)

    flat = [(s, 0.9) for s in range(100, 4100, 100)]
    rising = [(s, s / 4000) for s in range(100, 4100, 100)]
    results = [
        run("a0", "token", flat, 2000),
        run("b0", "mtsae", rising, 4000),
        run("b1", "mtsae", flat, 3000),
    ]
    found = conv.assess(results, "topk", ["val/recovered/slow"], frontier.min_effect_of)
    assert found["token"].unsettled["val/recovered/slow"] == []
    assert found["mtsae"].unsettled["val/recovered/slow"] == ["b0"]
    assert found["mtsae"].ends == {"cap": 1, "early": 1}
    note = conv.unsettled_note(found, "val/recovered/slow", ("mtsae", "token"))
    assert "not settled" in note and "mtsae 1/2" in note and "token" not in note
    table = "\n".join(conv.convergence_table(found, ["val/recovered/slow"]))
    assert "| mtsae | 2 | 0 | 1 | 1 | 1/2 |" in table and "| token | 1 | 0 | 1 | 0 | 1/1 |" in table
    # a metric evaluated too few times to tell (once, at the end) is neither settled nor unsettled
    once = [run("c0", "token", [(4000, 0.5)], 4000), run("c1", "token", flat, 4000)]
    found = conv.assess(once + results[1:2], "topk", ["val/recovered/slow"], frontier.min_effect_of)
    assert found["token"].untested["val/recovered/slow"] == ["c0"]
    assert found["token"].unsettled["val/recovered/slow"] == []
    table = "\n".join(conv.convergence_table(found, ["val/recovered/slow"]))
    assert "| token | 2 | 0 | 0 | 2 | 1/1 (1 n/a) |" in table and "| mtsae | 1 | 0 | 0 | 1 | 0/1 |" in table
    only_once = conv.assess(once[:1], "topk", ["val/recovered/slow"], frontier.min_effect_of)
    assert "| token | 1 | 0 | 0 | 1 | n/a |" in "\n".join(
        conv.convergence_table(only_once, ["val/recovered/slow"])
    )


def _points(family: str, offset: float, seeds: range, l0s: list[float]) -> list[frontier.Point]:
    """A frontier whose FVU falls linearly with L0, shifted by ``offset`` (+ a small per-seed jitter)."""
    return [
        frontier.Point(family, "topk", s, l0, {"val/fvu": 1.0 - 0.05 * l0 + offset + 0.001 * s})
        for s in seeds
        for l0 in l0s
    ]


def test_frontier_analysis_interpolates_at_common_l0_and_writes_verdicts() -> None:
    pts = _points("token", 0.1, range(3), [2, 4, 8]) + _points("mtsae", 0.0, range(3), [3, 6, 10])
    pts += _points("same", 0.0, range(3), [3, 6, 10])
    fa = frontier.frontier_analysis(
        pts,
        "topk",
        ["token", "mtsae", "same"],
        ["val/fvu", "val/absent"],
        [("mtsae", "token"), ("same", "mtsae")],
    )
    assert fa.l0_range == (3, 8) and fa.l0_values == [3.0, 5.5, 8.0]
    assert fa.ranges == {"token": (2, 8), "mtsae": (3, 10), "same": (3, 10)}
    assert list(fa.table) == ["val/fvu"]  # a metric no run logged is left out
    token_at = fa.table["val/fvu"]["token"]
    assert [s.mean for s in token_at] == pytest.approx([1.0 - 0.05 * x + 0.1 + 0.001 for x in fa.l0_values])
    assert all(s.n == 3 for s in token_at)
    outcomes = {(v.a, v.b): {w.outcome for w in fa.verdicts if (w.a, w.b) == (v.a, v.b)} for v in fa.verdicts}
    assert outcomes == {("mtsae", "token"): {"better"}, ("same", "mtsae"): {"no difference"}}
    text = "\n".join(compare.frontier_report.verdict_lines(fa))
    assert "mtsae is **better** than token" in text and "**no difference** between same and mtsae" in text
    # frontiers that share no L0 range are not compared, and the report says so
    apart = _points("token", 0.0, range(2), [1, 2]) + _points("mtsae", 0.0, range(2), [5, 6])
    fa = frontier.frontier_analysis(apart, "topk", ["token", "mtsae"], ["val/fvu"], [("mtsae", "token")])
    assert fa.l0_range is None and not fa.verdicts
    assert "share no L0 range" in compare.frontier_report.verdict_lines(fa)[0]


def test_quick_frontier_comparison_end_to_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """configs/compare/quick.yaml with two processes at once: 16 runs, frontiers, verdicts, curves; a second
    call trains nothing."""
    argv = ["--config", "configs/compare/quick.yaml", "--out", str(tmp_path), "--jobs", "2",
            "--set", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    caplog.set_level(logging.INFO, logger="mtsae.compare")
    assert compare_cli.main(argv) == 0
    root = tmp_path / "quick"
    cfg = compare.load_compare_config("configs/compare/quick.yaml")
    results = compare.collect_results(tmp_path, cfg, argv[-1:])
    assert len(results) == len(cfg.runs) == 16
    for r in results:
        assert 0 < r.global_step <= 40 and r.curves["val/fvu"] and r.tokens_per_step == 16 * 15
        assert (root / "runs" / r.name / "train.log").exists()
    topk = [r for r in results if r.spec.activation == "topk"]
    assert {r.metrics["val/l0"] <= 6 + 1e-6 for r in topk} == {True}
    report, summary = (root / "report.md").read_text(), (root / "summary.md").read_text()
    for name in ("frontier_relu.png", "frontier_topk.png", "curves_relu.png", "curves_topk.png"):
        assert (root / name).stat().st_size > 1000 and f"]({name})" in report
    assert "### Verdicts" in report and "wall time of the comparison" in report and "--jobs 2" in report
    verdicts = [line for line in summary.splitlines() if line.startswith("- **")]
    # one line per activation x contrast (mtsae vs token) x metric (fvu, recovered and mmcs per group, unlearning)
    assert len(verdicts) == 2 * 1 * 6, verdicts
    assert all(("better" in v or "worse" in v or "no difference" in v) for v in verdicts)
    assert "| token |" in summary and "| mtsae |" in summary
    # with --jobs 2 one process built the shared cache first and left nothing else behind
    assert "building the shared activation cache" in caplog.text and not (root / ".cache_build").exists()
    assert len(list((tmp_path / "cache").iterdir())) == 1
    caplog.clear()
    assert compare_cli.main(argv) == 0
    assert caplog.text.count("finished, skipped") == 16 and "training" not in caplog.text


def test_a_failed_run_does_not_stop_the_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(
        tmp_path, {"name": "x", "base": TINY_BASE, "runs": [{"name": "bad", "args": {"model.d_sae": -1}}]}
    )
    caplog.set_level(logging.INFO, logger="mtsae.compare")
    assert compare_cli.main(["--config", path, "--out", str(tmp_path)]) == 1
    assert (
        "run 'bad' failed" in caplog.text
        and str(tmp_path / "x" / "runs" / "bad" / "train.log") in caplog.text
    )


@pytest.mark.parametrize("preset", sorted(str(p) for p in Path("configs/synthetic").glob("*.yaml")))
def test_synthetic_presets_parse_and_stop_early(preset: str, capsys: pytest.CaptureFixture) -> None:
    from train import cli_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", preset, "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    stops = [cb for cb in printed["trainer"]["callbacks"] if cb["class_path"].endswith("PlateauStopping")]
    assert len(stops) == 1 and printed["trainer"]["max_steps"] > 0
    groups = {g["name"] for g in printed["data"]["source"]["init_args"]["groups"]}
    # the stopping rule watches the loss and the recovery of every planted group
    watched = set(stops[0]["init_args"]["monitors"])
    assert "val/loss" in watched and {f"val/mmcs/{g}" for g in groups} <= watched
    forget = next(
        cb for cb in printed["trainer"]["callbacks"] if cb["class_path"].endswith("SyntheticUnlearning")
    )
    assert forget["init_args"]["group"] in groups
    assert groups == ({"local", "slow"} if preset.endswith("temporal.yaml") else {"local", "rare"})


def test_timing_sums_resumed_invocations_and_restarts_for_a_new_grid(tmp_path: Path) -> None:
    from mtsae_app.compare import TIMING_FILE, _record_timing

    _record_timing(tmp_path, 60.0, 2, "t0", resumed=False)
    t = _record_timing(tmp_path, 30.0, 2, "t1", resumed=True)  # a resumed comparison adds its time
    assert (t["wall_s"], t["invocations"], t["started"]) == (90.0, 2, "t0")
    # an old record (e.g. committed with an earlier grid) is not counted when nothing had finished
    t = _record_timing(tmp_path, 10.0, 2, "t2", resumed=False)
    assert (t["wall_s"], t["invocations"], t["started"]) == (10.0, 1, "t2")
    assert (tmp_path / TIMING_FILE).exists()
