"""Per-feature statistics gathered in one streaming pass over feature codes (memory independent of tokens).

- :class:`StreamingTopK`: for each of ``n`` features, the ``k`` candidates with the highest score seen so
  far, with their payload (row, position, value). Each update merges the ``k`` kept with the batch's
  candidates by one ``topk`` over ``k + C`` columns: memory ``O(n k)``, time linear in candidates.
  Used twice: scored by activation (the top examples) and scored by a uniform random key (a uniform
  sample of the firing sequences, reservoir sampling by random keys, from which the lower-quantile
  examples are drawn).
- :class:`PowerOfTwoHistogram`: per feature, exact counts of the positive activations in bins
  ``[j w, (j + 1) w)`` of width ``w = 2^e``; ``e`` grows when a larger activation arrives, merging
  adjacent pairs of bins (aligned bins of width ``2w`` are unions of pairs of bins of width ``w``), so
  the counts equal a histogram of all values at once with the final width.
- :class:`FeatureStats`: both, plus firing counts (density), fed with ``f [B, T, F]`` batches. One
  example per sequence: the candidates of a batch are each sequence's maximum (and its position), so
  a feature's top examples are distinct sequences, not neighbouring tokens of one span.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["FeatureStats", "FeatureStatsResult", "PowerOfTwoHistogram", "StreamingTopK"]

_EMPTY = float("-inf")


class StreamingTopK:
    """The ``k`` highest-scoring candidates per item, over a stream of ``[n, C]`` score batches.

    Empty slots have score ``-inf`` and payload ``-1``; a candidate with score ``-inf`` is never kept.
    Ties keep the earlier candidate first (kept slots precede new candidates in the merge).
    """

    def __init__(self, n: int, k: int, device: torch.device | str = "cpu") -> None:
        if n < 1 or k < 1:
            raise ValueError(f"StreamingTopK needs n >= 1 and k >= 1, got n={n}, k={k}")
        self.n, self.k = n, k
        self.scores = torch.full((n, k), _EMPTY, device=device)  # [n, k], sorted descending
        self.payload: dict[str, Tensor] = {}

    def update(self, scores: Tensor, **payload: Tensor) -> None:
        """Merge candidates ``scores [n, C]`` with payload tensors broadcastable to ``[n, C]``."""
        if scores.dim() != 2 or scores.shape[0] != self.n:
            raise ValueError(f"scores must be [{self.n}, C], got {tuple(scores.shape)}")
        if self.payload and set(payload) != set(self.payload):
            raise ValueError(
                f"payload keys {sorted(payload)} differ from the first update's {sorted(self.payload)}"
            )
        C = scores.shape[1]
        for name, p in payload.items():
            if name not in self.payload:
                self.payload[name] = torch.full(
                    (self.n, self.k), -1, dtype=p.dtype, device=self.scores.device
                )
        merged = torch.cat([self.scores, scores.to(self.scores)], dim=1)  # [n, k + C]
        top = merged.topk(min(self.k, self.k + C), dim=1, sorted=True)
        keep = top.indices  # [n, k]
        self.scores = top.values
        for name, p in payload.items():
            cand = torch.broadcast_to(p.to(self.payload[name].device), (self.n, C))
            both = torch.cat([self.payload[name], cand.to(self.payload[name].dtype)], dim=1)
            self.payload[name] = both.gather(1, keep)
        for name in self.payload:  # empty slots keep the -1 payload
            self.payload[name] = self.payload[name].masked_fill(self.scores == _EMPTY, -1)


class PowerOfTwoHistogram:
    """Exact per-item histograms of positive values with power-of-two bin widths that grow as needed.

    Item ``i`` has counts in ``n_bins`` bins ``[j 2^e_i, (j + 1) 2^e_i)``; ``e_i`` is the smallest exponent
    with ``max value < n_bins 2^e_i``, so between half and all of the bins are in use.
    """

    def __init__(self, n: int, n_bins: int = 64, device: torch.device | str = "cpu") -> None:
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins must be a power of two >= 2, got {n_bins}")
        self.n, self.n_bins = n, n_bins
        self.counts = torch.zeros(n, n_bins, dtype=torch.int64, device=device)
        self.exponent = torch.zeros(n, dtype=torch.int64, device=device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=device)

    def _needed(self, vmax: Tensor) -> Tensor:
        """Smallest ``e`` with ``vmax < n_bins 2^e`` (``vmax > 0``)."""
        e = torch.floor(torch.log2(vmax.double() / self.n_bins)).long() + 1
        too_small = vmax.double() >= self.n_bins * torch.exp2(e.double())  # rounding of log2
        return e + too_small.long()

    def update(self, values: Tensor, items: Tensor) -> None:
        """Count ``values [M] > 0`` of items ``items [M]`` (other values are ignored)."""
        keep = values > 0
        values, items = values[keep].double(), items[keep].long()
        if values.numel() == 0:
            return
        vmax = torch.zeros(self.n, dtype=torch.float64, device=values.device)
        vmax = vmax.scatter_reduce(0, items, values, reduce="amax")
        touched = vmax > 0
        needed = torch.where(touched, self._needed(vmax.clamp_min(1e-300)), self.exponent)
        fresh = touched & ~self.seen
        self.exponent = torch.where(fresh, needed, self.exponent)
        self.seen |= touched
        grow = (needed - self.exponent).clamp_min(0)
        # merging adjacent pairs log2(n_bins) times puts every count in bin 0; more changes nothing
        for _ in range(min(int(grow.max()), int(math.log2(self.n_bins)) + 1)):
            sel = grow > 0
            merged = self.counts[sel].view(-1, self.n_bins // 2, 2).sum(-1)  # [m, n_bins / 2]
            self.counts[sel] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
            grow = (grow - 1).clamp_min(0)
        self.exponent = torch.maximum(self.exponent, needed)
        width = torch.exp2(self.exponent[items].double())
        bins = torch.floor(values / width).long().clamp_(0, self.n_bins - 1)
        self.counts.view(-1).index_add_(0, items * self.n_bins + bins, torch.ones_like(bins))

    @property
    def width(self) -> Tensor:
        """Bin width per item ``[n]`` (float64; 0 for an item that never had a positive value)."""
        return torch.where(
            self.seen, torch.exp2(self.exponent.double()), torch.zeros_like(self.exponent).double()
        )


class FeatureStatsResult(NamedTuple):
    """What :meth:`FeatureStats.result` returns (CPU tensors; ``F`` features, ``k`` examples)."""

    features: Tensor
    """``[F]`` feature ids the statistics are for"""
    n_tokens: int
    """valid tokens seen"""
    n_fire: Tensor
    """``[F]`` valid tokens on which the feature is positive (density = n_fire / n_tokens)"""
    sum_act: Tensor
    """``[F]`` sum of the feature's activations (float64)"""
    top_values: Tensor
    """``[F, k]`` the k largest per-sequence maxima, descending (``-inf``: no such example)"""
    top_rows: Tensor
    """``[F, k]`` their rows (``-1``: none)"""
    top_pos: Tensor
    """``[F, k]`` the position of the maximum in the row"""
    sample_values: Tensor
    """``[F, s]`` per-sequence maxima of a uniform sample of the sequences where the feature fires"""
    sample_rows: Tensor
    """``[F, s]``"""
    sample_pos: Tensor
    """``[F, s]``"""
    hist_counts: Tensor
    """``[F, n_bins]`` counts of the feature's positive activations (per token)"""
    hist_width: Tensor
    """``[F]`` bin width of ``hist_counts`` (bins start at 0)"""

    @property
    def density(self) -> Tensor:
        return self.n_fire.double() / max(self.n_tokens, 1)


