"""A malformed recipe or corpus is one line (exit status 2) before the language model is loaded: features, layer,
multiplier (NaN included) and model dtype are checked when the recipe is read, the features' range when
its SAE is loaded (before the LM), the layer against the LM's decoder layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtsae import save_sae
from mtsae.evals.unlearning.recipe import RecipeError, UnlearningRecipe, sae_sha256
from mtsae.sae.model import MTSAE
from mtsae_app.unlearn import main as unlearn_main
from tests.helpers.lm import tiny_lm_dir


@pytest.fixture
def recipe_path(tmp_path: Path) -> Path:
    save_sae(MTSAE(64, 128, dilations=[1, 2]), tmp_path / "sae")
    recipe = UnlearningRecipe(
        sae_path="sae", sae_sha256=sae_sha256(tmp_path / "sae"), layer=1, features=[3, 7], multiplier=20.0
    )
    recipe.model = {"name": str(tmp_path / "no-such-model"), "dtype": "float32"}  # never reached
    return recipe.save(tmp_path / "recipe.json")


def _edit(path: Path, **fields) -> None:
    d = json.loads(path.read_text())
    d.update(fields)
    path.write_text(json.dumps(d))  # NaN is written as NaN, as Python's json reads it


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"features": [-5]}, r"features must be feature indices \(integers >= 0\), got \[-5\]"),
        ({"features": ["abc"]}, r"got \['abc'\]"),
        ({"features": [1.5]}, r"got \[1.5\]"),
        ({"layer": -1}, r"layer must be a decoder layer index \(an integer >= 0\), got -1"),
        ({"multiplier": float("nan")}, "multiplier must be a finite number >= 0 .*got nan"),
        ({"multiplier": "20"}, "multiplier must be a number, got '20'"),
        ({"model": {"name": "x", "dtype": "bogus"}}, "the recipe's model dtype must be one of"),
        (
            {"features": [1000000]},
            r"features \[1000000\] are out of range: the recipe's SAE has 128 features",
        ),
    ],
)
def test_a_bad_recipe_is_one_line_before_the_model_loads(recipe_path: Path, fields, message, capsys) -> None:
    _edit(recipe_path, **fields)
    assert unlearn_main(["generate", "--recipe", str(recipe_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "mtsae unlearn generate: error:" in err and "Traceback" not in err, err
    assert __import__("re").search(message, err), err
    assert "no-such-model" not in err  # refused before the model was looked for


def test_a_nan_multiplier_override_is_refused(recipe_path: Path, capsys) -> None:
    argv = ["generate", "--recipe", str(recipe_path), "--prompt", "hi", "--multiplier", "nan"]
    assert unlearn_main(argv) == 2
    assert "multiplier must be a finite number >= 0" in capsys.readouterr().err


def test_a_layer_beyond_the_model_is_one_line(
    recipe_path: Path, tmp_path_factory, capsys, monkeypatch
) -> None:
    """Refused from the model's config, before its tokenizer or weights are loaded."""
    import mtsae.lm.loading as loading

    def _no_weights(*args, **kwargs):
        raise AssertionError("the LM was loaded before the recipe's layer was checked")

    monkeypatch.setattr(loading, "load_causal_lm", _no_weights)
    monkeypatch.setattr(loading, "load_tokenizer", _no_weights)
    lm = tiny_lm_dir(tmp_path_factory)
    _edit(recipe_path, layer=99, model={"name": str(lm), "dtype": "float32"})
    assert unlearn_main(["generate", "--recipe", str(recipe_path), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the recipe clamps layer 99, but" in err and "decoder layers" in err and "Traceback" not in err, (
        err
    )
    with pytest.raises(RecipeError, match="at least one feature"):
        UnlearningRecipe(sae_path="sae", sae_sha256="0", layer=1, features=[], multiplier=1.0)


def test_an_empty_forget_corpus_says_so_without_a_download_hint(tmp_path: Path) -> None:
    from mtsae.evals.unlearning.corpora import UnlearningDataError, load_forget_texts

    empty = tmp_path / "forget.jsonl"
    empty.write_text("")
    with pytest.raises(
        UnlearningDataError, match=r"StopIteration: no records found \(an empty file\?\)"
    ) as err:
        load_forget_texts(str(empty))
    assert "hf download" not in str(err.value) and "could not be read as such a dataset" in str(err.value)
