"""The data of a feature dashboard: one streaming pass over the activations, then the example rows only.

1. **Pass** (:func:`collect_dashboard`): every row of the split is read and encoded once, in batches of
   about ``batch_tokens`` tokens; :class:`mtsae.features.stats.FeatureStats` keeps, per feature, the top
   sequences (by their maximum), a uniform sample of the firing sequences, the activation histogram and
   the firing count. Memory is ``O(features x (n_top + n_sample + n_bins))`` plus one batch of codes;
   time is linear in tokens (``bench/bench_features.py``).
2. **Examples**: the rows holding a kept example (the top ones and, from the sample, the sequences at
   the ``quantiles`` of the firing sequences' maxima) are read again and encoded, and each example's
   window (``context_before`` tokens before its maximum, ``context_after`` after) is cut out with the
   feature's activation on every token; for an MTSAE, the context attribution at the maximum
   (:mod:`mtsae.features.attribution`).
3. **Decoder side**: for a language model, the most promoted / suppressed output tokens
   (:mod:`mtsae.features.logits`); with ground truth (synthetic data), the true feature whose direction
   is closest to the decoder row, its cosine and its timescale group.

Everything is returned as plain JSON-able dicts for :mod:`mtsae.features.site`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtsae.features.attribution import ContextAttribution, context_attribution
from mtsae.features.stats import FeatureStats, FeatureStatsResult
from mtsae.progress import track
from mtsae.sae.positions import sae_valid_positions

__all__ = ["FeaturesConfig", "DashboardTruth", "collect_dashboard", "select_features", "stream_stats"]

log = logging.getLogger("mtsae.features")


@dataclass
class FeaturesConfig:
    """Settings of ``mtsae features``: what the dashboard keeps per feature and how the pass is batched."""

    n_top: int = 12
    """top-activating sequences shown per feature (one example per sequence, at its maximum)"""
    quantiles: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75])
    """quantiles of the firing sequences' maxima from which one example each is shown (lower activations)"""
    n_sample: int = 64
    """firing sequences kept per feature as a uniform sample (the quantile examples are drawn from it)"""
    n_bins: int = 64
    """bins of the activation histogram (a power of two; between half and all of them are filled)"""
    context_before: int = 24
    """tokens shown before an example's maximum"""
    context_after: int = 4
    """tokens shown after an example's maximum"""
    n_logits: int = 10
    """promoted and suppressed output tokens shown per feature (language models)"""
    batch_tokens: int = 2048
    """tokens encoded per batch (memory: a few batch_tokens x d_sae floats: 128 MB each at 16k features)"""
    split: str = "val"
    """cache split to read: val, train or all"""
    max_rows: int | None = None
    """read at most this many rows of the split (None: all of it)"""
    seed: int = 0
    """seed of the sample of firing sequences and of --features sample:N"""

    def __post_init__(self) -> None:
        if self.n_top < 1 or self.n_sample < 1:
            raise ValueError(f"n_top and n_sample must be >= 1, got {self.n_top}, {self.n_sample}")
        if not all(0 <= q <= 1 for q in self.quantiles):
            raise ValueError(f"quantiles must be in [0, 1], got {self.quantiles}")
        if self.n_bins < 2 or self.n_bins & (self.n_bins - 1):
            raise ValueError(f"n_bins must be a power of two >= 2, got {self.n_bins}")
        if self.context_before < 0 or self.context_after < 0:
            raise ValueError("context_before and context_after must be >= 0")
        if self.batch_tokens < 1 or self.n_logits < 0:
            raise ValueError("batch_tokens must be >= 1 and n_logits >= 0")
        if self.split not in ("val", "train", "all"):
            raise ValueError(f"split must be val, train or all, got {self.split!r}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {self.max_rows}")


@dataclass
class DashboardTruth:
    """Planted features of a synthetic source, for matching decoder rows to them."""

    features: Tensor
    """``[n_true, d_in]`` true directions"""
    group_index: Tensor
    """``[n_true]`` timescale group of each"""
    group_names: list[str]
    """name of each group"""
    group_spans: list[float] | None = None
    """mean "on" span (tokens) of each group, if known"""
    coefficients: Callable[[np.ndarray], np.ndarray] | None = None
    """rows -> per-token coefficients ``[n, T, n_true]`` of the true features (shown under the examples)"""


_SPEC = re.compile(r"^(\d+)(?:-(\d+))?$")


