"""What the unlearning evaluation reads before any model runs: the forget and retain corpora, packed
into token rows, and the multiple-choice question sets (read through :mod:`mtsae.lm.text`)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtsae.evals.unlearning.config import UnlearningConfig
from mtsae.evals.unlearning.mcq import WMDP_BIO, MCQuestion, load_mcq
from mtsae.lm.text import DatasetUnavailableError, looks_local, open_dataset, pack_rows, pack_rows_saebench

__all__ = [
    "FORGET_CORPUS_HELP",
    "RETAIN_SET",
    "WMDP_NAME",
    "UnlearningData",
    "UnlearningDataError",
    "check_instruct",
    "load_forget_texts",
    "load_questions",
    "load_texts",
    "load_unlearning_data",
    "sample_questions",
]

#: name of the WMDP-bio question set in results (with cloze scoring: the forget-topic questions)
WMDP_NAME = "wmdp-bio"
#: name of the retain question set with cloze scoring (in the place of the MMLU subsets)
RETAIN_SET = "retain"

FORGET_CORPUS_HELP = (
    "The WMDP bio forget corpus is gated: request access from the WMDP authors (the dataset "
    "cais/wmdp-bio-forget-corpus on the Hugging Face hub; see https://www.wmdp.ai), download "
    "bio-forget-corpus.jsonl (one JSON object per line with a 'text' field) and point the config at it "
    "(callback: init_args.config.forget_corpus: /path/to/bio-forget-corpus.jsonl; mtsae eval unlearning: "
    "--forget-corpus /path/to/bio-forget-corpus.jsonl)."
)


class UnlearningDataError(DatasetUnavailableError):
    """A corpus for the unlearning evaluation cannot be loaded (the message says how to fix it)."""


@dataclass
class UnlearningData:
    """What :func:`load_unlearning_data` returns (depends on the tokenizer, not on the model or SAE)."""

    forget_rows: Tensor
    """``[n_forget, seq_len]`` token ids of the forget corpus"""
    retain_rows: Tensor
    """``[n_retain, seq_len]`` token ids of the retain corpus"""
    questions: dict[str, list[MCQuestion]]
    """``wmdp-bio`` and every MMLU subset -> questions (before filtering); with cloze scoring ``wmdp-bio``
    holds the forget-topic questions and ``retain`` the others"""
    forget_heldout_rows: Tensor | None = None
    """``[n, seq_len]`` held-out forget text for the text selectivity (None: not measured)"""
    retain_heldout_rows: Tensor | None = None
    """``[n, seq_len]`` held-out retain text for the text selectivity"""


def load_texts(
    source: str,
    config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    min_chars: int = 50,
) -> list[str]:
    """Documents longer than ``min_chars`` characters from a hub dataset, a local folder or a local file
    (read by :func:`mtsae.lm.text.open_dataset`).

    Raises:
        UnlearningDataError: the dataset cannot be read (the message says how to use a local copy).
    """
    rows = open_dataset(source, config, split, columns=f"a {text_column!r} column", error=UnlearningDataError)
    if text_column not in rows.column_names:
        raise UnlearningDataError(f"{source} has no column {text_column!r} (columns: {rows.column_names})")
    texts = [t for t in rows[text_column] if isinstance(t, str) and len(t) > min_chars]
    if not texts:
        raise UnlearningDataError(f"{source}: no document longer than {min_chars} characters")
    return texts


def load_forget_texts(path: str | None, text_column: str = "text", min_chars: int = 50) -> list[str]:
    """The WMDP bio forget corpus; a missing path raises :class:`UnlearningDataError` saying how to get it."""
    if not path:
        raise UnlearningDataError(f"no forget corpus was given. {FORGET_CORPUS_HELP}")
    if looks_local(path) and not Path(path).expanduser().exists():
        raise UnlearningDataError(f"the forget corpus {path!r} does not exist. {FORGET_CORPUS_HELP}")
    try:
        return load_texts(path, None, "train", text_column, min_chars)
    except UnlearningDataError as err:
        raise UnlearningDataError(f"{err}\n{FORGET_CORPUS_HELP}") from err


def check_instruct(tokenizer: Any, name: str = "the model") -> None:
    """SAEBench's instruct-model requirement: the tokenizer must have a chat template.

    SAEBench raises unless the model name contains "it" and prompts it in Gemma's instruct format; here an
    instruct model is one whose tokenizer has a chat template (the prompt then uses it).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise UnlearningDataError(
            f"{name} has no chat template, and SAEBench's unlearning evaluation requires an instruct model "
            "(it evaluates gemma-2-2b-it with SAEs trained on gemma-2-2b): pass the instruct model "
            "(mtsae eval unlearning --model-name google/gemma-2-2b-it), or run this project's variant on "
            "this model with --no-saebench-exact (plain 'Answer:' prompt)"
        )


