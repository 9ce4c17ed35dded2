"""SAEBench's core LM metrics: splice the SAE reconstruction into the LM and measure the damage.

For held-out token sequences, three forward passes of a Hugging Face causal LM:

- **clean**: the model as it is;
- **SAE**: the output of decoder layer ``L`` (resid_post) replaced by the SAE reconstruction;
- **zero**: that output replaced by zeros (the reference ablation).

From them: next-token cross-entropy ``CE_clean``, ``CE_sae``, ``CE_zero``, ``KL(p_clean || p_sae)`` and
``KL(p_clean || p_zero)``, and the scores (:func:`mtsae.evals.scores.ce_loss_score`,
:func:`mtsae.evals.scores.kl_div_score`)::

    ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)
    kl_div_score  = (KL_zero - KL_sae) / KL_zero

Special tokens (BOS / EOS / PAD) are handled as SAEBench's ``exclude_special_tokens_from_reconstruction
= True``: at those positions the original activation is kept (neither reconstructed nor zeroed) and
they are left out of the averages (CE at position ``t`` counts iff input token ``t`` is valid; KL at
``t`` iff token ``t`` is valid). **ours**: the zero ablation also keeps the original activation at the
special positions (SAELens zeroes every position), so both interventions touch the same tokens.

The SAE acts on raw activations: an exported SAE (``export_sae()``, :func:`mtsae.load_sae`) or, during
training, ``SAEModule.raw_sae`` (:class:`mtsae.sae.scale.ScaledSAE`, the module's SAE seen from raw
activations, without a copy; :func:`mtsae.load_sae`). This lets a callback use the module's SAE as it trains, without a copy.

:func:`core_lm_metrics` returns *sums and counts* (float64 tensors), so that results can be summed
across DDP ranks before :func:`finalize_core_metrics` turns them into means and scores.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtsae.evals.scores import ce_loss_score, kl_div_score, kl_per_token, next_token_ce
from mtsae.evals.unlearning.intervention import valid_token_mask
from mtsae.lm.hooks import splice_resid_post
from mtsae.lm.loading import model_dtype
from mtsae.sae.positions import sae_valid_positions

__all__ = [
    "CoreConfig",
    "CORE_SUM_KEYS",
    "core_lm_metrics",
    "finalize_core_metrics",
    "validation_tokens",
]

log = logging.getLogger(__name__)


@dataclass
class CoreConfig:
    """Settings of the core LM metrics: one object for ``callbacks.CoreLMMetrics(config=...)`` and the
    options of ``mtsae eval core``."""

    n_sequences: int = 64
    """validation sequences run through the LM (split across ranks)"""
    batch_size: int = 8
    """sequences per LM forward (three forwards per batch)"""
    model_dtype: str | None = None
    """dtype of the LM (bfloat16, float16, float32); None: the data source's"""

    def __post_init__(self) -> None:
        if self.n_sequences < 1 or self.batch_size < 1:
            raise ValueError(
                f"n_sequences and batch_size must be >= 1, got {self.n_sequences}, {self.batch_size}"
            )
        if self.model_dtype is not None:
            model_dtype(self.model_dtype, "model_dtype")


#: keys of the sums returned by :func:`core_lm_metrics` (all float64 scalars; sum them across ranks)
CORE_SUM_KEYS = ("ce_clean", "ce_sae", "ce_zero", "n_ce", "kl_sae", "kl_zero", "n_kl")


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _sae_param(sae: nn.Module) -> Tensor:
    p = next(sae.parameters(), None)
    if p is None:
        raise ValueError("the SAE has no parameters (cannot tell its device and dtype)")
    return p


