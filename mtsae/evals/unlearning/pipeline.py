"""SAEBench's unlearning evaluation end to end (Farrell et al. 2024), from the building blocks in
:mod:`mtsae.evals.unlearning.intervention` and :mod:`mtsae.evals.unlearning.mcq`. Settings:
:mod:`.config`; what is read before any model runs: :mod:`.corpora`; outputs: :mod:`.report`; the entry
point that runs these steps for the command and the callback: :mod:`.run`.

1. :func:`load_unlearning_data`: the forget corpus (the WMDP bio forget corpus, a gated file the user
   supplies as a local path), the retain corpus (``wikitext`` / ``wikitext-2-raw-v1`` test, or a local
   file), both packed into rows of ``[BOS] + seq_len - 1`` tokens (documents joined with EOS, rows
   shuffled, the first ``n_sparsity_rows`` kept), and the MCQ sets (WMDP-bio and four MMLU subsets);
2. :func:`filter_questions`: keep the questions the unmodified model answers correctly (all 24 orderings
   for full runs, the original order only as the cheap setting), cached on disk per model and settings
   (it does not depend on the SAE);
3. :func:`evaluate_unlearning`: feature sparsities on both corpora, feature selection per retain
   threshold, and for every grid point the clamping intervention at layer ``L``
   (:class:`mtsae.evals.unlearning.intervention.ClampIntervention`) while scoring all MCQ sets; then the unlearning score
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
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtsae.evals.sparsity import SparsityAccumulator
from mtsae.evals.unlearning.cloze import filter_correct_cloze, mean_text_ce, score_cloze, text_selectivity
from mtsae.evals.unlearning.config import UnlearningConfig
from mtsae.evals.unlearning.corpora import (
    WMDP_NAME,
    UnlearningData,
)
from mtsae.evals.unlearning.intervention import ClampIntervention, valid_token_mask
from mtsae.evals.unlearning.mcq import (
    MCQuestion,
    filter_correct,
    score_mcq,
    special_token_ids,
)
from mtsae.evals.unlearning.report import max_text_selectivity
from mtsae.evals.unlearning.selection import select_features, unlearning_score
from mtsae.lm.hooks import capture_resid_post
from mtsae.sae.positions import sae_valid_positions

__all__ = ["evaluate_unlearning", "feature_sparsities", "filter_questions", "questions_cache_key"]

log = logging.getLogger(__name__)


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
    from mtsae.progress import track

    W_dec = sae.W_dec  # [d_sae, d_in]
    acc = SparsityAccumulator(W_dec.shape[0])
    device = next(model.parameters()).device
    for start in track(range(0, rows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        ids = rows[start : start + batch_size].to(device)  # [B, T]
        valid = valid_token_mask(ids, None, special_ids)  # [B, T]
        with torch.inference_mode():
            h = capture_resid_post(model, layer, ids)  # [B, T, d]
            x = h.to(device=W_dec.device, dtype=W_dec.dtype)
            valid = sae_valid_positions(sae, x, valid)  # less the activation sinks (max_norm_multiple)
            f = sae.encode(x, valid)  # [B, T, d_sae]
            acc.update(f.cpu(), valid.cpu())
    return acc


# ---------------------------------------------------------------------------------------------- filtering
def questions_cache_key(questions: Mapping[str, Sequence[MCQuestion]], **settings: Any) -> str:
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
    config: UnlearningConfig,
    *,
    cache_dir: str | Path | None = None,
    model_id: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, list[MCQuestion]]:
    """Questions the unmodified model answers correctly (:func:`mtsae.evals.unlearning.mcq.filter_correct`), per set.

    The prompt format and the letter rule come from ``config`` (``chat_template``, ``saebench_exact``), as
    in :func:`evaluate_unlearning`, which scores the kept questions with the same ``config``; orderings
    (``all_perms``) and batch size (``mcq_batch_size``) too. With ``cache_dir``, the kept question indices
    are stored in ``<cache_dir>/filtered_<hash>.json``, keyed by the questions, ``model_id`` (what
    identifies the model: name, revision, dtype, trust_remote_code) and those settings, and reused on the
    next call.

    ``config.scoring == "cloze"``: the questions answered correctly in cloze form
    (:func:`mtsae.evals.unlearning.cloze.filter_correct_cloze`, the original order; ``all_perms``,
    ``chat_template`` and the letter rule do not apply).
    """
    from mtsae.progress import track

    strict_letters, scoring = config.saebench_exact, config.scoring
    settings: dict[str, Any] = {"all_perms": config.all_perms, "chat_template": config.chat_template}
    if not strict_letters:  # keys of caches written before the setting existed stay valid
        settings["strict_letters"] = False
    if scoring != "letter":  # cloze: the choices' log-likelihoods, original order (all_perms ignored)
        settings = {"scoring": scoring}
    key = questions_cache_key(questions, model=dict(model_id or {}), **settings)
    path = None if cache_dir is None else Path(cache_dir) / f"filtered_{key}.json"
    if path is not None and path.exists():
        kept_idx = {n: set(v) for n, v in json.loads(path.read_text())["kept"].items()}
        log.info("filtered questions read from %s", path)
        return {n: [q for q in qs if q.index in kept_idx[n]] for n, qs in questions.items()}
    kept: dict[str, list[MCQuestion]] = {}
    for name, qs in track(questions.items(), desc="filter questions", disable=not progress, leave=False):
        if scoring == "cloze":
            kept[name] = filter_correct_cloze(model, tokenizer, qs, config.mcq_batch_size)
            log.info(
                "kept %d / %d %s questions answered correctly in cloze form", len(kept[name]), len(qs), name
            )
            continue
        kept[name] = filter_correct(
            model,
            tokenizer,
            qs,
            all_perms=config.all_perms,
            batch_size=config.mcq_batch_size,
            chat_template=config.chat_template,
            strict_letters=strict_letters,
        )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "model": dict(model_id or {}),
            "all_perms": config.all_perms,
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
    mmlu_names = _check_filtered(filtered)
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

    heldout = None
    if data.forget_heldout_rows is not None and data.retain_heldout_rows is not None:
        heldout = {"forget": data.forget_heldout_rows, "retain": data.retain_heldout_rows}
    scorer = _GridScorer(model, tokenizer, layer, sae, special, filtered, cfg, heldout)
    base = scorer.counts((), 0.0)
    configs = _grid_rows(scorer, selected, mmlu_names, cfg, progress)
    score_value, best, warnings = _best_config(configs, cfg)
    if not any(c["features"] for c in configs):
        warnings.append(_no_eligible_message(forget_sp, retain_sp, cfg.grid.retain_thresholds))
    for w in warnings:
        log.warning("unlearning: %s", w)
    baseline = {
        "wmdp_accuracy": _acc(base[WMDP_NAME]),
        "mmlu_accuracy": _pooled({n: base[n] for n in mmlu_names}),
    }
    base_ce = scorer.text_ce((), 0.0)
    if base_ce is not None:
        baseline.update(ce_forget=base_ce["forget"], ce_retain=base_ce["retain"])
    best_keys = ("retain_threshold", "n_features", "multiplier", "features", "wmdp_accuracy", "mmlu_accuracy")
    if base_ce is not None:
        best_keys += ("ce_increase_forget", "ce_increase_retain", "text_selectivity")
    chosen = baseline if best is None else best  # no best config: doing nothing is best
    return {
        "unlearning_score": float(score_value),
        # the best grid point's text selectivity (None: no held-out text, or no best point)
        "text_selectivity_best": None if best is None else best.get("text_selectivity"),
        # the largest over the grid points that clamp features (None: no held-out text, or no such
        # point): defined whether or not a point keeps retain accuracy, so it compares across SAEs
        "text_selectivity_max": max_text_selectivity(configs),
        "scoring": cfg.scoring,
        "wmdp_acc_best": float(chosen["wmdp_accuracy"]),
        "mmlu_acc_best": float(chosen["mmlu_accuracy"]),
        "best": None if best is None else {k: best[k] for k in best_keys},
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
        "kept_questions": {n: [q.index for q in qs] for n, qs in filtered.items()},
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
            # the activation-sink rule (mtsae.sae.positions): sink positions are neither counted nor clamped
            "max_norm_multiple": getattr(sae, "max_norm_multiple", None),
        },
        "special_ids": special,
        "settings": asdict(cfg),
    }


def _check_filtered(filtered: Mapping[str, Sequence[MCQuestion]]) -> list[str]:
    """The MMLU set names; ``ValueError`` if no WMDP or no MMLU question survived the filtering."""
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
    return mmlu_names


class _GridScorer:
    """Correct / total per question set, and the mean CE on held-out text, under the clamp of
    ``features`` at ``multiplier`` (memoised: grid points that select the same features share their
    scoring; no features = the unmodified model)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        layer: int,
        sae: nn.Module,
        special: Sequence[int | None],
        filtered: Mapping[str, Sequence[MCQuestion]],
        cfg: UnlearningConfig,
        heldout: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.layer, self.sae, self.special = model, tokenizer, layer, sae, special
        self.filtered, self.cfg, self.heldout = filtered, cfg, heldout
        self._memo: dict[tuple, dict[str, dict[str, int]]] = {}
        self._ce_memo: dict[tuple, dict[str, float]] = {}

    def _intervention(self, features: tuple[int, ...], multiplier: float) -> ClampIntervention | None:
        if not features:
            return None
        return ClampIntervention(
            self.model,
            self.layer,
            self.sae,
            list(features),
            multiplier,
            self.special,
            position_rule=self.cfg.rule,
        )

    def _correct(self, qs: Sequence[MCQuestion], iv: ClampIntervention | None) -> Tensor:
        cfg = self.cfg
        if cfg.scoring == "cloze":
            return score_cloze(self.model, self.tokenizer, qs, cfg.mcq_batch_size, iv).correct
        return score_mcq(
            self.model,
            self.tokenizer,
            qs,
            cfg.mcq_batch_size,
            iv,
            chat_template=cfg.chat_template,
            strict_letters=cfg.saebench_exact,
        ).correct

    def counts(self, features: tuple[int, ...], multiplier: float) -> dict[str, dict[str, int]]:
        key = (features, multiplier) if features else ()
        if key not in self._memo:
            iv = self._intervention(features, multiplier)
            self._memo[key] = {
                name: _counts(self._correct(qs, iv)) if qs else {"correct": 0, "total": 0}
                for name, qs in self.filtered.items()
            }
        return self._memo[key]

    def text_ce(self, features: tuple[int, ...], multiplier: float) -> dict[str, float] | None:
        """Mean CE on the held-out ``forget`` and ``retain`` rows under the clamp (None: no held-out text)."""
        if self.heldout is None:
            return None
        key = (features, multiplier) if features else ()
        if key not in self._ce_memo:
            iv = self._intervention(features, multiplier)
            self._ce_memo[key] = {
                k: mean_text_ce(self.model, rows, self.special, self.cfg.llm_batch_size, iv)
                for k, rows in self.heldout.items()
            }
        return self._ce_memo[key]


