"""mtsae.unlearning_eval end to end on a tiny LM, a tiny SAE and tiny local datasets (offline)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from mtsae.model import MTSAE
from mtsae.tiny_lm import build_tiny_lm
from mtsae.unlearning import GridConfig
from mtsae.unlearning_eval import (
    FORGET_CORPUS_HELP,
    UnlearningConfig,
    UnlearningDataError,
    evaluate_unlearning,
    filter_questions,
    load_forget_texts,
    load_unlearning_data,
    pack_rows,
    save_results,
    summary_markdown,
)
from tests.lm_helpers import offline_hub

MMLU = ("high_school_us_history", "college_computer_science", "high_school_geography", "human_aging")
BIO_WORDS = ("cell", "virus", "protein", "gene", "enzyme")


# ---------------------------------------------------------------------------------------- helpers
def build_mcq_lm(out: Path) -> Path:
    """The tiny gemma2 LM of :func:`mtsae.tiny_lm.build_tiny_lm` with ``" B"``, ``" C"``, ``" D"`` added as
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


def _questions(n: int, seed: int, words: list[str]) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        choices = rng.sample(words, 4)
        out.append(
            {"question": f"What is {' '.join(rng.sample(words, 3))}?", "choices": choices, "answer": i % 4}
        )
    return out


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_unlearning_files(lm_dir: Path, out: Path) -> dict[str, object]:
    """Forget / retain corpora (from the tiny corpus: documents about cells, viruses, ... vs the rest) and
    WMDP-style / MMLU-style MCQ files. Returns the matching :class:`UnlearningConfig` keyword arguments."""
    out.mkdir(parents=True, exist_ok=True)
    docs = [json.loads(line)["text"] for line in (lm_dir / "corpus.jsonl").read_text().splitlines()]
    forget = [d for d in docs if sum(w in d for w in BIO_WORDS) >= 2]
    retain = [d for d in docs if d not in forget]
    words = sorted({w.strip(".,!?:") for d in docs[:40] for w in d.split()} - {""})
    return {
        "forget_corpus": _jsonl(out / "bio-forget-corpus.jsonl", [{"text": d} for d in forget]),
        "retain_corpus": _jsonl(out / "retain.jsonl", [{"text": d} for d in retain]),
        "wmdp_source": _jsonl(out / "wmdp.jsonl", _questions(32, 0, words)),
        "mmlu_source": {
            s: _jsonl(out / f"{s}.jsonl", _questions(12, i + 1, words)) for i, s in enumerate(MMLU)
        },
    }


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
    with pytest.raises(UnlearningDataError, match="not one row"):
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
    kept = filter_questions(
        model, tok, data.questions, all_perms=False, cache_dir=tmp_path, model_id=model_id
    )
    assert kept["wmdp-bio"] and sum(len(v) for n, v in kept.items() if n != "wmdp-bio")
    (cache_file,) = tmp_path.glob("filtered_*.json")
    # the second call reads the cache: the model is never run
    again = filter_questions(
        None, tok, data.questions, all_perms=False, cache_dir=tmp_path, model_id=model_id
    )
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
