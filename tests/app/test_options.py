"""Settings written once: the unlearning options of ``mtsae eval`` come from the dataclass the callback takes."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from callbacks.unlearning import Unlearning
from mtsae.evals.unlearning.config import UnlearningConfig, UnlearningDuringTraining
from mtsae.evals.unlearning.selection import GridConfig
from mtsae_app import cli
from mtsae_app.options import add_settings_options, field_docs, settings_from_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_settings_options(p, UnlearningConfig)
    return p


def test_every_field_is_an_option_with_its_docstring() -> None:
    docs = field_docs(UnlearningConfig)
    help_text = " ".join(_parser().format_help().split())
    for f in [*dataclasses.fields(UnlearningConfig), *dataclasses.fields(GridConfig)]:
        if f.name == "grid":
            continue
        assert "--" + f.name.replace("_", "-") in help_text, f.name
        assert f.name in docs or f.name in field_docs(GridConfig), f.name
    assert "keep questions answered correctly under all 24 orderings" in help_text


def test_defaults_round_trip_and_overrides() -> None:
    assert settings_from_args(UnlearningConfig, _parser().parse_args([])) == UnlearningConfig()
    args = _parser().parse_args(
        ["--no-all-perms", "--retain-config", "", "--multipliers", "5", "20", "--max-questions", "7"]
    )
    cfg = settings_from_args(UnlearningConfig, args)
    assert cfg.all_perms is False and cfg.retain_config is None and cfg.max_questions == 7
    assert cfg.grid == GridConfig(multipliers=[5.0, 20.0])


def test_callback_takes_the_same_settings_with_training_defaults() -> None:
    cb = Unlearning()
    assert isinstance(cb.config, UnlearningConfig) and cb.config == UnlearningDuringTraining()
    assert cb.config.all_perms is False and UnlearningConfig().all_perms is True
    custom = UnlearningDuringTraining(forget_corpus="bio.jsonl", grid=GridConfig(n_features=[3]))
    assert Unlearning(config=custom).config is custom


def test_invalid_setting_is_a_user_error(tmp_path, capsys) -> None:
    argv = ["eval", "unlearning", "--sae", str(tmp_path), "--config", "c.yaml", "--out", str(tmp_path)]
    assert cli.main([*argv, "--position-rule", "everywhere"]) == 2
    assert "position_rule must be one of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="n_sparsity_rows"):
        UnlearningConfig(n_sparsity_rows=0)


@pytest.mark.parametrize(
    ("command", "settings"),
    [
        ("core", "CoreConfig"),
        ("disentanglement", "DisentanglementConfig"),
        ("unlearning", "UnlearningConfig"),
    ],
)
def test_each_evaluation_has_one_settings_object(command: str, settings: str, capsys) -> None:
    import mtsae_app.eval as evaluation

    cls = getattr(evaluation, settings)
    with pytest.raises(SystemExit):
        evaluation.build_parser().parse_args([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(cls):
        if not dataclasses.is_dataclass(f.type) and f.name != "grid":
            assert "--" + f.name.replace("_", "-") in help_text, (command, f.name)
    assert settings_from_args(cls, evaluation.build_parser().parse_args(_required(command))) is not None


def _required(command: str) -> list[str]:
    return [command, "--sae", "x", "--config", "c.yaml", "--out", "o"]
