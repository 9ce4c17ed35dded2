"""mtsae.evals.unlearning.pipeline end to end on a tiny LM, a tiny SAE and tiny local datasets (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtsae.evals.records import save_results
from mtsae.evals.sparsity import round_sparsity
from mtsae.evals.unlearning.config import UnlearningConfig
from mtsae.evals.unlearning.corpora import (
    FORGET_CORPUS_HELP,
    UnlearningDataError,
    check_instruct,
    load_forget_texts,
    load_unlearning_data,
)
from mtsae.evals.unlearning.mcq import letter_token_ids
from mtsae.evals.unlearning.pipeline import evaluate_unlearning, filter_questions
from mtsae.evals.unlearning.recipe import UnlearningRecipe
from mtsae.evals.unlearning.report import best_recipe, summary_markdown
from mtsae.evals.unlearning.selection import GridConfig, select_features
from mtsae.evals.unlearning.tiny_example import write_unlearning_files
from mtsae.lm.text import pack_rows, pack_rows_saebench
from mtsae.lm.tiny_lm import build_tiny_lm
from mtsae.sae.export import save_sae
from mtsae.sae.model import MTSAE
from tests.helpers.lm import offline_hub, tiny_lm_dir

MMLU = ("high_school_us_history", "college_computer_science", "high_school_geography", "human_aging")


# ---------------------------------------------------------------------------------------- helpers
def build_mcq_lm(out: Path) -> Path:
    """The tiny gemma2 LM of :func:`mtsae.lm.tiny_lm.build_tiny_lm` with ``" B"``, ``" C"``, ``" D"`` added as
    single tokens (its BPE has ``"A"`` .. ``"D"`` and ``" A"``), so that MCQ letters can be scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_lm(out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens([s for s in (" A", " B", " C", " D") if len(tok.encode(s, add_special_tokens=False)) != 1])
    model = AutoModelForCausalLM.from_pretrained(out)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mcq_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mcq_lm(tmp_path_factory.mktemp("mcq_lm"))


@pytest.fixture(scope="module")
def files(mcq_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return write_unlearning_files(mcq_lm, tmp_path_factory.mktemp("unlearning_data"))


@pytest.fixture(scope="module")
def lm(mcq_lm: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(mcq_lm).eval(), AutoTokenizer.from_pretrained(mcq_lm)


def _cfg(files: dict[str, object], **kw) -> UnlearningConfig:
    base = dict(
        retain_config=None,
        all_perms=False,
        n_sparsity_rows=12,
        seq_len=32,
        llm_batch_size=6,
        mcq_batch_size=16,
        grid=GridConfig(),
        saebench_exact=False,
    )
    return UnlearningConfig(**{**base, **files, **kw})


# ---------------------------------------------------------------------------------------- tests
def test_pack_rows(lm) -> None:
    _, tok = lm
    rows = pack_rows(
        tok, ["The cell binds the gene.", "A virus crosses the river."] * 10, seq_len=8, n_rows=5
    )
    assert rows.shape == (5, 8) and rows.dtype == torch.long
    assert (rows[:, 0] == tok.bos_token_id).all() and (rows == tok.eos_token_id).any()
    with pytest.raises(ValueError, match="not one row"):
        pack_rows(tok, ["hi there and more"], seq_len=500, n_rows=5)


def test_missing_forget_corpus_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_hub(monkeypatch)
    for path in (None, str(tmp_path / "bio-forget-corpus.jsonl")):
        with pytest.raises(UnlearningDataError) as info:
            load_forget_texts(path)
        msg = str(info.value)
        assert "request access" in msg and "cais/wmdp-bio-forget-corpus" in msg and "forget_corpus:" in msg
    assert "gated" in FORGET_CORPUS_HELP


def test_unlearning_eval_end_to_end(lm, files: dict[str, object], tmp_path: Path) -> None:
    model, tok = lm
    cfg = _cfg(files)
    data = load_unlearning_data(tok, cfg)
    assert data.forget_rows.shape == (12, 32) and data.retain_rows.shape[1] == 32
    assert set(data.questions) == {"wmdp-bio", *MMLU} and len(data.questions["wmdp-bio"]) == 32

    model_id = {"name": "tiny", "dtype": "float32"}
    kept = filter_questions(model, tok, data.questions, cfg, cache_dir=tmp_path, model_id=model_id)
    assert kept["wmdp-bio"] and sum(len(v) for n, v in kept.items() if n != "wmdp-bio")
    (cache_file,) = tmp_path.glob("filtered_*.json")
    # the second call reads the cache: the model is never run
    again = filter_questions(None, tok, data.questions, cfg, cache_dir=tmp_path, model_id=model_id)
    assert {n: [q.index for q in v] for n, v in again.items()} == {
        n: [q.index for q in v] for n, v in kept.items()
    }

    torch.manual_seed(0)
    sae = MTSAE(64, 128, dilations=[1, 2], activation="topk", activation_kwargs={"k": 4}).eval()
    cfg = _cfg(files, grid=GridConfig(retain_thresholds=[0.01, 1.0]))  # 1.0: every firing feature eligible
    res = evaluate_unlearning(model, tok, sae, 1, data, kept, cfg)
    path = save_results(res, tmp_path / "results.json")
    loaded = json.loads(path.read_text())
    assert len(loaded["configs"]) == len(GridConfig().points()) == 16
    for c in loaded["configs"]:
        assert {
            "retain_threshold",
            "n_features",
            "multiplier",
            "features",
            "wmdp_accuracy",
            "mmlu_accuracy",
        } <= set(c)
        assert len(c["features"]) <= c["n_features"] and 0 <= c["wmdp_accuracy"] <= 1
        assert set(c["mmlu"]) == set(MMLU)
    assert 0.0 <= loaded["unlearning_score"] <= 1.0
    assert loaded["baseline"]["wmdp_accuracy"] == 1.0  # the kept questions are the ones it answers right
    assert set(loaded["selected_features"]) == {"0.01", "1.0"}
    assert all(
        len(c["features"]) == c["n_features"] for c in loaded["configs"] if c["retain_threshold"] == 1.0
    )
    assert any(c["wmdp_accuracy"] < 1 or c["mmlu_accuracy"] < 1 for c in loaded["configs"])  # clamps act
    assert loaded["n_questions"]["wmdp-bio"] == {"loaded": 32, "kept": len(kept["wmdp-bio"])}
    if loaded["best"] is None:
        assert loaded["unlearning_score"] == 0.0
    else:
        assert loaded["unlearning_score"] == pytest.approx(1 - loaded["wmdp_acc_best"])
        assert loaded["mmlu_acc_best"] >= 0.99
    assert "unlearning score" in summary_markdown(loaded)


def test_no_question_kept_is_a_clear_error(lm, files: dict[str, object]) -> None:
    model, tok = lm
    cfg = _cfg(files)
    data = load_unlearning_data(tok, cfg)
    empty = {n: [] for n in data.questions}
    with pytest.raises(ValueError, match="no WMDP-bio question"):
        evaluate_unlearning(model, tok, MTSAE(64, 128, dilations=[]), 1, data, empty, cfg)


# ---------------------------------------------------------------------------------------- SAEBench-exact
def test_saebench_packing(lm) -> None:
    _, tok = lm
    texts = ["The cell binds the gene, again and again.", "A virus crosses the river at night."] * 6
    rows = pack_rows_saebench(tok, texts, seq_len=8, n_rows=100, generator=torch.Generator().manual_seed(0))
    # the stream: the EOS-joined text in 20 character chunks, each tokenized with its BOS, pads removed
    full = tok.eos_token.join(texts)
    n = (len(full) - 1) // 20 + 1
    stream = [t for i in range(20) for t in tok(full[i * n : (i + 1) * n])["input_ids"]]
    assert rows.shape == (len(stream) // 8, 8)
    assert (rows[:, 0] == tok.bos_token_id).all()  # position 0 overwritten
    expected = torch.tensor(stream[: rows.shape[0] * 8]).view(-1, 8)
    # the rows are a shuffle of the cut stream with position 0 overwritten
    got = sorted(r[1:].tolist() for r in rows)
    assert got == sorted(r[1:].tolist() for r in expected)
    assert (rows[:, 1:] == tok.bos_token_id).any()  # chunk BOS tokens stay inside rows (SAEBench)
    assert (rows == tok.eos_token_id).any()
    own = pack_rows(tok, texts, seq_len=8, n_rows=100)
    assert not (own[:, 1:] == tok.bos_token_id).any()  # this project's packing: one BOS per row


def test_rounding_changes_selection_as_in_saebench() -> None:
    forget = torch.tensor([4e-7, 6e-7, 0.3, 0.2], dtype=torch.float64)
    retain = torch.tensor([0.0, 0.0, 0.0009999996, 0.0], dtype=torch.float64)
    assert select_features(forget, retain, 0.001, 10).tolist() == [2, 3, 1, 0]
    f6, r6 = round_sparsity(forget), round_sparsity(retain)
    assert f6.tolist() == [0.0, 1e-6, 0.3, 0.2] and r6[2] == 0.001
    # rounded: feature 0 never fires, feature 2 sits on the threshold (dropped)
    assert select_features(f6, r6, 0.001, 10).tolist() == [3, 1]


def test_saebench_exact_needs_an_instruct_model_and_single_token_letters(
    lm, files, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, tok = lm
    with pytest.raises(UnlearningDataError, match="instruct model") as info:
        load_unlearning_data(tok, _cfg(files, saebench_exact=True))
    assert "--no-saebench-exact" in str(info.value) and "gemma-2-2b-it" in str(info.value)
    with pytest.raises(UnlearningDataError, match="instruct"):
        check_instruct(tok)
    from transformers import AutoTokenizer

    stock = AutoTokenizer.from_pretrained(tiny_lm_dir(tmp_path_factory))  # the stock tiny tokenizer
    with pytest.raises(ValueError, match="--no-saebench-exact"):
        letter_token_ids(stock, strict=True)
    ids = letter_token_ids(stock, strict=False)  # " B" is not one token: "B" stands for both variants
    b = stock.encode("B", add_special_tokens=False)
    assert ids[1].tolist() == b * 2 and ids[0, 1] == stock.encode(" A", add_special_tokens=False)[0]


_TEMPLATE = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<model>"


def test_saebench_exact_end_to_end_and_recipe(mcq_lm: Path, files, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(mcq_lm).eval()
    tok = AutoTokenizer.from_pretrained(mcq_lm)
    tok.chat_template = _TEMPLATE  # an "instruct" tokenizer
    grid = GridConfig(
        retain_thresholds=[1.0], n_features=[2, 4], multipliers=[0.5, 50.0], min_mmlu_accuracy=0.0
    )
    cfg = _cfg(files, saebench_exact=True, grid=grid)
    data = load_unlearning_data(tok, cfg)
    assert (data.forget_rows[:, 0] == tok.bos_token_id).all() and data.forget_rows.shape == (12, 32)
    kept = filter_questions(model, tok, data.questions, cfg)
    torch.manual_seed(0)
    sae = MTSAE(64, 128, dilations=[1, 2], activation="topk", activation_kwargs={"k": 4}).double().eval()
    res = evaluate_unlearning(model, tok, sae, 1, data, kept, cfg)
    conv = res["conventions"]
    assert conv["saebench_exact"] and conv["position_rule"] == "saebench" and conv["sparsity_decimals"] == 6
    assert conv["sae_dtype"] == "float32"  # the model's dtype, not the SAE's float64
    assert conv["max_norm_multiple"] is None  # the SAE's activation-sink rule, recorded (off here)
    sp = res["selected_features"]["1.0"]["forget_sparsity"]
    assert all(round(v, 6) == v for v in sp)
    assert res["best"] is not None and not res["warnings"]
    res["model"] = {"name": str(mcq_lm), "dtype": "float32"}
    save_sae(sae, tmp_path / "sae")
    recipe = best_recipe(res, tmp_path / "sae", tmp_path)
    assert recipe.features == res["best"]["features"] and recipe.layer == 1
    assert recipe.multiplier == res["best"]["multiplier"] and recipe.position_rule == "saebench"
    assert recipe.selection["forget_sparsity"] == sp[: len(recipe.features)]
    path = recipe.save(tmp_path / "recipe.json")
    again = UnlearningRecipe.load(path)
    assert again == recipe and again.sae_path == "sae"
    torch.testing.assert_close(again.load_sae().W_dec, sae.W_dec.float())  # the same SAE


def test_no_eligible_feature_is_a_warning_not_a_best_config(lm, files) -> None:
    model, tok = lm
    grid = GridConfig(retain_thresholds=[0.001], n_features=[2], multipliers=[25.0])
    cfg = _cfg(files, grid=grid)
    data = load_unlearning_data(tok, cfg)
    kept = filter_questions(model, tok, data.questions, cfg)
    sae = MTSAE(64, 128, dilations=[1, 2]).eval()
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)  # every feature dead: none fires on the forget corpus
    res = evaluate_unlearning(model, tok, sae, 1, data, kept, cfg)
    assert res["best"] is None and res["unlearning_score"] == 0.0
    assert len(res["warnings"]) == 1 and "no feature is eligible" in res["warnings"][0]
    assert "no feature fires on the forget corpus" in res["warnings"][0]
    assert "--retain-thresholds" in res["warnings"][0]
    assert res["configs"][0]["features"] == [] and "skipped" in res["configs"][0]
    text = summary_markdown(res)
    assert "Warning" in text and "best config: none" in text and "multiplier 25.0" not in text
    assert best_recipe(res, "unused") is None


def test_offline_example_runs_on_the_stock_tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The files of `make unlearning-example` and this project's conventions work with the stock tiny
    tokenizer, whose " B" is not a single token (the letters are scored by their single-token variant)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtsae.evals.unlearning.tiny_example import PROMPTS, build_unlearning_example

    lm_dir = tiny_lm_dir(tmp_path_factory)
    out = tmp_path_factory.mktemp("example")
    files = build_unlearning_example(lm_dir, out)
    assert (out / "prompts.txt").read_text().splitlines() == list(PROMPTS)
    assert json.loads((out / "files.json").read_text()) == files
    model, tok = AutoModelForCausalLM.from_pretrained(lm_dir).eval(), AutoTokenizer.from_pretrained(lm_dir)
    grid = GridConfig(retain_thresholds=[1.0], n_features=[2], multipliers=[5.0], min_mmlu_accuracy=0.0)
    cfg = _cfg(files, grid=grid)
    data = load_unlearning_data(tok, cfg)
    kept = filter_questions(model, tok, data.questions, cfg)
    assert kept["wmdp-bio"]
    sae = MTSAE(64, 128, dilations=[1, 2], activation="topk", activation_kwargs={"k": 4}).eval()
    res = evaluate_unlearning(model, tok, sae, 1, data, kept, cfg)
    assert res["best"] is not None and len(res["best"]["features"]) == 2
    assert not res["conventions"]["strict_letters"]
