"""The unlearning summary names its question sets for what they are under cloze scoring."""

from __future__ import annotations

from mtsae.evals.unlearning.report import summary_markdown


def _results(scoring: str) -> dict:
    config = {
        "retain_threshold": 0.5,
        "n_features": 10,
        "multiplier": 25.0,
        "features": list(range(10)),
        "wmdp_accuracy": 0.88,
        "mmlu_accuracy": 0.995,
    }
    if scoring == "cloze":
        config |= {"ce_increase_forget": 0.36, "ce_increase_retain": 0.15, "text_selectivity": 0.21}
    return {
        "scoring": scoring,
        "conventions": {"saebench_exact": False},
        "unlearning_score": 0.12,
        "best": config,
        "wmdp_acc_best": 0.88,
        "mmlu_acc_best": 0.995,
        "n_questions": {"wmdp-bio": {"kept": 135, "loaded": 300}, "retain": {"kept": 133, "loaded": 300}},
        "configs": [config, {**config, "retain_threshold": 0.01, "features": []}],
    }


def test_cloze_summary_names_forget_and_retain_questions_and_shows_selectivity() -> None:
    text = summary_markdown(_results("cloze"))
    assert "cloze scoring" in text and "wmdp" not in text.lower() and "mmlu" not in text.lower()
    assert "questions kept / loaded: forget-topic 135/300, retain 133/300" in text
    assert "| forget-topic acc | retain acc | CE incr. forget | CE incr. retain | selectivity |" in text
    assert "| 0.5 | 10 | 25.0 | 10 | 0.8800 | 0.9950 | +0.3600 | +0.1500 | +0.2100 |" in text
    assert "| 0.01 | 10 | 25.0 | 0 | — | — | — | — | — |" in text


def test_letter_summary_keeps_saebench_names() -> None:
    text = summary_markdown(_results("letter"))
    assert "| WMDP-bio acc | MMLU acc |" in text and "selectivity" not in text
    assert "| 0.5 | 10 | 25.0 | 10 | 0.8800 | 0.9950 |" in text


def test_an_sae_with_the_sink_rule_is_not_called_saebench_exact() -> None:
    results = _results("letter") | {"conventions": {"saebench_exact": True, "max_norm_multiple": 10.0}}
    title = summary_markdown(results).splitlines()[0]
    assert "exact" not in title and "activation sinks above 10x left out" in title
