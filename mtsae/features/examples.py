"""Feature examples for a written report: top-activating contexts of a few features, as markdown tables.

Two sets of features per SAE, both from the dashboard's pass (:func:`mtsae.features.collect_dashboard`):

- **sample**: ``n_sample`` *live* features (firing at least once on the rows read), drawn with a fixed
  seed, so that every SAE of a comparison is shown by the same rule;
- **long** (MTSAEs with the ``concat`` encoder only): the live features whose encoder weight sits mostly
  in the long-dilation branches. The *long-branch share* of feature ``i`` is the share of its encoder
  energy ``||W_enc[:, i]||^2`` in the blocks of dilations ``>= long_from`` (4 and 8 for dilations
  1, 2, 4, 8), from :func:`mtsae.evals.disentanglement.scale_attribution`; the ``n_long`` live features
  with the largest share above 1/2 are shown. Every branch also reads the token itself (its tap at
  offset 0), so a large share says where the feature's weight is, not that it reads earlier tokens: the
  tables therefore also give each feature's context share and its activation without the earlier tokens
  (:mod:`mtsae.features.attribution`, averaged over its top examples).

Each example is the ``context_before`` tokens before the activating token and the token itself, marked
``[[token]]``, detokenised one token at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtsae.evals.disentanglement import scale_attribution
from mtsae.features.collect import FeaturesConfig, collect_dashboard, stream_stats

__all__ = ["EXAMPLES_FILE", "ExamplesConfig", "long_branch_share", "feature_examples", "examples_markdown"]

#: ``<run dir>/feature_examples.json`` (``callbacks.FeatureExamples``), read by the comparison report
EXAMPLES_FILE = "feature_examples.json"


@dataclass
class ExamplesConfig:
    """What :func:`feature_examples` keeps."""

    n_sample: int = 8
    """live features drawn at random (seeded) per SAE"""
    n_long: int = 8
    """MTSAE: features with the largest long-branch share (above 1/2) shown"""
    long_from: int = 4
    """dilations >= this count as long (4 and 8 of 1, 2, 4, 8)"""
    n_top: int = 4
    """top-activating examples per feature (one per sequence)"""
    context_before: int = 12
    """tokens shown before the activating token"""
    max_rows: int | None = 128
    """validation rows read (None: all)"""
    batch_tokens: int = 4096
    """tokens encoded per batch"""
    seed: int = 0
    """seed of the feature sample"""

    def __post_init__(self) -> None:
        if min(self.n_sample, self.n_long, self.context_before) < 0 or self.n_top < 1:
            raise ValueError("n_sample, n_long and context_before must be >= 0 and n_top >= 1")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {self.max_rows}")


def long_branch_share(sae, long_from: int) -> Tensor | None:
    """``[d_sae]``: share of each feature's encoder energy in the branches of dilation ``>= long_from``;
    ``None`` for a per-token SAE or the ``mix`` encoder (one ``W_enc`` reads every branch alike)."""
    dilations = list(getattr(sae, "dilations", []) or [])
    if not dilations or getattr(sae, "encoder", "concat") != "concat":
        return None
    share = scale_attribution(sae.W_enc, len(dilations))  # [S, d_sae]
    long = torch.tensor([r >= long_from for r in dilations])
    return share[long].sum(0) if bool(long.any()) else None


@torch.no_grad()
def feature_examples(
    sae,
    read_rows: Callable[[np.ndarray], dict[str, Tensor]],
    rows: np.ndarray,
    cfg: ExamplesConfig,
    token_text: Callable[[list[int]], list[str]] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The feature sets of the module docstring with their examples, as a JSON-able dict
    ``{"meta", "sample": [feature, ...], "long": [feature, ...]}`` (features as
    :func:`collect_dashboard` gives them, ``long_share`` added for an MTSAE)."""
    rows = np.asarray(rows, dtype=np.int64)[: cfg.max_rows]
    sae = sae.to(device).eval()
    fcfg = FeaturesConfig(
        n_top=cfg.n_top,
        quantiles=[],
        n_sample=1,
        n_bins=2,
        context_before=cfg.context_before,
        context_after=0,
        n_logits=0,
        batch_tokens=cfg.batch_tokens,
        seed=cfg.seed,
    )
    every = torch.arange(sae.d_sae)
    counts = stream_stats(sae, read_rows, rows, every, fcfg, device, progress=False).n_fire
    live = every[torch.as_tensor(counts) > 0]
    gen = torch.Generator().manual_seed(cfg.seed)
    sample = live[torch.randperm(len(live), generator=gen)[: cfg.n_sample]].sort().values
    share = long_branch_share(sae, cfg.long_from)
    long = torch.empty(0, dtype=torch.long)
    if share is not None and cfg.n_long > 0:
        s = share.cpu()[live]
        order = s.argsort(descending=True)
        long = live[order[s[order] > 0.5][: cfg.n_long]]
    wanted = torch.cat([sample, long]).unique()
    out: dict[str, Any] = {
        "meta": {
            "n_rows": len(rows),
            "n_live": len(live),
            "d_sae": int(sae.d_sae),
            "dilations": list(getattr(sae, "dilations", []) or []),
            "long_from": cfg.long_from,
            "context_before": cfg.context_before,
            "has_tokens": token_text is not None,
        },
        "sample": [],
        "long": [],
    }
    if len(wanted) == 0:
        return out
    data = collect_dashboard(
        sae, read_rows, rows, fcfg, features=wanted, token_text=token_text, device=device, progress=False
    )
    by_id = {f["id"]: f for f in data["features"]}
    for f in by_id.values():
        f.pop("hist", None)
        if share is not None:
            f["long_share"] = round(float(share[f["id"]]), 4)
    out["sample"] = [by_id[i] for i in sample.tolist()]
    out["long"] = [by_id[i] for i in long.tolist()]
    return out


def _example_text(ex: dict[str, Any]) -> str:
    """The tokens before the activating one, then ``[[token]]``, one markdown table cell. BOS/EOS/PAD
    positions are left out; an activation sink (``ex["sink"]``: an ordinary token the SAE does not read)
    is shown as ``⟦token⟧``."""
    k = ex["pos"] - ex["start"]
    texts = ex.get("text") or [f"<{t}>" for t in ex["tokens"]]
    sink = ex.get("sink") or [False] * len(texts)
    before = "".join(
        f"⟦{t}⟧" if s else t for t, v, s in zip(texts[:k], ex["valid"][:k], sink[:k], strict=True) if v or s
    )
    cell = f"{before}[[{texts[k]}]] ({ex['acts'][k]:.2f})"
    return cell.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").replace("\r", "")


def examples_markdown(features: list[dict[str, Any]], n_examples: int = 3) -> list[str]:
    """One markdown table: a row per feature (id, density, context columns for an MTSAE, top examples)."""
    if not features:
        return ["(no feature)", ""]
    context = any("long_share" in f or "context_share" in f for f in features)
    head = "| feature | density | " + (
        "long-branch share | context share | act. w/o context | " if context else ""
    )
    lines = [head + "top-activating contexts |", "|---" * head.count("|") + "|"]
    for f in features:
        cells = [str(f["id"]), f"{f['density']:.4f}"]
        if context:
            kept = f.get("ablated_ratio")
            cells += [
                f"{f['long_share']:.2f}" if "long_share" in f else "—",
                f"{f['context_share']:.2f}" if "context_share" in f else "—",
                "—" if kept is None else f"{100 * kept:.0f}%",
            ]
        tops = [ex for ex in f["examples"] if ex["kind"] == "top"][:n_examples]
        cells.append("<br>".join(_example_text(ex) for ex in tops) or "—")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]
