"""The unlearning evaluation's outputs: the best configuration as a recipe and the Markdown summary
(``results.json`` is written by :func:`mtsae.evals.records.save_results`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtsae.evals.unlearning.corpora import WMDP_NAME
from mtsae.evals.unlearning.recipe import UnlearningRecipe, sae_sha256

__all__ = [
    "LOGGED_METRICS",
    "OPTIONAL_METRICS",
    "best_recipe",
    "logged_metrics",
    "max_text_selectivity",
    "save_best_recipe",
    "summary_markdown",
]

#: metric name -> key of the results of :func:`mtsae.evals.unlearning.pipeline.evaluate_unlearning`
LOGGED_METRICS = {
    "val/unlearning_score": "unlearning_score",
    "val/unlearning/wmdp_acc_best": "wmdp_acc_best",
    "val/unlearning/mmlu_acc_best": "mmlu_acc_best",
}
#: logged beside them when the results have a value (held-out text configured): the text selectivity of
#: the best grid point (when one keeps the retain accuracy) and the largest over the grid points that
#: clamp features
OPTIONAL_METRICS = {
    "val/unlearning/text_selectivity_best": "text_selectivity_best",
    "val/unlearning/text_selectivity_max": "text_selectivity_max",
}


def max_text_selectivity(configs: Sequence[Mapping[str, Any]]) -> float | None:
    """The largest text selectivity over the grid points that clamp features (``None``: none has one)."""
    values = [
        c["text_selectivity"] for c in configs if c.get("features") and c.get("text_selectivity") is not None
    ]
    return float(max(values)) if values else None


def logged_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics of an unlearning evaluation's results, by the names ``callbacks.Unlearning`` logs.

    Also how ``mtsae compare`` reads a finished run's unlearning record (``<run>/unlearning/stepN.json``).
    A value that records written before it existed lack is derived from their grid points (the text
    selectivity's maximum), so those runs report it too.
    """
    if "text_selectivity_max" not in results and "configs" in results:
        results = {**results, "text_selectivity_max": max_text_selectivity(results["configs"])}
    out = {name: float(results[key]) for name, key in LOGGED_METRICS.items()}
    out.update(
        {name: float(results[key]) for name, key in OPTIONAL_METRICS.items() if results.get(key) is not None}
    )
    return out


def _portable_model_id(model: dict) -> dict:
    """A local model folder is recorded as an absolute path, so the recipe applies from any folder."""
    name = model.get("name")
    if isinstance(name, str) and Path(name).expanduser().is_dir():
        model["name"] = str(Path(name).expanduser().resolve())
    return model


def best_recipe(
    results: Mapping[str, Any], sae_path: str | Path, recipe_dir: str | Path | None = None
) -> UnlearningRecipe | None:
    """The recipe of the best grid point of :func:`evaluate_unlearning` results (``None`` if there is none).

    Args:
        results: what :func:`evaluate_unlearning` returned (with ``model`` added by the caller, if known).
        sae_path: the SAE the results were computed with, on disk (its hash is recorded).
        recipe_dir: the folder the recipe will be written to: ``sae_path`` is stored relative to it.
    """
    best = results.get("best")
    if best is None:
        return None
    sel = results["selected_features"][str(best["retain_threshold"])]
    n = len(best["features"])
    sae_path = Path(sae_path)
    stored = str(sae_path)
    if recipe_dir is not None:
        stored = os.path.relpath(sae_path.resolve(), Path(recipe_dir).resolve())
    conv = results["conventions"]
    return UnlearningRecipe(
        sae_path=stored,
        sae_sha256=sae_sha256(sae_path),
        layer=int(results["layer"]),
        features=list(best["features"]),
        multiplier=float(best["multiplier"]),
        position_rule=conv["position_rule"],
        sae_in_model_dtype=bool(conv["sae_in_model_dtype"]),
        special_ids=list(results.get("special_ids", [])),
        model=_portable_model_id(dict(results.get("model", {}))),
        selection={
            "retain_threshold": best["retain_threshold"],
            "n_features": best["n_features"],
            "rounding": conv["sparsity_decimals"],
            "forget_sparsity": sel["forget_sparsity"][:n],
            "retain_sparsity": sel["retain_sparsity"][:n],
            "n_tokens": results["n_sparsity_tokens"],
        },
        scores={
            "unlearning_score": results["unlearning_score"],
            "wmdp_accuracy": best["wmdp_accuracy"],
            "mmlu_accuracy": best["mmlu_accuracy"],
        },
    )