@torch.no_grad()
def core_lm_metrics(
    model: nn.Module,
    sae: nn.Module,
    layer: int,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    special_ids: Sequence[int | None],
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Sums of CE losses and KL divergences over ``input_ids`` for clean / SAE-spliced / zero-ablated runs.

    Args:
        model: Hugging Face causal LM returning ``.logits``.
        sae: SAE called as ``sae(x, valid)`` returning an object with ``.x_hat`` (e.g.
            :class:`mtsae.MTSAE`) on raw activations (see the module docstring). For an MTSAE
            the encoder sees the whole row, with the special positions masked out.
        layer: decoder layer whose output (resid_post) is replaced.
        input_ids: ``[N, T]`` token ids of the held-out rows.
        attention_mask: ``[N, T]`` (1 = attended) or ``None`` (all attended).
        special_ids: BOS / EOS / PAD ids: those positions keep their activation and are not averaged;
            nor are the activation sinks of the SAE's ``max_norm_multiple`` (:mod:`mtsae.sae.positions`).
        batch_size: rows per forward pass (three forwards per batch).
        progress: show a progress bar over batches.

    Returns:
        float64 scalar tensors (on CPU) keyed by :data:`CORE_SUM_KEYS`: ``ce_*`` are sums of per-token
        next-token CE over ``n_ce`` positions, ``kl_*`` sums of ``KL(p_clean || p_*)`` over ``n_kl``
        positions. Sum them across ranks, then call :func:`finalize_core_metrics`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, T], got {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError("next-token CE needs rows of at least 2 tokens")
    from mtsae.progress import track

    dev = _device(model)
    p = _sae_param(sae)
    sums = {k: torch.zeros((), dtype=torch.float64) for k in CORE_SUM_KEYS}
    starts = range(0, input_ids.shape[0], batch_size)
    for start in track(starts, desc="core LM metrics", unit="batch", disable=not progress, leave=False):
        ids = input_ids[start : start + batch_size].to(device=dev, dtype=torch.long)  # [B, T]
        mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(dev)
        valid = valid_token_mask(ids, mask, special_ids)  # [B, T]
        kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        seen: list[Tensor] = []

        def read(h: Tensor, seen: list[Tensor] = seen) -> Tensor:  # layer L's output, unchanged
            seen.append(h)
            return h

        with splice_resid_post(model, layer, read):
            clean = model(**kw).logits  # [B, T, V]
        # activation sinks (the SAE's max_norm_multiple) keep their activation and are not averaged
        valid = sae_valid_positions(sae, seen.pop(), valid)
        keep = valid.unsqueeze(-1)  # [B, T, 1]

        def reconstruct(h: Tensor, valid: Tensor = valid, keep: Tensor = keep) -> Tensor:  # [B, T, d]
            x = h.to(device=p.device, dtype=p.dtype)
            x_hat = sae(x, valid.to(p.device)).x_hat  # [B, T, d]
            return torch.where(keep, x_hat.to(device=h.device, dtype=h.dtype), h)

        def zero(h: Tensor, keep: Tensor = keep) -> Tensor:
            return torch.where(keep, torch.zeros_like(h), h)

        v_ce, v_kl = valid[:, :-1], valid  # CE at t predicts t+1 from input token t
        sums["ce_clean"] += next_token_ce(clean, ids)[v_ce].double().sum().cpu()
        for name, fn in (("sae", reconstruct), ("zero", zero)):
            with splice_resid_post(model, layer, fn):
                logits = model(**kw).logits  # [B, T, V]
            sums[f"ce_{name}"] += next_token_ce(logits, ids)[v_ce].double().sum().cpu()
            sums[f"kl_{name}"] += kl_per_token(clean, logits)[v_kl].double().sum().cpu()
            del logits
        sums["n_ce"] += v_ce.sum().cpu()
        sums["n_kl"] += v_kl.sum().cpu()
        del clean
    return sums


def validation_tokens(
    cache: Any, n_sequences: int, rank: int = 0, world_size: int = 1, progress: bool = False
) -> Tensor:
    """Token ids ``[n, T]`` of the first ``n_sequences`` validation rows of an activation cache
    (``data.ActivationCache``), this rank's share under DDP (rows ``rank::world_size``)."""
    from mtsae.progress import track

    rows = cache.rows("val")[:n_sequences][rank::world_size]
    chunks = range(0, len(rows), 64)
    return torch.cat(
        [
            cache.read(rows[i : i + 64])["tokens"].long()
            for i in track(chunks, desc="read tokens", disable=not progress, leave=False)
        ]
    )  # [n, T]


def finalize_core_metrics(sums: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Means and scores from (rank-summed) :func:`core_lm_metrics` sums.

    Returns ``ce_loss_clean``, ``ce_loss_sae``, ``ce_loss_zero``, ``kl_div_sae``, ``kl_div_zero``,
    ``ce_loss_score``, ``kl_div_score`` and ``n_tokens`` (the CE positions). Scores are ``nan`` when
    undefined (zero ablation changes nothing).

    Raises:
        ValueError: if a key is missing or no position was valid.
    """
    missing = set(CORE_SUM_KEYS) - set(sums)
    if missing:
        raise ValueError(f"missing sums {sorted(missing)}")
    s = {k: float(sums[k]) for k in CORE_SUM_KEYS}
    if s["n_ce"] <= 0 or s["n_kl"] <= 0:
        raise ValueError("core LM metrics are undefined: no valid (non-special) token was seen")
    ce = {k: s[f"ce_{k}"] / s["n_ce"] for k in ("clean", "sae", "zero")}
    kl = {k: s[f"kl_{k}"] / s["n_kl"] for k in ("sae", "zero")}
    return {
        "ce_loss_score": ce_loss_score(ce["clean"], ce["sae"], ce["zero"]),
        "kl_div_score": kl_div_score(kl["sae"], kl["zero"]),
        "ce_loss_clean": ce["clean"],
        "ce_loss_sae": ce["sae"],
        "ce_loss_zero": ce["zero"],
        "kl_div_sae": kl["sae"],
        "kl_div_zero": kl["zero"],
        "n_tokens": s["n_ce"],
    }