def sample_questions(questions: list[MCQuestion], k: int | None, seed: int) -> list[MCQuestion]:
    """At most ``k`` of ``questions`` (a seeded sample, in their order); None: all."""
    if k is None or len(questions) <= k:
        return questions
    keep = sorted(random.Random(seed).sample(range(len(questions)), k))
    return [questions[i] for i in keep]


def load_questions(cfg: UnlearningConfig) -> dict[str, list[MCQuestion]]:
    """WMDP-bio and the MMLU subsets (``test`` split), each capped at ``cfg.max_questions``; with cloze
    scoring, the forget-topic questions of ``cfg.question_file`` (as ``wmdp-bio``) and the others (as
    ``retain``)."""
    if cfg.scoring == "cloze":
        from mtsae.evals.unlearning.cloze import load_topic_questions

        try:
            sets = load_topic_questions(cfg.question_file, cfg.forget_topic, WMDP_NAME, RETAIN_SET)
        except FileNotFoundError as err:
            raise UnlearningDataError(str(err)) from err
        return {k: sample_questions(v, cfg.max_questions, cfg.seed) for k, v in sets.items()}
    wmdp_setting = "wmdp_source (mtsae eval unlearning --wmdp-source)"
    out = {WMDP_NAME: load_mcq(cfg.wmdp_source, WMDP_BIO[1], WMDP_BIO[2], setting=wmdp_setting)}
    for subset in cfg.mmlu_subsets:
        src = cfg.mmlu_source[subset] if isinstance(cfg.mmlu_source, Mapping) else cfg.mmlu_source
        setting = f"mmlu_source (mtsae eval unlearning --mmlu-file {subset}=FILE)"
        out[subset] = load_mcq(src, subset, "test", setting=setting)
    return {k: sample_questions(v, cfg.max_questions, cfg.seed) for k, v in out.items()}


def load_unlearning_data(tokenizer: Any, cfg: UnlearningConfig) -> UnlearningData:
    """Read and tokenize everything the evaluation needs (no model): fails fast on a missing dataset.

    The forget corpus is sampled to ``n_sparsity_rows`` documents first (SAEBench); the retain corpus is
    used whole. The question sets are loaded first (they are smaller), then the corpora.
    """
    if cfg.saebench_exact and cfg.scoring == "letter":
        check_instruct(tokenizer)
        from mtsae.evals.unlearning.mcq import letter_token_ids

        letter_token_ids(tokenizer, "ABCD", strict=True)  # before any dataset is read
    questions = load_questions(cfg)
    forget = load_forget_texts(cfg.forget_corpus, cfg.text_column, cfg.min_chars)
    forget = random.Random(cfg.seed).sample(forget, min(cfg.n_sparsity_rows, len(forget)))
    retain = load_texts(
        cfg.retain_corpus, cfg.retain_config, cfg.retain_split, cfg.text_column, cfg.min_chars
    )
    try:
        if cfg.saebench_exact:  # one generator for both shuffles, as SAEBench's global torch seed
            g = torch.Generator().manual_seed(cfg.seed)
            forget_rows = pack_rows_saebench(tokenizer, forget, cfg.seq_len, cfg.n_sparsity_rows, g)
            retain_rows = pack_rows_saebench(tokenizer, retain, cfg.seq_len, cfg.n_sparsity_rows, g)
        else:
            forget_rows = pack_rows(tokenizer, forget, cfg.seq_len, cfg.n_sparsity_rows, cfg.seed)
            retain_rows = pack_rows(tokenizer, retain, cfg.seq_len, cfg.n_sparsity_rows, cfg.seed)
        heldout = [None, None]
        if cfg.forget_heldout:  # the text selectivity: this project's packing, BOS-led rows
            for i, src in enumerate((cfg.forget_heldout, cfg.retain_heldout)):
                texts = load_texts(src, None, "train", cfg.text_column, cfg.min_chars)
                heldout[i] = pack_rows(tokenizer, texts, cfg.seq_len, cfg.n_selectivity_rows, cfg.seed)
    except ValueError as err:  # a corpus too short for one row
        raise UnlearningDataError(str(err)) from err
    return UnlearningData(
        forget_rows=forget_rows,
        retain_rows=retain_rows,
        questions=questions,
        forget_heldout_rows=heldout[0],
        retain_heldout_rows=heldout[1],
    )
