"""The unlearning evaluation's small-model mode: cloze scoring of questions and text selectivity.

A model below ~1B parameters answers letter-format questions at chance (SmolLM2-135M-Instruct scores
0.21-0.31 on MMLU subjects, and none survives the 24-ordering filter), so SAEBench's letter scoring
measures nothing on it. In cloze form it knows things (SciQ 0.71):

- :func:`score_cloze`: each choice ``c`` is scored as the continuation ``" " + c`` of the prompt
  ``"Question: {question}\\nAnswer:"`` (no chat template; the row starts with BOS as in training). The
  score is the summed log-likelihood of the continuation's tokens divided by its length in characters,
  the leading space included (the OLMo / lm-eval "rc" per-character normalisation, ``acc_per_char``).
  The prediction is the choice with the highest score. Prompt and continuation are tokenized separately
  and concatenated (as lm-eval does), so a choice's tokens never merge with ``Answer:``.
- :func:`filter_correct_cloze`: the questions the unmodified model answers correctly under that scoring.
- :func:`load_topic_questions`: a local JSONL of questions with a ``topic`` field, split into the forget
  set (``topic == forget_topic``) and the retain set (the rest).
- :func:`mean_text_ce` and :func:`text_selectivity`: the mean next-token cross-entropy on held-out forget
  text and held-out retain text with and without a clamp; selectivity = (CE increase on forget text)
  - (CE increase on retain text), in nats per token. Positive: the clamp hurts biology text more.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mtsae.evals.scores import next_token_ce
from mtsae.evals.unlearning.mcq import MCQDatasetError, MCQuestion, row_to_question
from mtsae.lm.loading import special_ids

__all__ = [
    "CLOZE_PROMPT",
    "ClozeScores",
    "cloze_requests",
    "filter_correct_cloze",
    "load_topic_questions",
    "mean_text_ce",
    "score_cloze",
    "text_selectivity",
]

#: the prompt a choice continues (OLMo / lm-eval "rc" format, zero-shot)
CLOZE_PROMPT = "Question: {question}\nAnswer:"

Intervention = Callable[[Tensor, Tensor], contextlib.AbstractContextManager]


class ClozeScores(NamedTuple):
    """Output of :func:`score_cloze` (one row per question, in input order; ``n_max`` = most choices)."""

    correct: Tensor
    """``[N]`` bool: the highest-scoring choice is the answer"""
    loglik: Tensor
    """``[N, n_max]`` float64: summed log-likelihood of each choice's tokens (``-inf`` past its choices)"""
    scores: Tensor
    """``[N, n_max]`` float64: ``loglik`` / characters of ``" " + choice`` (``-inf`` past its choices)"""
    answers: Tensor
    """``[N]`` int64: the correct choice index"""


def cloze_requests(tokenizer: Any, question: MCQuestion) -> list[tuple[list[int], int]]:
    """``[(ids, n_prompt)]`` per choice: ``[BOS] + prompt + continuation`` tokens and the prompt's length
    (BOS included), so the continuation is ``ids[n_prompt:]``."""
    bos = special_ids(tokenizer)[0]
    prompt = [
        bos,
        *tokenizer(CLOZE_PROMPT.format(question=question.question), add_special_tokens=False)["input_ids"],
    ]
    out = []
    for choice in question.choices:
        cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        if not cont:
            raise ValueError(f"question {question.index}: the choice {choice!r} has no tokens")
        out.append((prompt + list(cont), len(prompt)))
    return out


def _pad_id(tokenizer: Any) -> int:
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


