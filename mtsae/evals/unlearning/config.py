"""The settings of the unlearning evaluation: one dataclass for the callback and the command line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mtsae.evals.unlearning.mcq import MMLU_SOURCE, MMLU_SUBSETS, WMDP_BIO
from mtsae.evals.unlearning.selection import GridConfig

__all__ = ["UnlearningConfig", "UnlearningDuringTraining"]


@dataclass
class UnlearningConfig:
    """Settings of the unlearning evaluation (defaults: SAEBench's full run).

    One object serves the callback (``callbacks.Unlearning(config=...)``, YAML ``init_args.config``) and
    ``mtsae eval unlearning``, whose options are generated from these fields (``--forget-corpus``, ...).
    """

    forget_corpus: str | None = None
    """required: local path to the WMDP bio forget corpus (``bio-forget-corpus.jsonl``; gated: request
    access to ``cais/wmdp-bio-forget-corpus``), or a hub dataset you have access to"""
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
    model_name: str | None = None
    """the unlearning LM (e.g. ``google/gemma-2-2b-it`` for an SAE trained on ``gemma-2-2b``, as in
    SAEBench); None: the data source's model"""
    revision: str | None = None
    """revision of ``model_name`` (None: the source's revision when the model is the source's)"""
    model_dtype: str | None = None
    """dtype of the LM (``bfloat16``, ``float16``, ``float32``); None: the source's"""
    question_cache_dir: str | None = None
    """where filtered question sets are cached (None: beside the results)"""
    scoring: str = "letter"
    """``letter``: SAEBench's (the answer letter's probability after the lettered options); ``cloze``: the
    small-model mode (each choice's log-likelihood per character as the continuation of ``Question: ..
    \nAnswer:``; forget = ``forget_topic`` questions of ``question_file``, retain = the others; needs
    ``saebench_exact: false``); see ``docs/design.md`` §6"""
    question_file: str | None = None
    """cloze: a JSONL of questions (``question``, ``choices``, ``answer``, ``topic``), e.g.
    ``artifacts/smollm2/data/questions.jsonl`` from ``make smollm2``"""
    forget_topic: str = "biology"
    """cloze: the ``topic`` of the forget questions"""
    forget_heldout: str | None = None
    """held-out forget text (a local file or dataset with ``text_column``) for the text selectivity; None:
    not measured"""
    retain_heldout: str | None = None
    """held-out retain text for the text selectivity (needs ``forget_heldout``)"""
    n_selectivity_rows: int = 32
    """rows of ``seq_len`` tokens per held-out text for the text selectivity"""
    max_kept: int | None = None
    """score the grid on at most this many of the kept questions per set (a seeded sample after the
    filter, for a cheap run); None: all kept questions"""

    @property
    def rule(self) -> str:
        """The position rule in effect."""
        if self.position_rule is not None:
            return self.position_rule
        return "saebench" if self.saebench_exact else "special_tokens"

    def __post_init__(self) -> None:
        from mtsae.evals.unlearning.intervention import POSITION_RULES

        if self.position_rule is not None and self.position_rule not in POSITION_RULES:
            raise ValueError(f"position_rule must be one of {sorted(POSITION_RULES)} or None")
        if isinstance(self.grid, Mapping):  # from JSON / YAML
            self.grid = GridConfig(**self.grid)
        if self.scoring not in ("letter", "cloze"):
            raise ValueError(f"scoring must be 'letter' or 'cloze', got {self.scoring!r}")
        if self.scoring == "cloze" and self.saebench_exact:
            raise ValueError("scoring 'cloze' is not SAEBench's method: set saebench_exact to False")
        if self.scoring == "cloze" and not self.question_file:
            raise ValueError("scoring 'cloze' needs question_file (a JSONL of questions with a 'topic')")
        if bool(self.forget_heldout) != bool(self.retain_heldout):
            raise ValueError("the text selectivity needs both forget_heldout and retain_heldout (or neither)")
        for name in ("n_sparsity_rows", "llm_batch_size", "mcq_batch_size", "n_selectivity_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (BOS + one token), got {self.seq_len}")
        if self.max_kept is not None and self.max_kept < 1:
            raise ValueError(f"max_kept must be >= 1 or None, got {self.max_kept}")
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
class UnlearningDuringTraining(UnlearningConfig):
    """:class:`UnlearningConfig` with the cheaper defaults of the evaluation during training
    (``callbacks.Unlearning``): questions filtered on their original order only, at most 200 per set,
    128 sparsity rows, and this project's conventions (they work with the training model)."""

    all_perms: bool = False
    """keep questions answered correctly under all 24 orderings (SAEBench); False: original order only"""
    max_questions: int | None = 200
    """at most this many questions per set (a seeded random sample, before filtering); None: all"""
    n_sparsity_rows: int = 128
    """rows per corpus used for feature sparsities (SAEBench ``dataset_size``)"""
    mcq_batch_size: int = 16
    """prompts per forward when scoring questions"""
    saebench_exact: bool = False
    """SAEBench's conventions (needs an instruct ``model_name``); False: this project's (see
    :class:`UnlearningConfig`)"""
