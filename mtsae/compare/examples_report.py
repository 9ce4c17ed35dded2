"""The feature-examples section of a comparison report: what a few features of each family respond to.

A run with ``callbacks.FeatureExamples`` leaves ``feature_examples.json`` in its folder
(:func:`mtsae.features.examples.feature_examples`). For a frontier grid the section shows one run per
family, all at the same activation, knob value and seed (the first activation's middle knob value, the
first seed), so the families are seen by the same rule at about the same sparsity; explicit runs are shown
one each. Per run: a table of a seeded sample of live features and, for an MTSAE, a table of the
features whose encoder weight sits mostly in the long-dilation branches.

:func:`context_use_section` says how much every MTSAE run with trainable convolutions uses earlier
tokens: the mean magnitude of each convolution tap (from the run's exported SAE) and the context share of
its sampled features' top examples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mtsae.compare.config import CompareConfig
from mtsae.compare.results import RunResult
from mtsae.compare.runner import run_dir
from mtsae.features.examples import EXAMPLES_FILE, examples_markdown
from mtsae.sae.export import load_sae

__all__ = ["shown_runs", "examples_section", "context_use_section", "tap_magnitudes"]


def shown_runs(cfg: CompareConfig, results: list[RunResult]) -> list[RunResult]:
    """The runs whose examples the report shows (see the module docstring), in family order."""
    explicit = [r for r in results if r.spec.family is None]
    if cfg.frontier is None:
        return explicit
    act = cfg.frontier.activations[0]
    point, seed = len(act.values) // 2, cfg.seeds[0]
    grid = {
        r.spec.family: r
        for r in results
        if (r.spec.activation, r.spec.point, r.spec.seed) == (act.name, point, seed)
    }
    return [grid[f] for f in cfg.frontier.families if f in grid] + explicit


def examples_section(
    out: Path, cfg: CompareConfig, results: list[RunResult], n_examples: int = 3
) -> list[str]:
    """``## Feature examples`` (empty when no shown run wrote examples)."""
    blocks: list[str] = []
    meta = None
    for r in shown_runs(cfg, results):
        path = run_dir(out, cfg, r.spec) / EXAMPLES_FILE
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        meta = data["meta"]
        label = f"`{r.spec.family}` (run `{r.name}`)" if r.spec.family else f"run `{r.name}`"
        blocks += [
            f"### {label}",
            "",
            f"{len(data['sample'])} live features drawn at random ({meta['n_live']} of {meta['d_sae']} fired "
            f"on the {meta['n_rows']} validation rows read):",
            "",
            *examples_markdown(data["sample"], n_examples),
        ]
        if meta["dilations"]:
            long = [r for r in meta["dilations"] if r >= meta["long_from"]]
            blocks += [
                f"Features whose encoder weight sits mostly (> 1/2 of ‖W_enc‖²) in the dilation {long} "
                f"branches, largest share first ({len(data['long'])} shown):",
                "",
                *examples_markdown(data["long"], n_examples),
            ]
    if not blocks or meta is None:
        return []
    return [
        "## Feature examples",
        "",
        "Top-activating contexts on held-out validation rows: the "
        f"{meta['context_before']} tokens before the activating token, then `[[token]]` and its activation "
        "(one example per sequence). *Long-branch share*: the share of the feature's encoder energy "
        "‖W_enc[:, i]‖² in the long-dilation blocks; every branch also reads the token itself, so the "
        "*context share* (share of the pre-activation from earlier tokens) and the activation with the "
        "earlier tokens removed (*act. w/o context*, % of the activation), both averaged over the top "
        "examples, say how much the feature really uses the context "
        "(`mtsae.features.examples`). Shown per family: "
        + (
            "the first activation's middle knob value, first seed."
            if cfg.frontier is not None
            else "every run."
        ),
        "",
        *blocks,
    ]


def tap_magnitudes(conv_weight: torch.Tensor) -> list[list[float]]:
    """Mean ``|w|`` over channels of each tap of each branch: ``[branch][tap]``, taps in the order of
    ``MTSAE.conv_weight`` (offsets ``-2r``, ``-r``, ``0``)."""
    return conv_weight.detach().abs().float().mean(dim=1).tolist()


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _context_row(out: Path, cfg: CompareConfig, r: RunResult) -> tuple[tuple[int, ...], str] | None:
    """``(dilations, table row)`` of a run with trained convolutions, its exported SAE and its feature
    examples (``None`` otherwise)."""
    rd = run_dir(out, cfg, r.spec)
    trained = r.hparams.get("dilations") and not r.hparams.get("freeze_conv")
    if not trained or not (rd / "sae").is_dir() or not (rd / EXAMPLES_FILE).exists():
        return None
    sae = load_sae(rd / "sae")
    sample = json.loads((rd / EXAMPLES_FILE).read_text())["sample"]
    share = _mean([f["context_share"] for f in sample if f.get("context_share") is not None])
    kept = _mean([f["ablated_ratio"] for f in sample if f.get("ablated_ratio") is not None])
    init = r.hparams.get("context_init_std")
    cells = [
        f"`{r.name}`",
        "—" if init is None else f"{init * math.sqrt(2 / math.pi):.3f}",
        *(" / ".join(f"{w:.3f}" for w in branch) for branch in tap_magnitudes(sae.conv_weight)),
        "—" if share is None else f"{share:.3f}",
        "—" if kept is None else f"{100 * kept:.0f}%",
    ]
    return tuple(sae.dilations), "| " + " | ".join(cells) + " |"


def context_use_section(out: Path, cfg: CompareConfig, results: list[RunResult]) -> list[str]:
    """``## How much context the MTSAEs use``: a row per finished run with trained convolutions and feature
    examples (``callbacks.FeatureExamples``), a table per set of dilations; empty when there is none.

    Columns: the mean ``|w|`` of each tap per branch (from ``<run>/sae``, the SAE ``callbacks.ExportSAE``
    wrote) beside its expected value at initialisation, and, from ``feature_examples.json``, the context
    share and the activation without earlier tokens averaged over the sampled features."""
    tables: dict[tuple[int, ...], list[str]] = {}
    for r in results:
        row = _context_row(out, cfg, r)
        if row is not None:
            tables.setdefault(row[0], []).append(row[1])
    if not tables:
        return []
    lines = [
        "## How much context the MTSAEs use",
        "",
        "Mean |w| over channels of each depth-wise convolution tap (the dilation-r branch reads the tokens "
        "r and 2r places back and the token itself; the taps start at 1 for the token itself and "
        "N(0, context_init_std) noise for the others, whose mean |w| is the *context taps at init* "
        "column), and the *context share* of the pre-activation and the activation with earlier tokens "
        "removed (% of the activation), averaged over the sampled features' top examples (the "
        "feature-examples tables below). Runs whose convolutions are frozen are left out (their taps are "
        "the identity).",
        "",
    ]
    for dilations, rows in tables.items():
        head = [
            "run",
            "context taps at init",
            *(f"r = {d}: −{2 * d} / −{d} / 0" for d in dilations),
            "context share",
            "act. w/o context",
        ]
        lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|", *rows, ""]
    return lines
