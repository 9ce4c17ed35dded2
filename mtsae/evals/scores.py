"""SAEBench's core-eval scores and their per-token ingredients (``docs/design.md`` §6)::

ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)
kl_div_score  = (KL_zero - KL_sae) / KL_zero
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

__all__ = ["ce_loss_score", "kl_div_score", "kl_per_token", "next_token_ce"]


def _f(v: float | Tensor) -> float:
    return float(v.item()) if isinstance(v, Tensor) else float(v)


def ce_loss_score(ce_clean: float | Tensor, ce_sae: float | Tensor, ce_zero: float | Tensor) -> float:
    """SAEBench core: ``(CE_zero_abl - CE_sae) / (CE_zero_abl - CE_clean)``.

    1 when splicing the reconstruction costs nothing, 0 when it is as bad as zeroing the activations.
    Returns ``nan`` when zero-ablation does not change the loss (the score is undefined).
    """
    clean, sae, zero = _f(ce_clean), _f(ce_sae), _f(ce_zero)
    den = zero - clean
    return math.nan if den == 0 else (zero - sae) / den


def kl_div_score(kl_sae: float | Tensor, kl_zero: float | Tensor) -> float:
    """SAEBench core: ``(KL_zero_abl - KL_sae) / KL_zero_abl`` (KL from the clean next-token distribution).

    Returns ``nan`` when ``KL_zero_abl == 0``.
    """
    sae, zero = _f(kl_sae), _f(kl_zero)
    return math.nan if zero == 0 else (zero - sae) / zero


def next_token_ce(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Per-token next-token cross-entropy ``[B, T-1]`` from logits ``[B, T, V]`` and ids ``[B, T]``.

    Entry ``t`` is the loss of predicting token ``t+1`` at position ``t``. SAEBench averages it over
    positions whose *input* token ``t`` is not BOS/EOS/PAD, i.e. with mask ``valid[:, :-1]``.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
    return -logp.gather(-1, input_ids[:, 1:, None].long()).squeeze(-1)


def kl_per_token(ref_logits: Tensor, new_logits: Tensor) -> Tensor:
    """``KL(p_ref || p_new)`` per position ``[B, T]`` from logits ``[B, T, V]`` (SAEBench masks with ``valid``)."""
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    new = F.log_softmax(new_logits.float(), dim=-1)
    return (ref.exp() * (ref - new)).sum(-1)
