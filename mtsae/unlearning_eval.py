"""SAEBench's unlearning evaluation end to end (Farrell et al. 2024), from the building blocks in
:mod:`mtsae.unlearning` and :mod:`mtsae.mcq`.

1. :func:`load_unlearning_data`: the forget corpus (the WMDP bio forget corpus, a gated file the user
   supplies as a local path), the retain corpus (``wikitext`` / ``wikitext-2-raw-v1`` test, or a local
   file), both packed into rows of ``[BOS] + seq_len - 1`` tokens (documents joined with EOS, rows
   shuffled, the first ``n_sparsity_rows`` kept), and the MCQ sets (WMDP-bio and four MMLU subsets);
2. :func:`filter_questions`: keep the questions the unmodified model answers correctly (all 24 orderings
   for full runs, the original order only as the cheap setting), cached on disk per model and settings
   (it does not depend on the SAE);
3. :func:`evaluate_unlearning`: feature sparsities on both corpora, feature selection per retain
   threshold, and for every grid point the clamping intervention at layer ``L``
   (:class:`mtsae.unlearning.ClampIntervention`) while scoring all MCQ sets; then the unlearning score
   ``1 - min`` WMDP accuracy over the grid points whose pooled MMLU accuracy is ``>= 0.99``.

The SAE must act on **raw** activations (``SAEModule.export_sae()``, :func:`mtsae.load_sae`): the clamp
value ``-multiplier`` is in the units of its codes, and SAEBench's multipliers (25 .. 200) are meant
for an SAE on the raw residual stream with unit-norm decoder rows.

The unlearning model may differ from the one the SAE was trained on (SAEBench evaluates
``gemma-2-2b-it`` with SAEs trained on ``gemma-2-2b``); nothing here assumes they are the same.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtsae.lm import capture_resid_post
from mtsae.mcq import (
    MMLU_SOURCE,
    MMLU_SUBSETS,
    WMDP_BIO,
    MCQuestion,
    filter_correct,
    load_mcq,
    score_mcq,
    special_token_ids,
)
from mtsae.unlearning import (
    ClampIntervention,
    GridConfig,
    SparsityAccumulator,
    select_features,
    unlearning_score,
    valid_token_mask,
)
from mtsae.unlearning_recipe import UnlearningRecipe, sae_sha256

__all__ = [
    "FORGET_CORPUS_HELP",
    "WMDP_NAME",
    "UnlearningConfig",
    "UnlearningData",
    "UnlearningDataError",
    "load_texts",
    "load_forget_texts",
    "pack_rows",
    "pack_rows_saebench",
    "check_instruct",
    "best_recipe",
    "load_questions",
    "load_unlearning_data",
    "feature_sparsities",
    "questions_fingerprint",
    "filter_questions",
    "evaluate_unlearning",
    "save_results",
    "summary_markdown",
]

log = logging.getLogger(__name__)

#: name of the WMDP-bio question set in results
WMDP_NAME = "wmdp-bio"

FORGET_CORPUS_HELP = (
    "The WMDP bio forget corpus is gated: request access from the WMDP authors (the dataset "
    "cais/wmdp-bio-forget-corpus on the Hugging Face hub; see https://www.wmdp.ai), download "
    "bio-forget-corpus.jsonl (one JSON object per line with a 'text' field) and point the config at it "
    "(callback: forget_corpus: /path/to/bio-forget-corpus.jsonl; mtsae eval unlearning: "
    "--forget-corpus /path/to/bio-forget-corpus.jsonl)."
)

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


class UnlearningDataError(RuntimeError):
    """A corpus for the unlearning evaluation cannot be loaded (the message says how to fix it)."""


@dataclass
class UnlearningConfig:
    """Settings of the unlearning evaluation (defaults: SAEBench's full run)."""

    forget_corpus: str | None = None
    """local path to the WMDP bio forget corpus (``bio-forget-corpus.jsonl``, gated; see
    :data:`FORGET_CORPUS_HELP`), or a hub dataset you have access to"""
    retain_corpus: str = "wikitext"
    """hub dataset or local file (``.jsonl``/``.json``/``.txt``/``.parquet``) or folder of retain text"""
    retain_config: str | None = "wikitext-2-raw-v1"
    """dataset configuration of ``retain_corpus`` (hub or folder)"""
    retain_split: str = "test"
    """split of ``retain_corpus`` (hub or folder)"""
    text_column: str = "text"
    """column holding the text in both corpora"""
    min_chars: int = 50
    """documents with at most this many characters are dropped (SAEBench: ``len(text) > 50``)"""
    n_sparsity_rows: int = 1024
    """rows per corpus used for feature sparsities (SAEBench ``dataset_size``)"""
    seq_len: int = 1024
    """tokens per row, BOS included (SAEBench ``seq_len``)"""
    wmdp_source: str = WMDP_BIO[0]
    """``cais/wmdp`` (config ``wmdp-bio``), a local snapshot folder, or a local ``.jsonl``/``.parquet``"""
    mmlu_source: str | dict[str, str] = MMLU_SOURCE
    """``cais/mmlu``, a local snapshot folder, or a mapping subset name -> local file"""
    mmlu_subsets: list[str] = field(default_factory=lambda: list(MMLU_SUBSETS))
    """MMLU subsets whose pooled accuracy measures side effects"""
    all_perms: bool = True
    """keep questions answered correctly under all 24 orderings (SAEBench); False: original order only"""
    max_questions: int | None = None
    """at most this many questions per set (a seeded random sample, before filtering); None: all"""
    chat_template: bool | None = None
    """wrap prompts in the tokenizer's chat template; None: iff the tokenizer has one"""
    grid: GridConfig = field(default_factory=GridConfig)
    """retain thresholds x numbers of features x multipliers, and the MMLU accuracy threshold"""
    llm_batch_size: int = 4
    """rows per forward when computing sparsities"""
    mcq_batch_size: int = 8
    """prompts per forward when scoring questions"""
    seed: int = 42
    """seeds the document sample, row shuffle and question sample (SAEBench ``random_seed``)"""
    saebench_exact: bool = True
    """SAEBench's conventions: the clamp leaves position 0 alone, sparsities rounded to 6 decimals before
    selection, SAEBench's row packing, the SAE in the model's dtype, an instruct model (a chat template)
    and single-token answer letters required. False: this project's choices (special tokens skipped by
    id, exact sparsities, ``[BOS] + seq_len - 1`` packing, the SAE in its own dtype, any model, letters
    scored by their single-token variants); see ``docs/saebench_unlearning.md``"""
    position_rule: str | None = None
    """override of the clamp's position rule (``saebench`` or ``special_tokens``); None: from
    ``saebench_exact``"""

    @property
    def rule(self) -> str:
        """The position rule in effect."""
        if self.position_rule is not None:
            return self.position_rule
        return "saebench" if self.saebench_exact else "special_tokens"

    def __post_init__(self) -> None:
        from mtsae.unlearning import POSITION_RULES

        if self.position_rule is not None and self.position_rule not in POSITION_RULES:
            raise ValueError(f"position_rule must be one of {sorted(POSITION_RULES)} or None")
        if isinstance(self.grid, Mapping):  # from JSON / YAML
            self.grid = GridConfig(**self.grid)
        for name in ("n_sparsity_rows", "llm_batch_size", "mcq_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (BOS + one token), got {self.seq_len}")
        if self.max_questions is not None and self.max_questions < 1:
            raise ValueError(f"max_questions must be >= 1 or None, got {self.max_questions}")
        if self.min_chars < 0:
            raise ValueError(f"min_chars must be >= 0, got {self.min_chars}")
        if not self.mmlu_subsets:
            raise ValueError("mmlu_subsets must name at least one MMLU subset")
        if isinstance(self.mmlu_source, Mapping):
            missing = [s for s in self.mmlu_subsets if s not in self.mmlu_source]
            if missing:
                raise ValueError(f"mmlu_source maps no file for subsets {missing}")


@dataclass
class UnlearningData:
    """What :func:`load_unlearning_data` returns (depends on the tokenizer, not on the model or SAE)."""

    forget_rows: Tensor
    """``[n_forget, seq_len]`` token ids of the forget corpus"""
    retain_rows: Tensor
    """``[n_retain, seq_len]`` token ids of the retain corpus"""
    questions: dict[str, list[MCQuestion]]
    """``wmdp-bio`` and every MMLU subset -> questions (before filtering)"""


# ---------------------------------------------------------------------------------------------- corpora
def _looks_local(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or Path(name).suffix.lower() in _LOCAL_BUILDERS
    )


def _texts_of(rows: Any, text_column: str, min_chars: int, name: str) -> list[str]:
    if text_column not in rows.column_names:
        raise UnlearningDataError(f"{name} has no column {text_column!r} (columns: {rows.column_names})")
    return [t for t in rows[text_column] if isinstance(t, str) and len(t) > min_chars]


def load_texts(
    source: str,
    config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    min_chars: int = 50,
) -> list[str]:
    """Documents longer than ``min_chars`` characters from a hub dataset, a local folder or a local file.

    Raises:
        UnlearningDataError: the dataset cannot be read (the message says how to use a local copy).
    """
    from datasets import load_dataset

    path = Path(source).expanduser()
    if path.is_file():
        builder = _LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UnlearningDataError(f"{path}: unsupported file type; use one of {sorted(_LOCAL_BUILDERS)}")
        rows = load_dataset(builder, data_files=str(path), split="train")
    elif path.is_dir():
        rows = load_dataset(str(path), config, split=split)
    elif _looks_local(source):
        raise UnlearningDataError(f"local corpus {source!r} does not exist")
    else:
        try:
            rows = load_dataset(source, config, split=split)
        except Exception as err:  # re-raised with instructions, never swallowed
            cfg = f" {config}" if config else ""
            raise UnlearningDataError(
                f"cannot load dataset {source!r}{cfg} split {split!r} ({type(err).__name__}: {err}). Without "
                f"access to the Hugging Face hub, download it once elsewhere (`hf download --repo-type "
                f"dataset {source} --local-dir DIR`) and pass the folder, or pass a local "
                f".jsonl/.txt/.parquet file with a {text_column!r} column."
            ) from err
    texts = _texts_of(rows, text_column, min_chars, source)
    if not texts:
        raise UnlearningDataError(f"{source}: no document longer than {min_chars} characters")
    return texts


def load_forget_texts(path: str | None, text_column: str = "text", min_chars: int = 50) -> list[str]:
    """The WMDP bio forget corpus; a missing path raises :class:`UnlearningDataError` saying how to get it."""
    if not path:
        raise UnlearningDataError(f"no forget corpus was given. {FORGET_CORPUS_HELP}")
    if _looks_local(path) and not Path(path).expanduser().exists():
        raise UnlearningDataError(f"the forget corpus {path!r} does not exist. {FORGET_CORPUS_HELP}")
    try:
        return load_texts(path, None, "train", text_column, min_chars)
    except UnlearningDataError as err:
        raise UnlearningDataError(f"{err}\n{FORGET_CORPUS_HELP}") from err


def pack_rows(tokenizer: Any, texts: Sequence[str], seq_len: int, n_rows: int, seed: int = 42) -> Tensor:
    """This project's packing: rows ``[n, seq_len]`` of ``[BOS] + seq_len - 1`` tokens.

    Documents are tokenized without special tokens and joined with EOS; the stream is cut into rows of
    ``seq_len - 1`` (the incomplete last row is dropped), each row gets a BOS, the rows are shuffled with
    ``seed`` and the first ``n_rows`` kept. Unlike SAEBench's packing (:func:`pack_rows_saebench`) no token
    is overwritten and no BOS appears inside a row.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token")
    body = seq_len - 1
    stream: list[int] = []
    for i in range(0, len(texts), 64):
        for ids in tokenizer(list(texts[i : i + 64]), add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
    n_full = len(stream) // body
    if n_full == 0:
        raise UnlearningDataError(f"the corpus has {len(stream)} tokens: not one row of {seq_len}")
    rows = torch.tensor(stream[: n_full * body], dtype=torch.long).view(n_full, body)
    rows = torch.cat([torch.full((n_full, 1), bos, dtype=torch.long), rows], dim=1)  # [n, seq_len]
    order = torch.randperm(n_full, generator=torch.Generator().manual_seed(seed))
    return rows[order[:n_rows]]


def pack_rows_saebench(
    tokenizer: Any, texts: Sequence[str], seq_len: int, n_rows: int, generator: torch.Generator
) -> Tensor:
    """SAEBench's ``tokenize_and_concat_dataset`` followed by its shuffle: rows ``[n, seq_len]``.

    The documents are joined with the EOS *text*, the string is cut into 20 equal character chunks, each
    chunk is tokenized as the tokenizer does by default (Gemma's adds a BOS to each), every PAD id is
    removed, the stream is cut into rows of ``seq_len`` (the incomplete last row is dropped), position 0 of
    every row is overwritten with BOS (its token is lost), the rows are shuffled with ``generator``
    (``torch.randperm``) and the first ``n_rows`` kept.
    """
    if tokenizer.eos_token is None or tokenizer.bos_token_id is None:
        raise ValueError("SAEBench's packing needs a tokenizer with both an EOS and a BOS token")
    full = tokenizer.eos_token.join(texts)
    n_chunks = 20
    length = (len(full) - 1) // n_chunks + 1
    stream: list[int] = []
    for i in range(n_chunks):
        stream.extend(tokenizer(full[i * length : (i + 1) * length])["input_ids"])
    if tokenizer.pad_token_id is not None:
        stream = [t for t in stream if t != tokenizer.pad_token_id]
    n_full = len(stream) // seq_len
    if n_full == 0:
        raise UnlearningDataError(f"the corpus has {len(stream)} tokens: not one row of {seq_len}")
    rows = torch.tensor(stream[: n_full * seq_len], dtype=torch.long).view(n_full, seq_len)
    rows[:, 0] = tokenizer.bos_token_id
    return rows[torch.randperm(n_full, generator=generator)[:n_rows]]


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


def _sample(questions: list[MCQuestion], k: int | None, seed: int) -> list[MCQuestion]:
    if k is None or len(questions) <= k:
        return questions
    keep = sorted(random.Random(seed).sample(range(len(questions)), k))
    return [questions[i] for i in keep]


def load_questions(cfg: UnlearningConfig) -> dict[str, list[MCQuestion]]:
    """WMDP-bio and the MMLU subsets (``test`` split), each capped at ``cfg.max_questions``."""
    out = {WMDP_NAME: load_mcq(cfg.wmdp_source, WMDP_BIO[1], WMDP_BIO[2])}
    for subset in cfg.mmlu_subsets:
        src = cfg.mmlu_source[subset] if isinstance(cfg.mmlu_source, Mapping) else cfg.mmlu_source
        out[subset] = load_mcq(src, subset, "test")
    return {k: _sample(v, cfg.max_questions, cfg.seed) for k, v in out.items()}


def load_unlearning_data(tokenizer: Any, cfg: UnlearningConfig) -> UnlearningData:
    """Read and tokenize everything the evaluation needs (no model): fails fast on a missing dataset.

    The forget corpus is sampled to ``n_sparsity_rows`` documents first (SAEBench); the retain corpus is
    used whole. The question sets are loaded first (they are smaller), then the corpora.
    """
    if cfg.saebench_exact:
        check_instruct(tokenizer)
        from mtsae.mcq import letter_token_ids

        letter_token_ids(tokenizer, "ABCD", strict=True)  # before any dataset is read
    questions = load_questions(cfg)
    forget = load_forget_texts(cfg.forget_corpus, cfg.text_column, cfg.min_chars)
    forget = random.Random(cfg.seed).sample(forget, min(cfg.n_sparsity_rows, len(forget)))
    retain = load_texts(
        cfg.retain_corpus, cfg.retain_config, cfg.retain_split, cfg.text_column, cfg.min_chars
    )
    if cfg.saebench_exact:  # one generator for both shuffles, as SAEBench's global torch seed
        g = torch.Generator().manual_seed(cfg.seed)
        forget_rows = pack_rows_saebench(tokenizer, forget, cfg.seq_len, cfg.n_sparsity_rows, g)
        retain_rows = pack_rows_saebench(tokenizer, retain, cfg.seq_len, cfg.n_sparsity_rows, g)
    else:
        forget_rows = pack_rows(tokenizer, forget, cfg.seq_len, cfg.n_sparsity_rows, cfg.seed)
        retain_rows = pack_rows(tokenizer, retain, cfg.seq_len, cfg.n_sparsity_rows, cfg.seed)
    return UnlearningData(forget_rows=forget_rows, retain_rows=retain_rows, questions=questions)


# ---------------------------------------------------------------------------------------------- sparsity
@torch.no_grad()
def feature_sparsities(
    model: nn.Module,
    sae: nn.Module,
    layer: int,
    rows: Tensor,
    special_ids: Sequence[int | None],
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "sparsity",
) -> SparsityAccumulator:
    """Fraction of valid tokens on which each feature fires, over token rows ``[N, T]``.

    Reads resid_post of ``layer`` (the forward stops there) and encodes whole rows (an MTSAE sees the
    sequence with BOS/EOS/PAD masked). Returns the accumulator (``.compute()`` gives ``[d_sae]``,
    ``.n_tokens`` the number of valid tokens).
    """
    from tqdm.auto import tqdm

    W_dec = sae.W_dec  # [d_sae, d_in]
    acc = SparsityAccumulator(W_dec.shape[0])
    device = next(model.parameters()).device
    for start in tqdm(range(0, rows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        ids = rows[start : start + batch_size].to(device)  # [B, T]
        valid = valid_token_mask(ids, None, special_ids)  # [B, T]
        with torch.inference_mode():
            h = capture_resid_post(model, layer, ids)  # [B, T, d]
            x = h.to(device=W_dec.device, dtype=W_dec.dtype)
            f = sae.encode(x, valid.to(W_dec.device))  # [B, T, d_sae]
            acc.update(f.cpu(), valid.cpu())
    return acc


# ---------------------------------------------------------------------------------------------- filtering
def questions_fingerprint(questions: Mapping[str, Sequence[MCQuestion]], **settings: Any) -> str:
    """Hash of the question sets (text, choices, answers) and ``settings`` (model, orderings, ...)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name in sorted(questions):
        for q in questions[name]:
            h.update(json.dumps([name, q.index, q.question, list(q.choices), q.answer]).encode())
    return h.hexdigest()[:16]


def filter_questions(
    model: nn.Module,
    tokenizer: Any,
    questions: Mapping[str, Sequence[MCQuestion]],
    *,
    all_perms: bool = True,
    batch_size: int = 8,
    chat_template: bool | None = None,
    cache_dir: str | Path | None = None,
    model_id: Mapping[str, Any] | None = None,
    progress: bool = False,
    strict_letters: bool = True,
) -> dict[str, list[MCQuestion]]:
    """Questions the unmodified model answers correctly (:func:`mtsae.mcq.filter_correct`), per set.

    With ``cache_dir``, the kept question indices are stored in ``<cache_dir>/filtered_<hash>.json``,
    keyed by the questions, ``model_id`` (name, revision, dtype: what identifies the model) and the
    settings, and reused on the next call.
    """
    from tqdm.auto import tqdm

    settings = {"all_perms": all_perms, "chat_template": chat_template}
    if not strict_letters:  # keys of caches written before the setting existed stay valid
        settings["strict_letters"] = False
    key = questions_fingerprint(questions, model=dict(model_id or {}), **settings)
    path = None if cache_dir is None else Path(cache_dir) / f"filtered_{key}.json"
    if path is not None and path.exists():
        kept_idx = {n: set(v) for n, v in json.loads(path.read_text())["kept"].items()}
        log.info("filtered questions read from %s", path)
        return {n: [q for q in qs if q.index in kept_idx[n]] for n, qs in questions.items()}
    kept: dict[str, list[MCQuestion]] = {}
    for name, qs in tqdm(questions.items(), desc="filter questions", disable=not progress, leave=False):
        kept[name] = filter_correct(
            model,
            tokenizer,
            qs,
            all_perms=all_perms,
            batch_size=batch_size,
            chat_template=chat_template,
            strict_letters=strict_letters,
        )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "model": dict(model_id or {}),
            "all_perms": all_perms,
            "kept": {n: [q.index for q in qs] for n, qs in kept.items()},
            "loaded": {n: len(qs) for n, qs in questions.items()},
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
    return kept


# ---------------------------------------------------------------------------------------------- evaluation
def _counts(correct: Tensor) -> dict[str, int]:
    return {"correct": int(correct.sum()), "total": int(correct.numel())}


def _acc(c: Mapping[str, int]) -> float:
    return c["correct"] / c["total"] if c["total"] else float("nan")


def _pooled(per_subset: Mapping[str, Mapping[str, int]]) -> float:
    total = sum(c["total"] for c in per_subset.values())
    return sum(c["correct"] for c in per_subset.values()) / total if total else float("nan")


@torch.no_grad()
def evaluate_unlearning(
    model: nn.Module,
    tokenizer: Any,
    sae: nn.Module,
    layer: int,
    data: UnlearningData,
    filtered: Mapping[str, Sequence[MCQuestion]],
    cfg: UnlearningConfig,
    progress: bool = False,
) -> dict[str, Any]:
    """Sparsities, selection, the grid of clamping interventions and the unlearning score.

    Args:
        model: the unlearning LM (may differ from the SAE's training model, e.g. its instruct variant).
        tokenizer: its tokenizer.
        sae: SAE acting on raw activations of ``layer`` (``encode(x, valid)``, ``W_dec``).
        layer: decoder layer whose output (resid_post) the SAE reads and the clamp modifies.
        data: corpora rows and questions from :func:`load_unlearning_data`.
        filtered: the questions the unmodified model answers correctly (:func:`filter_questions`).
        cfg: the settings (grid, batch sizes, ...).
        progress: tqdm bars on the long loops.

    Returns:
        A JSON-serialisable dict: ``unlearning_score``, ``wmdp_acc_best``, ``mmlu_acc_best``, ``best``
        (the winning grid point, or ``None`` when no point keeps MMLU accuracy; then the best is doing
        nothing and the accuracies are the baseline's), ``baseline`` (the unmodified model on the
        filtered questions), ``configs`` (every grid point with its features and per-set counts and
        accuracies), ``selected_features`` per retain threshold, ``n_questions``, ``n_sparsity_tokens``
        and ``settings``.

    Raises:
        ValueError: if no WMDP question or no MMLU question survived the filtering.
    """
    from tqdm.auto import tqdm

    mmlu_names = [n for n in filtered if n != WMDP_NAME]
    if not filtered.get(WMDP_NAME):
        raise ValueError(
            "no WMDP-bio question is answered correctly by the unmodified model, so the unlearning score is "
            "undefined: use a model that knows some biology (SAEBench uses gemma-2-2b-it), more questions "
            "(max_questions) or all_perms=False"
        )
    if not any(filtered[n] for n in mmlu_names):
        raise ValueError(
            "no MMLU question is answered correctly by the unmodified model: cannot measure side effects"
        )
    special = special_token_ids(tokenizer)
    exact = cfg.saebench_exact
    model_dtype = next(model.parameters()).dtype
    if exact and sae.W_dec.dtype != model_dtype:  # SAEBench runs the SAE in the model's dtype
        sae = copy.deepcopy(sae).to(dtype=model_dtype)
    forget_acc = feature_sparsities(
        model, sae, layer, data.forget_rows, special, cfg.llm_batch_size, progress, "forget sparsity"
    )
    retain_acc = feature_sparsities(
        model, sae, layer, data.retain_rows, special, cfg.llm_batch_size, progress, "retain sparsity"
    )
    forget_sp, retain_sp = forget_acc.compute(exact), retain_acc.compute(exact)  # [d_sae]
    n_max = max(cfg.grid.n_features)
    selected = {t: select_features(forget_sp, retain_sp, t, n_max) for t in cfg.grid.retain_thresholds}

    memo: dict[tuple, dict[str, dict[str, int]]] = {}

    def score(features: tuple[int, ...], multiplier: float) -> dict[str, dict[str, int]]:
        key = (features, multiplier) if features else ()
        if key not in memo:
            iv = None
            if features:
                iv = ClampIntervention(
                    model, layer, sae, list(features), multiplier, special, position_rule=cfg.rule
                )
            memo[key] = {
                name: _counts(
                    score_mcq(
                        model,
                        tokenizer,
                        qs,
                        cfg.mcq_batch_size,
                        iv,
                        chat_template=cfg.chat_template,
                        strict_letters=exact,
                    ).correct
                )
                for name, qs in filtered.items()
                if qs
            }
            for name, qs in filtered.items():
                if not qs:
                    memo[key][name] = {"correct": 0, "total": 0}
        return memo[key]

    base = score((), 0.0)
    configs = []
    for point in tqdm(cfg.grid.points(), desc="unlearning grid", disable=not progress, leave=False):
        feats = tuple(int(i) for i in selected[point.retain_threshold][: point.n_features].tolist())
        counts = score(feats, point.multiplier)
        mmlu = {n: counts[n] for n in mmlu_names}
        configs.append(
            {
                **point._asdict(),
                "features": list(feats),
                "wmdp": counts[WMDP_NAME],
                "mmlu": mmlu,
                "wmdp_accuracy": _acc(counts[WMDP_NAME]),
                "mmlu_accuracy": _pooled(mmlu),
                "mmlu_accuracy_per_subset": {n: _acc(c) for n, c in mmlu.items()},
            }
        )
    warnings: list[str] = []
    with_features = [c for c in configs if c["features"]]
    for c in configs:
        if not c["features"]:
            c["skipped"] = "no eligible feature at this retain threshold: nothing was clamped"
    if with_features:
        score_value, best = unlearning_score(with_features, cfg.grid.min_mmlu_accuracy)
        if best is None:
            top = max(with_features, key=lambda c: c["mmlu_accuracy"])
            warnings.append(
                f"no grid point keeps pooled MMLU accuracy >= {cfg.grid.min_mmlu_accuracy} (the highest is "
                f"{top['mmlu_accuracy']:.4f}, at threshold {top['retain_threshold']}, n {top['n_features']}, "
                f"multiplier {top['multiplier']}): the score is 0 and there is no best config; try smaller "
                "multipliers, fewer features (--n-features) or a lower retain threshold"
            )
    else:
        score_value, best = 0.0, None
        warnings.append(_no_eligible_message(forget_sp, retain_sp, cfg.grid.retain_thresholds))
    for w in warnings:
        log.warning("unlearning: %s", w)
    baseline = {
        "wmdp_accuracy": _acc(base[WMDP_NAME]),
        "mmlu_accuracy": _pooled({n: base[n] for n in mmlu_names}),
    }
    if best is None:
        wmdp_best, mmlu_best, best_point = baseline["wmdp_accuracy"], baseline["mmlu_accuracy"], None
    else:
        wmdp_best, mmlu_best = best["wmdp_accuracy"], best["mmlu_accuracy"]
        best_point = {
            k: best[k]
            for k in (
                "retain_threshold",
                "n_features",
                "multiplier",
                "features",
                "wmdp_accuracy",
                "mmlu_accuracy",
            )
        }
    settings = asdict(cfg)
    return {
        "unlearning_score": float(score_value),
        "wmdp_acc_best": float(wmdp_best),
        "mmlu_acc_best": float(mmlu_best),
        "best": best_point,
        "baseline": baseline,
        "layer": layer,
        "configs": configs,
        "selected_features": {
            str(t): {
                "features": s.tolist(),
                "forget_sparsity": forget_sp[s].tolist(),
                "retain_sparsity": retain_sp[s].tolist(),
            }
            for t, s in selected.items()
        },
        "n_questions": {
            n: {"loaded": len(data.questions.get(n, [])), "kept": len(filtered[n])} for n in filtered
        },
        "n_sparsity_tokens": {"forget": int(forget_acc.n_tokens), "retain": int(retain_acc.n_tokens)},
        "warnings": warnings,
        "conventions": {
            "saebench_exact": exact,
            "position_rule": cfg.rule,
            "sparsity_decimals": 6 if exact else None,
            "packing": "saebench" if exact else "bos_rows",
            "sae_dtype": str(sae.W_dec.dtype).removeprefix("torch."),
            "sae_in_model_dtype": exact,
            "strict_letters": exact,
        },
        "special_ids": special,
        "settings": settings,
    }


def _no_eligible_message(forget_sp: Tensor, retain_sp: Tensor, thresholds: Sequence[float]) -> str:
    fires = forget_sp > 0
    n_fire = int(fires.sum())
    cause = (
        "no feature fires on the forget corpus at all"
        if n_fire == 0
        else f"{n_fire} features fire on the forget corpus, but the lowest retain sparsity among them is "
        f"{float(retain_sp[fires].min()):.6g}, not below the largest retain threshold {max(thresholds)}"
    )
    return (
        f"no feature is eligible at any retain threshold ({cause}), so nothing was clamped: there is no best "
        "config and the score is 0. Raise --retain-thresholds, use more or longer sparsity rows "
        "(--n-sparsity-rows, --seq-len), or check that the SAE is trained (dead features never fire)"
    )


def best_recipe(
    results: Mapping[str, Any], sae_path: str | Path, recipe_dir: str | Path | None = None
) -> UnlearningRecipe | None:
    """The recipe of the best grid point of :func:`evaluate_unlearning` results (``None`` if there is none).

    Args:
        results: what :func:`evaluate_unlearning` returned (with ``model`` added by the caller, if known).
        sae_path: the SAE the results were computed with, on disk (its hash is recorded).
        recipe_dir: the folder the recipe will be written to: ``sae_path`` is stored relative to it.
    """
    best = results.get("best")
    if best is None:
        return None
    sel = results["selected_features"][str(best["retain_threshold"])]
    n = len(best["features"])
    sae_path = Path(sae_path)
    stored = str(sae_path)
    if recipe_dir is not None:
        stored = os.path.relpath(sae_path.resolve(), Path(recipe_dir).resolve())
    conv = results["conventions"]
    return UnlearningRecipe(
        sae_path=stored,
        sae_sha256=sae_sha256(sae_path),
        layer=int(results["layer"]),
        features=list(best["features"]),
        multiplier=float(best["multiplier"]),
        position_rule=conv["position_rule"],
        sae_in_model_dtype=bool(conv["sae_in_model_dtype"]),
        special_ids=list(results.get("special_ids", [])),
        model=dict(results.get("model", {})),
        selection={
            "retain_threshold": best["retain_threshold"],
            "n_features": best["n_features"],
            "rounding": conv["sparsity_decimals"],
            "forget_sparsity": sel["forget_sparsity"][:n],
            "retain_sparsity": sel["retain_sparsity"][:n],
            "n_tokens": results["n_sparsity_tokens"],
        },
        scores={
            "unlearning_score": results["unlearning_score"],
            "wmdp_accuracy": best["wmdp_accuracy"],
            "mmlu_accuracy": best["mmlu_accuracy"],
        },
    )


def save_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``results`` as indented JSON (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)
    return path


def summary_markdown(results: Mapping[str, Any]) -> str:
    """A short markdown summary of :func:`evaluate_unlearning` results."""
    best = results.get("best")
    exact = results.get("conventions", {}).get("saebench_exact")
    title = {True: "SAEBench-exact", False: "this project's conventions", None: "SAEBench"}[exact]
    which = "unmodified model" if best is None else "best"
    lines = [
        f"# Unlearning ({title})",
        "",
        *[f"> **Warning:** {w}\n" for w in results.get("warnings", [])],
        f"- unlearning score: **{results['unlearning_score']:.4f}**",
        "- best config: "
        + (
            "none (see the warning above)"
            if best is None
            else f"threshold {best['retain_threshold']}, n {best['n_features']}, multiplier {best['multiplier']}, "
            f"features {best['features']}"
        ),
        f"- WMDP-bio accuracy ({which}): {results['wmdp_acc_best']:.4f}",
        f"- MMLU accuracy ({which}, pooled): {results['mmlu_acc_best']:.4f}",
        "- questions kept / loaded: "
        + ", ".join(f"{n} {v['kept']}/{v['loaded']}" for n, v in results["n_questions"].items()),
        "",
        "| threshold | n | multiplier | features | WMDP acc | MMLU acc |",
        "|---|---|---|---|---|---|",
    ]
    for c in results["configs"]:
        lines.append(
            f"| {c['retain_threshold']} | {c['n_features']} | {c['multiplier']} | {len(c['features'])} | "
            + ("— | — |" if not c["features"] else f"{c['wmdp_accuracy']:.4f} | {c['mmlu_accuracy']:.4f} |")
        )
    return "\n".join(lines) + "\n"