def select_features(spec: Sequence[str] | None, d_sae: int, seed: int = 0) -> Tensor:
    """Feature ids from ``--features``: ids and ranges (``3 10-19``), ``sample:N`` (N at random) or
    ``first:N``; ``None`` or empty: all. A ``ValueError`` names the bad entry."""
    if not spec:
        return torch.arange(d_sae)
    ids: list[int] = []
    for item in spec:
        for part in str(item).replace(",", " ").split():
            kind, _, n = part.partition(":")
            if kind in ("sample", "first") and n.isdigit() and int(n) >= 1:
                k = min(int(n), d_sae)
                if kind == "first":
                    ids += range(k)
                else:
                    gen = torch.Generator().manual_seed(seed)
                    ids += torch.randperm(d_sae, generator=gen)[:k].sort().values.tolist()
                continue
            m = _SPEC.match(part)
            if m is None:
                raise ValueError(
                    f"--features: cannot read {part!r}; give ids (3 17), ranges (10-19), sample:N or first:N"
                )
            lo, hi = int(m[1]), int(m[2] or m[1])
            if hi < lo or hi >= d_sae:
                raise ValueError(f"--features: {part!r} is not within the SAE's features 0-{d_sae - 1}")
            ids += range(lo, hi + 1)
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


def _batches(rows: np.ndarray, per_batch: int) -> list[np.ndarray]:
    return [rows[i : i + per_batch] for i in range(0, len(rows), per_batch)]