class FeatureStats:
    """One streaming pass over feature codes: top examples, a sample of firing sequences, histograms.

    Args:
        features: the feature ids to follow (``[F]``; codes are sliced to them in :meth:`update`).
        n_top: top-activating sequences kept per feature.
        n_sample: firing sequences kept per feature as a uniform sample (for the quantile examples).
        n_bins: histogram bins (a power of two).
        seed: seed of the sample's random keys.
    """

    def __init__(
        self,
        features: Tensor,
        n_top: int = 20,
        n_sample: int = 64,
        n_bins: int = 64,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.features = torch.as_tensor(features, dtype=torch.long).flatten()
        F = len(self.features)
        if F == 0:
            raise ValueError("FeatureStats needs at least one feature")
        self.device = torch.device(device)
        self._index = self.features.to(self.device)
        self._all = bool(torch.equal(self.features, torch.arange(F)))  # every feature: no copy to slice
        self.top = StreamingTopK(F, n_top, self.device)
        self.sample = StreamingTopK(F, n_sample, self.device)
        self.hist = PowerOfTwoHistogram(F, n_bins, self.device)
        self.n_fire = torch.zeros(F, dtype=torch.int64, device=self.device)
        self.sum_act = torch.zeros(F, dtype=torch.float64, device=self.device)
        self.n_tokens = 0
        self._gen = torch.Generator(device=self.device).manual_seed(seed)

    @torch.no_grad()
    def update(self, f_BTF: Tensor, valid_BT: Tensor, rows_B: Tensor) -> None:
        """Add a batch: codes ``[B, T, d_sae]`` (all features), valid mask ``[B, T]``, global row ids ``[B]``.

        Codes are sparse: the dense tensor is scanned once for its non-zeros, and every statistic is
        computed from those entries (``(b, t, feature, value)``, a few per token).
        """
        f = f_BTF.to(self.device)
        B, T, D = f.shape
        F = len(self._index)
        b, t, j = (f > 0).nonzero(as_tuple=True)  # the one pass over the dense codes
        v = f[b, t, j].float()
        keep = valid_BT.to(self.device)[b, t]
        if not (self._all and D == F):  # map feature ids to columns; others are dropped
            lut = torch.full((D,), -1, dtype=torch.long, device=self.device)
            lut[self._index] = torch.arange(F, device=self.device)
            j = lut[j]
            keep &= j >= 0
        b, t, j, v = b[keep], t[keep], j[keep], v[keep]
        self.n_tokens += int(valid_BT.sum())
        self.n_fire += torch.bincount(j, minlength=F)
        self.sum_act += torch.bincount(j, weights=v.double(), minlength=F)
        self.hist.update(v, j)
        # one candidate per (feature, sequence): its maximum and the first position where it is reached
        key = j * B + b  # [M] index into [F, B]
        vmax = torch.zeros(F * B, device=self.device).scatter_reduce(0, key, v, reduce="amax")
        at_max = v == vmax[key]
        pos = torch.full((F * B,), T, dtype=torch.long, device=self.device)
        pos = pos.scatter_reduce(0, key[at_max], t[at_max], reduce="amin")
        value_FB, pos_FB = vmax.view(F, B), pos.view(F, B)
        fired_FB = value_FB > 0
        rows_FB = rows_B.to(self.device).long().unsqueeze(0)
        self.top.update(value_FB.masked_fill(~fired_FB, _EMPTY), value=value_FB, row=rows_FB, pos=pos_FB)
        keys = torch.rand(value_FB.shape, generator=self._gen, device=self.device)
        self.sample.update(keys.masked_fill(~fired_FB, _EMPTY), value=value_FB, row=rows_FB, pos=pos_FB)

    def result(self) -> FeatureStatsResult:
        if not self.top.payload:
            raise ValueError("FeatureStats.result: no batch was added (is the split empty?)")
        cpu = {k: v.cpu() for k, v in self.top.payload.items()}
        smp = {k: v.cpu() for k, v in self.sample.payload.items()}
        return FeatureStatsResult(
            features=self.features.clone(),
            n_tokens=self.n_tokens,
            n_fire=self.n_fire.cpu(),
            sum_act=self.sum_act.cpu(),
            top_values=self.top.scores.cpu(),
            top_rows=cpu["row"],
            top_pos=cpu["pos"],
            sample_values=smp["value"].masked_fill(smp["row"] < 0, _EMPTY),
            sample_rows=smp["row"],
            sample_pos=smp["pos"],
            hist_counts=self.hist.counts.cpu(),
            hist_width=self.hist.width.cpu(),
        )
