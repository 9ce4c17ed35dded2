"""The feature-examples section of a comparison report: what a few features of each family respond to.

A run with ``callbacks.FeatureExamples`` leaves ``feature_examples.json`` in its folder
(:func:`mtsae.features.examples.feature_examples`). For a frontier grid the section shows one run per
family, all at the same activation, knob value and seed (the first activation's middle knob value, the
first seed), so the families are seen by the same rule at about the same sparsity; explicit runs are shown
one each. Per run: a table of a seeded sample of live features and, for an MTSAE, a table of the
features whose encoder weight sits mostly in the long-dilation branches.
"""

from __future__ import annotations

import json
from pathlib import Path

from mtsae.compare.config import CompareConfig
from mtsae.compare.results import RunResult
from mtsae.compare.runner import run_dir
from mtsae.features.examples import EXAMPLES_FILE, examples_markdown

__all__ = ["shown_runs", "examples_section"]


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
