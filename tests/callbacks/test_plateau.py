"""callbacks.PlateauStopping: stop when every watched metric has plateaued, resumable, in a real run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.plateau import Monitor, PlateauStopping
from tests.helpers.train import tiny_args
from train import cli_main


class _Strategy:
    @staticmethod
    def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:  # noqa: A002 (Lightning's name)
        return decision


def _trainer(step: int, **metrics: float) -> SimpleNamespace:
    return SimpleNamespace(
        sanity_checking=False,
        global_step=step,
        should_stop=False,
        strategy=_Strategy(),
        callback_metrics={k.replace("__", "/"): torch.tensor(v) for k, v in metrics.items()},
    )


def _feed(cb: PlateauStopping, values: list[tuple[float, float]], start: int = 100) -> list[bool]:
    """Feed (loss, recovered) pairs at validations every 100 steps; which validations stopped training."""
    stops = []
    for i, (loss, rec) in enumerate(values):
        tr = _trainer(start + 100 * i, val__loss=loss, val__recovered__slow=rec)
        cb.on_validation_end(tr, None)
        stops.append(tr.should_stop)
    return stops


def _cb(**kw) -> PlateauStopping:
    monitors = {
        "val/loss": {"mode": "min", "min_delta": 0.01, "relative": True},
        "val/recovered/slow": {"mode": "max", "min_delta": 0.02},
    }
    return PlateauStopping(monitors, **({"patience": 2} | kw))


def test_monitor_improvement_is_beyond_the_tolerance() -> None:
    m = Monitor("min", 0.1, relative=True)
    assert m.update(10.0) and m.best == 10.0
    assert not m.update(9.5) and m.wait == 1  # 5 % < 10 % of the best
    assert m.update(8.9) and (m.best, m.wait) == (8.9, 0)
    assert not m.update(float("nan")) and m.wait == 1
    up = Monitor("max", 0.02)
    up.update(0.5)
    assert not up.update(0.515) and up.update(0.53)


def test_stops_only_when_every_metric_has_plateaued() -> None:
    # the loss flattens at the 3rd validation, the recovery keeps rising until the 6th
    values = [(10.0, 0.0), (9.0, 0.1), (8.99, 0.2), (8.98, 0.3), (8.98, 0.4), (8.98, 0.5), (8.98, 0.5),
              (8.98, 0.51), (8.98, 0.5)]  # fmt: skip
    stops = _feed(_cb(), values)
    assert stops.index(True) == 7  # 2 validations after the last improvement of *any* metric
    # a single-metric rule on the loss would have stopped at the 4th validation
    loss_only = PlateauStopping(
        {"val/loss": {"mode": "min", "min_delta": 0.01, "relative": True}}, patience=2
    )
    assert _feed(loss_only, [(v[0], 0.0) for v in values]).index(True) == 3


def test_min_steps_and_already_stopped() -> None:
    flat = [(1.0, 0.5)] * 8
    cb = _cb(min_steps=600)
    stops = _feed(cb, flat)
    assert stops.index(True) == 5 and cb.stopped_step == 600  # patience met at step 300, held until 600
    assert cb.summary()["plateaued"] and cb.summary()["stopped_step"] == 600
    assert sum(stops) == 1  # once stopped it does not decide again


def test_state_round_trips_through_a_checkpoint() -> None:
    values = [(10.0, 0.0), (9.0, 0.1), (8.99, 0.1), (8.99, 0.1), (8.99, 0.1)]
    whole = _feed(_cb(), values)
    first = _cb()
    _feed(first, values[:3])
    resumed = _cb()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # what a checkpoint keeps
    assert _feed(resumed, values[3:], start=400) == whole[3:]


def test_a_missing_metric_names_what_was_logged() -> None:
    cb = _cb()
    with pytest.raises(ValueError, match=r"val/recovered/slow.*logged: \['val/loss'\]"):
        cb.on_validation_end(_trainer(100, val__loss=1.0), None)


@pytest.mark.parametrize(
    ("monitors", "patience", "match"),
    [
        ({}, 2, "at least one metric"),
        ({"val/loss": {"mode": "down"}}, 2, "val/loss.*mode must be"),
        ({"val/loss": {"min_delta": -1}}, 2, "min_delta must be >= 0"),
        ({"val/loss": {"delta": 0.1}}, 2, r"unknown keys \['delta'\]"),
        ({"val/loss": {}}, 0, "patience must be >= 1"),
    ],
)
def test_bad_settings_are_refused(monitors: dict, patience: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PlateauStopping(monitors, patience=patience)


def test_a_training_run_stops_on_plateau_and_says_so(tmp_path: Path) -> None:
    """A real run: the loss of a tiny SAE stops improving by 50 % per validation, so it stops early, and
    summary.json records how the run ended."""
    stop = {
        "class_path": "callbacks.PlateauStopping",
        "init_args": {"patience": 2, "monitors": {"val/loss": {"min_delta": 0.5, "relative": True}}},
    }
    args = tiny_args(tmp_path, "--trainer.max_steps", "400", "--trainer.val_check_interval", "8",
                     "--trainer.check_val_every_n_epoch", "null", f"--trainer.callbacks+={json.dumps(stop)}")  # fmt: skip
    cli = cli_main(["fit", *args])
    step = cli.trainer.global_step
    assert step < 400 and step % 8 == 0
    summary = json.loads((Path(cli.trainer.log_dir) / "summary.json").read_text())
    assert summary["stopping"]["plateaued"] and summary["stopping"]["stopped_step"] == step
    assert summary["max_steps"] == 400 and summary["global_step"] == step
