"""The unlearning evaluation's small-model mode on the tiny LM: cloze scoring against a hand computation,
the text selectivity, the topic question file and the pipeline with ``scoring: cloze``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mtsae.evals.unlearning.cloze import (
    filter_correct_cloze,
    load_topic_questions,
    mean_text_ce,
    score_cloze,
    text_selectivity,
)
from mtsae.evals.unlearning.config import UnlearningConfig
from mtsae.evals.unlearning.corpora import load_unlearning_data
from mtsae.evals.unlearning.intervention import ClampIntervention
from mtsae.evals.unlearning.mcq import MCQDatasetError, MCQuestion
from mtsae.evals.unlearning.pipeline import evaluate_unlearning, filter_questions
from mtsae.evals.unlearning.run import UnlearningRun
from mtsae.evals.unlearning.selection import GridConfig
from mtsae.lm.text import pack_rows
from mtsae.sae.model import MTSAE
from tests.helpers.lm import tiny_lm_dir

QUESTIONS = [
    MCQuestion("What carries oxygen in the blood?", ("red cells", "the river", "a stone"), 0, "biology", 0),
    MCQuestion("Where does the river flow?", ("to the sea", "into the gene", "up"), 0, "other", 1),
    MCQuestion("Which one is a plant?", ("a fern", "a rock", "the moon", "iron"), 0, "biology", 2),
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_lm_dir(tmp_path_factory)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _hand_loglik(model, tok, question: str, choice: str) -> float:
    """``sum log p(choice tokens | BOS + prompt)`` one token at a time, each with its own forward."""
    prompt = [tok.bos_token_id, *tok(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]]
    cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
    total = 0.0
    for j, t in enumerate(cont):
        ids = torch.tensor([prompt + cont[:j]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].double()
        total += float(torch.log_softmax(logits, -1)[t])
    return total


def test_cloze_scores_equal_a_hand_computation(lm) -> None:
    model, tok = lm
    out = score_cloze(model, tok, QUESTIONS, batch_size=4)  # batches mix lengths: padding must not matter
    assert out.loglik.shape == (3, 4) and out.scores.shape == (3, 4)
    for qi, q in enumerate(QUESTIONS):
        for ci, c in enumerate(q.choices):
            ll = _hand_loglik(model, tok, q.question, c)
            assert out.loglik[qi, ci].item() == pytest.approx(ll, abs=1e-6)
            assert out.scores[qi, ci].item() == pytest.approx(ll / len(" " + c), abs=1e-7)  # per character
    assert out.scores[0, 3].item() == float("-inf")  # three choices only
    pred = out.scores.argmax(-1)
    assert out.correct.tolist() == (pred == torch.tensor([0, 0, 0])).tolist()
    kept = filter_correct_cloze(model, tok, QUESTIONS, batch_size=2)
    assert [q.index for q in kept] == [
        q.index for q, c in zip(QUESTIONS, out.correct.tolist(), strict=True) if c
    ]


def test_text_selectivity_under_a_clamp(lm) -> None:
    model, tok = lm
    special = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    texts = ["The cell binds the gene and the protein folds.", "A river runs past the old mill in town."] * 8
    rows = pack_rows(tok, texts, seq_len=16, n_rows=4)
    clean = mean_text_ce(model, rows, special, batch_size=3)
    # the hand computation: mean over non-special targets of -log p
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=rows).logits[:, :-1].double(), -1)
    tgt = rows[:, 1:]
    nll = -logp.gather(-1, tgt[..., None]).squeeze(-1)
    keep = ~torch.isin(tgt, torch.tensor([s for s in special if s is not None]))
    assert clean == pytest.approx(float(nll[keep].mean()), rel=1e-5)

    torch.manual_seed(0)
    sae = MTSAE(64, 128, dilations=[1, 2], activation="topk", activation_kwargs={"k": 8}).eval()
    iv = ClampIntervention(model, 1, sae, list(range(128)), 50.0, special)
    clamped = mean_text_ce(model, rows, special, batch_size=3, intervention=iv)
    assert clamped != pytest.approx(clean)  # clamping every feature at -50 changes the text's CE
    sel = text_selectivity({"forget": clean, "retain": clean}, {"forget": clamped, "retain": clean})
    assert sel["text_selectivity"] == pytest.approx(clamped - clean)
    assert sel["ce_increase_retain"] == 0.0 and sel["ce_forget"] == clamped


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_topic_questions_file(tmp_path: Path) -> None:
    rows = [
        {"question": q.question, "choices": list(q.choices), "answer": q.answer, "topic": q.subject}
        for q in QUESTIONS
    ]
    sets = load_topic_questions(_write_jsonl(tmp_path / "q.jsonl", rows))
    assert [q.index for q in sets["forget"]] == [0, 2] and [q.index for q in sets["retain"]] == [1]
    with pytest.raises(MCQDatasetError, match="row 0: missing fields"):
        load_topic_questions(
            _write_jsonl(tmp_path / "bad.jsonl", [{"question": "x", "choices": ["a"], "answer": 0}])
        )
    bad = [{"question": "x", "choices": ["a", "b"], "answer": 2, "topic": "biology"}]
    with pytest.raises(MCQDatasetError, match="row 0: answer 2 out of range"):
        load_topic_questions(_write_jsonl(tmp_path / "range.jsonl", bad))
    (tmp_path / "broken.jsonl").write_text('{"question": \n')
    with pytest.raises(MCQDatasetError, match="row 0: not a JSON object"):
        load_topic_questions(tmp_path / "broken.jsonl")
    with pytest.raises(FileNotFoundError, match="make smollm2"):
        load_topic_questions(tmp_path / "none.jsonl")


def test_cloze_config_is_checked() -> None:
    with pytest.raises(ValueError, match="saebench_exact"):
        UnlearningConfig(scoring="cloze", question_file="q.jsonl")
    with pytest.raises(ValueError, match="question_file"):
        UnlearningConfig(scoring="cloze", saebench_exact=False)
    with pytest.raises(ValueError, match="'letter' or 'cloze'"):
        UnlearningConfig(scoring="rc")
    with pytest.raises(ValueError, match="both forget_heldout and retain_heldout"):
        UnlearningConfig(forget_heldout="f.jsonl")


def test_pipeline_in_cloze_mode(lm, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    model, tok = lm
    lm_path = tiny_lm_dir(tmp_path_factory)
    bio = "The cell divides and the gene is copied into the protein of the blood and the plant."
    other = "The river runs past the town and the old mill where the road turns to the hill."
    text = lambda t: [{"text": f"{t} Number {i}."} for i in range(40)]  # noqa: E731
    qrows = [
        {"question": q.question, "choices": list(q.choices), "answer": a, "topic": q.subject}
        for q in QUESTIONS
        for a in range(len(q.choices))
    ]
    cfg = UnlearningConfig(
        forget_corpus=str(_write_jsonl(tmp_path / "forget.jsonl", text(bio))),
        retain_corpus=str(_write_jsonl(tmp_path / "retain.jsonl", text(other))),
        retain_config=None,
        forget_heldout=str(_write_jsonl(tmp_path / "forget_h.jsonl", text(bio + " Held"))),
        retain_heldout=str(_write_jsonl(tmp_path / "retain_h.jsonl", text(other + " Held"))),
        n_selectivity_rows=3,
        question_file=str(_write_jsonl(tmp_path / "questions.jsonl", qrows)),
        scoring="cloze",
        saebench_exact=False,
        n_sparsity_rows=6,
        seq_len=24,
        grid=GridConfig(retain_thresholds=[1.0], n_features=[4], multipliers=[5.0, 50.0]),
    )
    data = load_unlearning_data(tok, cfg)
    assert set(data.questions) == {"wmdp-bio", "retain"}
    assert len(data.questions["wmdp-bio"]) == 7 and len(data.questions["retain"]) == 3
    assert data.forget_heldout_rows.shape == (3, 24) and data.retain_heldout_rows.shape == (3, 24)
    kept = filter_questions(model, tok, data.questions, cfg)
    # each question appears once per possible answer: exactly one of them is the model's choice
    assert len(kept["wmdp-bio"]) == 2 and len(kept["retain"]) == 1
    torch.manual_seed(0)
    sae = MTSAE(64, 128, dilations=[1, 2], activation="topk", activation_kwargs={"k": 8}).eval()
    res = evaluate_unlearning(model, tok, sae, 1, data, kept, cfg)
    assert res["scoring"] == "cloze" and len(res["configs"]) == 2
    # the one entry point of the command and the callback gives the same record
    source = SimpleNamespace(model_name=str(lm_path), revision=None, model_dtype="float32", layer=1)
    run = UnlearningRun(cfg, source).prepare("cpu", model=model)
    assert {n: [q.index for q in v] for n, v in run.filtered.items()} == {
        n: [q.index for q in v] for n, v in kept.items()
    }
    assert run.evaluate(sae)["configs"] == res["configs"]
    # a cheap run scores a seeded sample of the kept questions, and says how many were kept
    cheap = UnlearningRun(replace(cfg, max_kept=1), source).prepare("cpu", model=model)
    assert [len(v) for v in cheap.filtered.values()] == [1, 1]
    assert cheap.evaluate(sae)["n_kept_before_sample"] == {"wmdp-bio": 2, "retain": 1}
    base = res["baseline"]
    assert base["wmdp_accuracy"] == 1.0 and base["ce_forget"] > 0 and base["ce_retain"] > 0
    for c in res["configs"]:
        assert c["text_selectivity"] == pytest.approx(c["ce_increase_forget"] - c["ce_increase_retain"])
        assert c["ce_forget"] == pytest.approx(base["ce_forget"] + c["ce_increase_forget"])
    # the largest selectivity over the points that clamp features: defined with or without a best point
    assert res["text_selectivity_max"] == max(c["text_selectivity"] for c in res["configs"] if c["features"])