def _grid_rows(
    scorer: _GridScorer,
    selected: Mapping[float, Tensor],
    mmlu_names: Sequence[str],
    cfg: UnlearningConfig,
    progress: bool,
) -> list[dict[str, Any]]:
    """One row per grid point: its features, per-set counts and accuracies."""
    from mtsae.progress import track

    configs = []
    for point in track(cfg.grid.points(), desc="unlearning grid", disable=not progress, leave=False):
        feats = tuple(int(i) for i in selected[point.retain_threshold][: point.n_features].tolist())
        counts = scorer.counts(feats, point.multiplier)
        mmlu = {n: counts[n] for n in mmlu_names}
        row = {
            **point._asdict(),
            "features": list(feats),
            "wmdp": counts[WMDP_NAME],
            "mmlu": mmlu,
            "wmdp_accuracy": _acc(counts[WMDP_NAME]),
            "mmlu_accuracy": _pooled(mmlu),
            "mmlu_accuracy_per_subset": {n: _acc(c) for n, c in mmlu.items()},
        }
        ce = scorer.text_ce(feats, point.multiplier)
        if ce is not None:
            row.update(text_selectivity(scorer.text_ce((), 0.0), ce))
        if not feats:
            row["skipped"] = "no eligible feature at this retain threshold: nothing was clamped"
        configs.append(row)
    return configs


def _best_config(
    configs: list[dict[str, Any]], cfg: UnlearningConfig
) -> tuple[float, dict[str, Any] | None, list[str]]:
    """``(score, best grid row or None, warnings)`` over the rows that clamp something."""
    with_features = [c for c in configs if c["features"]]
    if not with_features:
        return 0.0, None, []
    score_value, best = unlearning_score(with_features, cfg.grid.min_mmlu_accuracy)
    warnings = []
    if best is None:
        top = max(with_features, key=lambda c: c["mmlu_accuracy"])
        warnings.append(
            f"no grid point keeps pooled MMLU accuracy >= {cfg.grid.min_mmlu_accuracy} (the highest is "
            f"{top['mmlu_accuracy']:.4f}, at threshold {top['retain_threshold']}, n {top['n_features']}, "
            f"multiplier {top['multiplier']}): the score is 0 and there is no best config; try smaller "
            "multipliers, fewer features (--n-features) or a lower retain threshold"
        )
    return score_value, best, warnings


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