@torch.no_grad()
def _continuation_logprobs(
    model: nn.Module,
    reqs: Sequence[tuple[list[int], int]],
    pad_id: int,
    batch_size: int,
    intervention: Intervention | None,
) -> list[Tensor]:
    """Per request ``(ids, n_prompt)``, ``log p(ids[t] | ids[:t])`` for the continuation ``t >= n_prompt``
    (float64, CPU). Batches sorted by length are left padded (position ids from the attention mask, so
    padding changes nothing), and only the last positions' logits are computed (``logits_to_keep``) and
    normalised: the vocabulary projection of the prompt is never needed."""
    device = next(model.parameters()).device
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    out: list[Tensor | None] = [None] * len(reqs)
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        t_max = max(len(reqs[i][0]) for i in idx)
        k = max(len(reqs[i][0]) - reqs[i][1] for i in idx) + 1  # positions predicting the continuations
        ids = torch.full((len(idx), t_max), pad_id, dtype=torch.long)  # [B, T], left padded
        mask = torch.zeros((len(idx), t_max), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(reqs[i][0])
            ids[row, t_max - n :] = torch.tensor(reqs[i][0], dtype=torch.long)
            mask[row, t_max - n :] = 1
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        kwargs = {"logits_to_keep": k} if keep_arg else {}
        ctx = intervention(ids, mask) if intervention is not None else contextlib.nullcontext()
        with ctx:
            logits = (
                model(
                    input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **kwargs
                )
                .logits[:, -k:-1]
                .double()
            )  # [B, k-1, V]: predictions of the last k-1 tokens (few: double precision is cheap)
        lse = torch.logsumexp(logits, dim=-1)  # [B, k-1]
        tok = (logits.gather(-1, ids[:, t_max - k + 1 :, None]).squeeze(-1) - lse).cpu()
        for row, i in enumerate(idx):
            n_cont = len(reqs[i][0]) - reqs[i][1]
            out[i] = tok[row, k - 1 - n_cont :]
    return out  # type: ignore[return-value]


def score_cloze(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    batch_size: int = 16,
    intervention: Intervention | None = None,
) -> ClozeScores:
    """Score questions in cloze form (see the module docstring), optionally under an intervention.

    Args:
        model: causal LM returning ``.logits``.
        tokenizer: its tokenizer (needs a BOS or an EOS token to start rows with).
        questions: any number of choices each.
        batch_size: sequences (question x choice) per forward.
        intervention: ``intervention(input_ids, attention_mask)`` returns a context manager entered
            around each forward (:class:`mtsae.evals.unlearning.intervention.ClampIntervention`).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n_max = max((len(q.choices) for q in questions), default=0)
    loglik = torch.full((len(questions), n_max), float("-inf"), dtype=torch.float64)
    scores = loglik.clone()
    reqs = [
        (qi, ci, r) for qi, q in enumerate(questions) for ci, r in enumerate(cloze_requests(tokenizer, q))
    ]
    logps = _continuation_logprobs(
        model, [r for _, _, r in reqs], _pad_id(tokenizer), batch_size, intervention
    )
    for (qi, ci, _), lp in zip(reqs, logps, strict=True):
        ll = float(lp.sum())  # the continuation's tokens: ids[n_prompt:]
        loglik[qi, ci] = ll
        scores[qi, ci] = ll / len(" " + questions[qi].choices[ci])
    answers = torch.tensor([q.answer for q in questions], dtype=torch.long)
    correct = scores.argmax(dim=-1) == answers if questions else torch.zeros(0, dtype=torch.bool)
    return ClozeScores(correct=correct, loglik=loglik, scores=scores, answers=answers)


def filter_correct_cloze(
    model: nn.Module, tokenizer: Any, questions: Sequence[MCQuestion], batch_size: int = 16
) -> list[MCQuestion]:
    """The questions the unmodified model answers correctly in cloze form."""
    if not questions:
        return []
    keep = score_cloze(model, tokenizer, questions, batch_size).correct.tolist()
    return [q for q, k in zip(questions, keep, strict=True) if k]


def load_topic_questions(
    path: str | Path, forget_topic: str = "biology", forget_name: str = "forget", retain_name: str = "retain"
) -> dict[str, list[MCQuestion]]:
    """``{forget_name: questions with topic == forget_topic, retain_name: the others}`` from a JSONL file
    of ``{"question", "choices", "answer", "topic"}`` rows (``make smollm2`` writes
    ``artifacts/smollm2/data/questions.jsonl``). ``index`` is the row in the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"question file {str(path)!r} does not exist (make smollm2 writes artifacts/smollm2/data/questions.jsonl)"
        )
    out: dict[str, list[MCQuestion]] = {forget_name: [], retain_name: []}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as err:
                raise MCQDatasetError(f"{path} row {i}: not a JSON object ({err})") from None
            if not isinstance(r, dict):
                raise MCQDatasetError(f"{path} row {i}: not a JSON object, got {type(r).__name__}")
            missing = {"question", "choices", "answer", "topic"} - set(r)
            if missing:
                raise MCQDatasetError(f"{path} row {i}: missing fields {sorted(missing)}")
            name = forget_name if r["topic"] == forget_topic else retain_name
            out[name].append(row_to_question(r, i, str(r["topic"]), str(path)))
    if not out[forget_name]:
        raise MCQDatasetError(f"{path}: no question has topic {forget_topic!r}")
    return out


@torch.no_grad()
def mean_text_ce(
    model: nn.Module,
    rows: Tensor,
    special: Sequence[int | None],
    batch_size: int = 8,
    intervention: Intervention | None = None,
) -> float:
    """Mean next-token cross-entropy (nats) over token rows ``[N, T]``; targets that are special tokens
    (BOS/EOS/PAD) are not counted.

    The per-token loss is the core metrics' (:func:`mtsae.evals.scores.next_token_ce`); the mask is not:
    SAEBench's CE-loss score skips the predictions made *at* a special token, this one the predictions
    *of* one (the first token after BOS or EOS counts here, predicting EOS does not)."""
    device = next(model.parameters()).device
    ids_special = torch.tensor([s for s in special if s is not None], dtype=torch.long)
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], batch_size):
        ids = rows[start : start + batch_size].to(device=device, dtype=torch.long)  # [B, T]
        mask = torch.ones_like(ids)
        ctx = intervention(ids, mask) if intervention is not None else contextlib.nullcontext()
        with ctx:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T, V]
        ce = next_token_ce(logits, ids)  # [B, T-1]: the loss of predicting ids[:, 1:]
        keep = ~torch.isin(ids[:, 1:], ids_special.to(device))
        total += float(ce[keep].double().sum())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("no token to score: every target is a special token")
    return total / count


def text_selectivity(clean: dict[str, float], clamped: dict[str, float]) -> dict[str, float]:
    """CE increases under a clamp and the selectivity from ``{"forget": ce, "retain": ce}`` pairs."""
    d_forget = clamped["forget"] - clean["forget"]
    d_retain = clamped["retain"] - clean["retain"]
    return {
        "ce_forget": clamped["forget"],
        "ce_retain": clamped["retain"],
        "ce_increase_forget": d_forget,
        "ce_increase_retain": d_retain,
        "text_selectivity": d_forget - d_retain,
    }