def stream_stats(
    sae, read_rows, rows: np.ndarray, features: Tensor, cfg: FeaturesConfig, device, progress: bool
) -> FeatureStatsResult:
    """Step 1 of the module docstring: encode ``rows`` in batches and keep :class:`FeatureStats` of
    ``features``."""
    first = read_rows(rows[:1])
    T = int(first["acts"].shape[1])
    stats = FeatureStats(features, cfg.n_top, cfg.n_sample, cfg.n_bins, cfg.seed, device)
    batches = _batches(rows, max(1, cfg.batch_tokens // T))
    for chunk in track(batches, desc="features: pass", unit="batch", disable=not progress):
        data = read_rows(chunk)
        x, valid = data["acts"].to(device).float(), data["valid"].to(device)
        valid = sae_valid_positions(sae, x, valid)  # less the activation sinks (max_norm_multiple)
        stats.update(sae.encode(x, valid), valid, torch.from_numpy(chunk))
    return stats.result()


def _pick_examples(res: FeatureStatsResult, cfg: FeaturesConfig) -> list[tuple[int, int, int, str]]:
    """``(feature column, row, pos, kind)`` of every example to show: top ones, then one per quantile."""
    out = []
    for j in range(len(res.features)):
        top = [(int(r), int(p)) for r, p in zip(res.top_rows[j], res.top_pos[j], strict=True) if r >= 0]
        out += [(j, r, p, "top") for r, p in top]
        ok = res.sample_rows[j] >= 0
        vals, srows, spos = res.sample_values[j][ok], res.sample_rows[j][ok], res.sample_pos[j][ok]
        if not len(vals):
            continue
        order = vals.argsort()
        seen = {r for r, _ in top}
        for q in cfg.quantiles:
            i = int(order[round(q * (len(order) - 1))])
            r = int(srows[i])
            if r not in seen:  # a quantile example that is also a top one is shown once
                seen.add(r)
                out.append((j, r, int(spos[i]), f"q{round(100 * q)}"))
    return out


def _examples(
    sae,
    read_rows,
    picks: list[tuple[int, int, int, str]],
    features: Tensor,
    cfg: FeaturesConfig,
    device,
    truth_match: Tensor | None,
    truth: DashboardTruth | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """Window, activations, tokens and attribution of every picked example (rows read in order)."""
    if not picks:
        return []
    rows = np.array(sorted({r for _, r, _, _ in picks}), dtype=np.int64)
    by_row: dict[int, list[int]] = {}
    for e, (_, r, _, _) in enumerate(picks):
        by_row.setdefault(r, []).append(e)
    out: list[dict[str, Any]] = [{} for _ in picks]
    per_batch = max(1, cfg.batch_tokens // int(read_rows(rows[:1])["acts"].shape[1]))
    rf = int(getattr(sae, "receptive_field", 1))
    for chunk in track(
        _batches(rows, per_batch), desc="features: examples", unit="batch", disable=not progress
    ):
        data = read_rows(chunk)
        x, stored, tokens = data["acts"].to(device).float(), data["valid"].to(device), data["tokens"]
        valid = sae_valid_positions(sae, x, stored)
        sink = stored.bool() & ~valid  # [b, T]: ordinary tokens the activation-sink rule leaves out
        f = sae.encode(x, valid)  # [b, T, d_sae]
        T = x.shape[1]
        coef = truth.coefficients(chunk) if truth is not None and truth.coefficients is not None else None
        idx = [(b, e) for b, r in enumerate(chunk.tolist()) for e in by_row[r]]
        b_idx = torch.tensor([b for b, _ in idx], device=device)
        e_idx = [e for _, e in idx]
        col = torch.tensor([picks[e][0] for e in e_idx], device=device)
        pos = torch.tensor([picks[e][2] for e in e_idx], device=device)
        feat = features.to(device)[col]
        attr = _attribution(sae, x, valid, b_idx, pos, feat, rf)
        for n, e in enumerate(e_idx):
            j, r, p, kind = picks[e]
            b = int(b_idx[n])
            lo, hi = max(0, p - cfg.context_before), min(T, p + cfg.context_after + 1)
            ex: dict[str, Any] = {
                "kind": kind,
                "row": r,
                "pos": p,
                "start": lo,
                "acts": [round(float(a), 4) for a in f[b, lo:hi, int(feat[n])].tolist()],
                "tokens": [int(t) for t in tokens[b, lo:hi].tolist()],
                "valid": [bool(v) for v in valid[b, lo:hi].tolist()],
            }
            if bool(sink[b, lo:hi].any()):
                ex["sink"] = [bool(v) for v in sink[b, lo:hi].tolist()]
            if attr is not None:
                ex["attr"] = {
                    "self": [round(float(a), 4) for a in attr.self_part[n].tolist()],
                    "context": [round(float(a), 4) for a in attr.context[n].tolist()],
                    "bias": round(float(attr.bias[n]), 4),
                    "pre": round(float(attr.pre[n]), 4),
                    "act": round(float(attr.act[n]), 4),
                    "ablated": round(float(attr.ablated[n]), 4),
                    "context_share": round(float(attr.context_share[n]), 4),
                }
            if coef is not None and truth_match is not None:
                tj = int(truth_match[j])
                ex["truth"] = [round(float(c), 3) for c in np.asarray(coef[b, lo:hi, tj], dtype=np.float32)]
            out[e] = ex
    return out


def _attribution(sae, x, valid, b_idx: Tensor, pos: Tensor, feat: Tensor, rf: int, block: int = 1024):
    """:func:`context_attribution` of the examples (row ``b_idx`` of ``x``, position ``pos``, feature ``feat``)
    on the last ``rf`` tokens up to each maximum (zero padding = the start of a sequence), ``block``
    examples at a time (memory ``block x rf x d_in``); ``None`` for a per-token SAE."""
    if not getattr(sae, "dilations", None):
        return None
    parts = []
    offs = torch.arange(-rf + 1, 1, device=x.device)
    for lo in range(0, len(pos), block):
        win = pos[lo : lo + block].unsqueeze(1) + offs  # [E, rf]
        inside = win >= 0
        rows = b_idx[lo : lo + block].unsqueeze(1)
        x_w = x[rows, win.clamp_min(0)] * inside.unsqueeze(-1)
        v_w = valid[rows, win.clamp_min(0)] & inside
        parts.append(
            context_attribution(sae, x_w, v_w, torch.full_like(win[:, 0], rf - 1), feat[lo : lo + block])
        )
    return ContextAttribution(*(torch.cat(t) for t in zip(*parts, strict=True)))


def _match_truth(W_dec: Tensor, truth: DashboardTruth) -> tuple[Tensor, Tensor]:
    """Per decoder row: the closest true feature (by cosine) and the cosine."""
    w = W_dec.detach().float().cpu()
    t = truth.features.float().cpu()
    cos = (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (t / t.norm(dim=1, keepdim=True)).t()
    best = cos.max(dim=1)
    return best.indices, best.values


def _finite(v: float) -> float | None:
    return None if not math.isfinite(v) else round(v, 6)


@torch.no_grad()
def collect_dashboard(
    sae,
    read_rows: Callable[[np.ndarray], dict[str, Tensor]],
    rows: np.ndarray,
    cfg: FeaturesConfig,
    features: Tensor | None = None,
    lm: torch.nn.Module | None = None,
    token_text: Callable[[list[int]], list[str]] | None = None,
    truth: DashboardTruth | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Everything the dashboard shows, as a JSON-able dict ``{"meta", "features": [...]}``.

    Args:
        sae: the :class:`mtsae.MTSAE` acting on raw activations (eval mode).
        read_rows: rows (global ids, ascending) -> ``{"acts" [n, T, d], "tokens" [n, T], "valid" [n, T]}``
            (``ActivationCache.read``).
        rows: the rows of the split to pass over.
        cfg: settings.
        features: feature ids to show (default: all).
        lm: the language model, for the promoted / suppressed output tokens (``None``: not shown).
        token_text: token ids -> display strings (``None``: positions are shown without text).
        truth: ground truth of a synthetic source (``None``: not shown).
    """
    features = torch.arange(sae.d_sae) if features is None else torch.as_tensor(features).long()
    if len(features) == 0 or int(features.min()) < 0 or int(features.max()) >= sae.d_sae:
        raise ValueError(f"features must be non-empty ids in 0..{sae.d_sae - 1}")
    rows = np.asarray(rows, dtype=np.int64)
    if cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    if len(rows) == 0:
        raise ValueError("the split has no rows to read")
    sae = sae.to(device).eval()
    res = stream_stats(sae, read_rows, rows, features, cfg, device, progress)
    W_dec = sae.W_dec.detach()[features.to(sae.W_dec.device)]
    match = _match_truth(W_dec, truth) if truth is not None else None
    picks = _pick_examples(res, cfg)
    examples = _examples(
        sae, read_rows, picks, features, cfg, device, None if match is None else match[0], truth, progress
    )
    logits = None
    if lm is not None and cfg.n_logits > 0:
        from mtsae.features.logits import logit_effects

        logits = logit_effects(lm, W_dec, cfg.n_logits)

    per_feature: list[dict[str, Any]] = []
    for j, i in enumerate(features.tolist()):
        n_fire = int(res.n_fire[j])
        counts = res.hist_counts[j]
        last = int(counts.nonzero().max()) + 1 if n_fire else 0
        entry: dict[str, Any] = {
            "id": int(i),
            "density": n_fire / max(res.n_tokens, 1),
            "n_fire": n_fire,
            "max_act": _finite(float(res.top_values[j, 0])) or 0.0,
            "mean_act": float(res.sum_act[j]) / n_fire if n_fire else 0.0,
            "hist": {"width": float(res.hist_width[j]), "counts": counts[:last].tolist()},
            "examples": [],
        }
        per_feature.append(entry)
    for (j, _, _, _), ex in zip(picks, examples, strict=True):
        per_feature[j]["examples"].append(ex)
    for j, entry in enumerate(per_feature):
        tops = [ex["attr"] for ex in entry["examples"] if ex["kind"] == "top" and "attr" in ex]
        if tops:
            entry["context_share"] = sum(a["context_share"] for a in tops) / len(tops)
            acts = sum(a["act"] for a in tops)
            entry["ablated_ratio"] = sum(a["ablated"] for a in tops) / acts if acts > 0 else None
        if logits is not None:
            entry["promoted"] = _token_list(logits.top_ids[j], logits.top_values[j], token_text)
            entry["suppressed"] = _token_list(logits.bottom_ids[j], logits.bottom_values[j], token_text)
        if match is not None and truth is not None:
            tj = int(match[0][j])
            g = int(truth.group_index[tj])
            entry["truth"] = {
                "feature": tj,
                "cos": round(float(match[1][j]), 4),
                "group": truth.group_names[g],
                "span": None if truth.group_spans is None else truth.group_spans[g],
            }
    meta: dict[str, Any] = {
        "d_sae": int(sae.d_sae),
        "d_in": int(sae.d_in),
        "dilations": list(getattr(sae, "dilations", [])),
        "receptive_field": int(getattr(sae, "receptive_field", 1)),
        "activation": str(getattr(sae, "activation_name", "")),
        "n_tokens": int(res.n_tokens),
        "n_rows": len(rows),
        "n_features_shown": len(features),
        "has_tokens": token_text is not None,
        "has_logits": logits is not None,
        "has_truth": truth is not None,
        "quantiles": list(cfg.quantiles),
        "split": cfg.split,
        "context_before": cfg.context_before,
    }
    if token_text is not None:  # the text of every token id that appears, decoded once
        ids = sorted({t for e in per_feature for ex in e["examples"] for t in ex["tokens"] if t >= 0})
        vocab = dict(zip(ids, token_text(ids), strict=True)) if ids else {}
        for e in per_feature:
            for ex in e["examples"]:
                ex["text"] = [vocab.get(t, "") for t in ex["tokens"]]
    return {"meta": meta, "features": per_feature}


def _token_list(ids: Tensor, values: Tensor, token_text) -> list[list[Any]]:
    texts = token_text(ids.tolist()) if token_text is not None else [str(i) for i in ids.tolist()]
    return [
        [t, int(i), round(float(v), 4)] for t, i, v in zip(texts, ids.tolist(), values.tolist(), strict=True)
    ]
