"""Which positions an SAE reads: the norm rule for activation sinks (``docs/design.md`` §3, "Activation sinks").

Some language models write "massive activations" (attention sinks) at ordinary token positions: in
SmolLM2-135M-Instruct's layer 20, 11 of 32,282 valid tokens of 256 cache rows (the first token after BOS
in rows that start mid-document) have L2 norms of 2,000-27,466 against a median of 237 and carry 63% of
the summed squared norm. With ``max_norm_multiple`` set, a valid position whose norm exceeds
``max_norm_multiple`` times the median norm of the valid positions of the same batch is treated like a
BOS/EOS/PAD position: zeroed before the encoder, left out of every loss, metric and average, and left
unmodified where the SAE is spliced into the model. :func:`ordinary_positions` is the one place that
decides it; training, validation, the core LM metrics, the unlearning evaluation, generation and the
feature dashboard call it (through :meth:`mtsae.MTSAE.valid_positions` or :func:`sae_valid_positions`);
the SAEBench wrapper (:mod:`mtsae.sae.saebench`) and the synthetic unlearning callback do not (SAEBench's
own code decides positions there; synthetic data has no sinks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_max_norm_multiple",
    "norm_median",
    "ordinary_positions",
    "sae_valid_positions",
    "valid_norms",
]


def check_max_norm_multiple(value: Any) -> float | None:
    """``value`` as a float, or ``None`` (the rule off); a clear ``ValueError`` unless finite and > 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"max_norm_multiple must be a number > 1 or null (off), got {value!r}")
    if not (math.isfinite(value) and value > 1):
        raise ValueError(
            f"max_norm_multiple must be a finite number > 1 (a multiple of the batch's median token norm) "
            f"or null (off), got {value!r}"
        )
    return float(value)


def valid_norms(x: Tensor, valid: Tensor) -> Tensor:
    """The L2 norms of ``x [..., d_in]`` at the finite ``valid`` positions, NaN elsewhere: ``[...]`` float.

    The values :func:`norm_median` takes the median of (a select, so a non-finite or invalid position
    never enters it, and no host sync)."""
    norms = x.float().norm(dim=-1)  # [...]
    return torch.where(valid & torch.isfinite(norms), norms, math.nan)


def norm_median(norms: Tensor) -> Tensor:
    """The median of the non-NaN ``norms`` (the lower middle value for an even count, like
    ``torch.median``), a 0-dim tensor; NaN when there is none (then :func:`ordinary_positions` drops
    nothing)."""
    return torch.nanmedian(norms.flatten())


def ordinary_positions(
    x: Tensor, valid: Tensor | None, max_norm_multiple: float | None, median: Tensor | None = None
) -> Tensor:
    """``valid`` without the activation sinks: ``[...]`` bool, for activations ``x [..., d_in]``.

    A valid position is dropped when its L2 norm exceeds ``max_norm_multiple`` times the median norm of
    the valid positions of the whole batch (``torch.median``: the lower middle value for an even count),
    or times ``median`` when given (KV-cached generation passes the median of every position so far:
    a decode step's batch holds one new token per row). Invalid positions never enter the median
    (whatever is stored there, an overflowed BOS included). Non-finite norms are kept, so the training's
    non-finite check still sees them. A median of 0 (more than half the valid positions are zero
    vectors) or none (no finite valid norm) drops nothing: there is no scale to measure a sink against,
    and against 0 every non-zero token would go. ``max_norm_multiple`` ``None`` returns ``valid``
    unchanged (all True when ``valid`` is ``None``). The rule is scale invariant: scaled and raw
    activations give the same mask. No host sync: the mask is computed on the device.
    """
    if valid is None:
        valid = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    else:
        valid = valid.to(device=x.device, dtype=torch.bool)
    if max_norm_multiple is None:
        return valid
    if valid.shape != x.shape[:-1]:
        raise ValueError(f"valid mask {tuple(valid.shape)} does not match activations {tuple(x.shape)}")
    norms = valid_norms(x, valid)  # [...]; NaN at invalid and non-finite positions
    if median is None:
        median = norm_median(norms)
    median = median.to(device=x.device, dtype=torch.float32)
    # NaN compares False: non-finite and invalid positions, and a NaN median, drop nothing
    return valid & ~((norms > max_norm_multiple * median) & (median > 0))


def sae_valid_positions(sae: Any, x: Tensor, valid: Tensor | None, median: Tensor | None = None) -> Tensor:
    """:func:`ordinary_positions` under ``sae.max_norm_multiple`` (an SAE without it: the rule off)."""
    return ordinary_positions(x, valid, getattr(sae, "max_norm_multiple", None), median)