def save_best_recipe(
    results: dict[str, Any],
    sae: Any,
    out: str | Path,
    sae_name: str = "sae",
    recipe_name: str = "recipe.json",
) -> Path | None:
    """Export ``sae`` (raw activations) to ``out/sae_name`` and write the best grid point's recipe naming it
    to ``out/recipe_name``; record the recipe's path in ``results["recipe"]``. ``None`` (and no recipe)
    when no grid point qualifies. What ``mtsae eval unlearning`` and ``callbacks.Unlearning`` both write."""
    from mtsae.sae.export import save_sae

    out = Path(out)
    recipe = best_recipe(results, save_sae(sae.cpu(), out / sae_name), out)
    if recipe is None:
        return None
    path = recipe.save(out / recipe_name)
    results["recipe"] = str(path)
    return Path(path)


def summary_markdown(results: Mapping[str, Any]) -> str:
    """A short markdown summary of :func:`evaluate_unlearning` results. With cloze scoring the question sets
    are named for what they are (forget-topic and retain questions, not WMDP-bio and MMLU) and the text
    selectivity of each grid point is shown beside its accuracies."""
    best = results.get("best")
    conventions = results.get("conventions", {})
    exact = conventions.get("saebench_exact")
    title = {True: "SAEBench-exact", False: "this project's conventions", None: "SAEBench"}[exact]
    if conventions.get("max_norm_multiple") is not None:  # SAEBench counts and clamps every ordinary token
        title = f"{'SAEBench' if exact else title}, activation sinks above {conventions['max_norm_multiple']:g}x left out"
    which = "unmodified model" if best is None else "best"
    cloze = results.get("scoring") == "cloze"
    forget, retain = ("forget-topic", "retain") if cloze else ("WMDP-bio", "MMLU")
    selectivity = cloze and any("text_selectivity" in c for c in results["configs"])
    lines = [
        f"# Unlearning ({title}{', cloze scoring' if cloze else ''})",
        "",
        *[f"> **Warning:** {w}\n" for w in results.get("warnings", [])],
        f"- unlearning score: **{results['unlearning_score']:.4f}**",
        "- best config: "
        + (
            "none (see the warning above)"
            if best is None
            else f"threshold {best['retain_threshold']}, n {best['n_features']}, multiplier {best['multiplier']}, "
            f"features {best['features']}"
        ),
        f"- {forget} accuracy ({which}): {results['wmdp_acc_best']:.4f}",
        f"- {retain} accuracy ({which}, pooled): {results['mmlu_acc_best']:.4f}",
        "- questions kept / loaded: "
        + ", ".join(
            f"{forget if cloze and n == WMDP_NAME else n} {v['kept']}/{v['loaded']}"
            for n, v in results["n_questions"].items()
        ),
    ]
    if selectivity:
        lines.append(
            "- text selectivity: CE increase under the clamp on held-out forget-corpus text minus that on "
            "held-out retain text (nats per token)"
        )
    head = ["threshold", "n", "multiplier", "features", f"{forget} acc", f"{retain} acc"]
    if selectivity:
        head += ["CE incr. forget", "CE incr. retain", "selectivity"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results["configs"]:
        cells = [
            str(c["retain_threshold"]),
            str(c["n_features"]),
            str(c["multiplier"]),
            str(len(c["features"])),
        ]
        if not c["features"]:
            cells += ["—"] * (len(head) - 4)
        else:
            cells += [f"{c['wmdp_accuracy']:.4f}", f"{c['mmlu_accuracy']:.4f}"]
            if selectivity:
                keys = ("ce_increase_forget", "ce_increase_retain", "text_selectivity")
                cells += [f"{c[k]:+.4f}" if c.get(k) is not None else "—" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
