"""Offline evaluation of a trained SAE: ``mtsae eval {core,unlearning,disentanglement}``.

Each command takes the SAE, either a Lightning checkpoint (``--ckpt``, the :class:`mtsae.SAEModule`) or
an exported SAE folder (``--sae``: this project's export or a SAELens folder, e.g. a public SAE, read by
:func:`mtsae.load_sae`), and the training YAML (``--config``, e.g. the ``config.yaml`` saved beside the
run) that says which data source, cache and LM to evaluate on, and writes ``results.json`` and
``summary.md`` to ``--out``:

- ``core``: reconstruction metrics over the validation split of the cache (FVU, MSE, L0, ...) and
  SAEBench's CE-loss / KL scores with the SAE spliced into the LM (:mod:`mtsae.evals.core`);
- ``unlearning``: SAEBench's unlearning evaluation, full setting by default (all 24 orderings, all
  questions, 1024 sparsity rows of 1024 tokens; :mod:`mtsae.evals.unlearning.pipeline`);
- ``disentanglement``: decoder coherence, density, scale attribution, persistence and ground-truth
  recovery (:mod:`mtsae.evals.disentanglement`), with figures as PNG files.

Checks that need no heavy work come first (checkpoint, config, ``d_in``, source kind, dataset and model
reachability), so a mistake fails in seconds with a message that says what to change.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from mtsae.evals.core import CoreConfig
from mtsae.evals.disentanglement import DisentanglementConfig
from mtsae.evals.records import save_results
from mtsae.evals.unlearning.config import UnlearningConfig
from mtsae.lm.loading import resolve_device
from mtsae_app.options import add_settings_options, settings_from_args
from mtsae_app.run_inputs import (
    EvalError,
    EvalSAE,
    add_sae_options,
    check_d_in,
    check_sae_source,
    config_overrides,
    lm_source,
    load_datamodule,
    load_eval_sae,
    run_command,
    setup_cache,
    val_batches,
)

__all__ = ["COMMANDS", "build_parser", "main", "run_core", "run_disentanglement", "run_unlearning"]

log = logging.getLogger("mtsae.eval")


def _write(out: Path, results: dict[str, Any], summary: str) -> None:
    save_results(results, out / "results.json")
    (out / "summary.md").write_text(summary)
    step = results.get("checkpoint_step")
    at = f" (checkpoint {results.get('checkpoint')} at step {step})" if step is not None else ""
    print(f"wrote {out / 'results.json'} and {out / 'summary.md'}{at}")


def _label_lines(loaded: EvalSAE) -> list[str]:
    """The summary's first lines: where the SAE came from (a checkpoint with its step, or a folder)."""
    label = dict(loaded.label)
    if "checkpoint" in label:
        return [f"- checkpoint: `{label['checkpoint']}` (step {label.get('checkpoint_step')})"]
    return [f"- {k}: `{v}`" for k, v in label.items()]


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------- commands
def _settings(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The evaluation's settings object from its options; an invalid value is a user error."""
    try:
        return settings_from_args(cls, args, **overrides)
    except ValueError as e:
        raise EvalError(f"invalid option: {e}") from e


def run_core(args: argparse.Namespace) -> dict[str, Any]:
    """``mtsae eval core``: reconstruction metrics and CE-loss / KL scores on the validation rows."""
    from mtsae.evals.core import core_lm_metrics, finalize_core_metrics, validation_tokens
    from mtsae.lm.loading import load_causal_lm
    from mtsae.training.metrics import ReconstructionMetrics

    cfg = _settings(CoreConfig, args)
    loaded = load_eval_sae(args)
    dm = load_datamodule(args.config, config_overrides(args))
    check_d_in(loaded, dm, args.config)
    source = lm_source(dm, "eval core") if not args.no_lm else None
    if source is not None:
        check_sae_source(loaded, source, args.config)
    setup_cache(dm)
    device = resolve_device(args.device)
    model = None
    if source is not None:  # unreachable model: fails here, before the reconstruction pass
        dtype = cfg.model_dtype or source.model_dtype
        model = load_causal_lm(source.model_name, source.revision, dtype, device, source.trust_remote_code)
    sae = loaded.sae.to(device)  # acts on raw activations

    metrics = ReconstructionMetrics(sae.d_in, sae.d_sae).to(device)
    with torch.no_grad():
        for batch in val_batches(dm, args.max_batches, args.progress, "reconstruction"):
            x, valid = batch["acts"].to(device).float(), batch["valid"].to(device)
            valid = sae.valid_positions(x, valid)  # less the activation sinks (max_norm_multiple)
            out = sae(x, valid)
            metrics.update(x, out.x_hat, out.f, valid)
    results: dict[str, Any] = {
        "command": "core",
        **loaded.label,
        "config": str(args.config),
        "reconstruction": {k: float(v) for k, v in metrics.compute().items()},
    }
    if source is not None:
        tokens = validation_tokens(dm.cache, cfg.n_sequences, progress=args.progress)  # [N, T]
        sums = core_lm_metrics(
            model,
            sae,
            source.layer,
            tokens,
            None,
            source.special_ids,
            cfg.batch_size,
            progress=args.progress,
        )
        results["lm"] = finalize_core_metrics(sums)
        results["model_name"], results["layer"] = source.model_name, source.layer
        results["n_sequences"] = int(tokens.shape[0])
    lines = ["# Core metrics", "", *_label_lines(loaded), "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in results["reconstruction"].items()]
    if "lm" in results:
        lines += [f"| {k} | {_fmt(v)} |" for k, v in results["lm"].items()]
        lines += [
            "",
            f"LM: `{results['model_name']}` layer {results['layer']}, {results['n_sequences']} sequences",
        ]
    _write(Path(args.out), results, "\n".join(lines) + "\n")
    return results


def run_unlearning(args: argparse.Namespace) -> dict[str, Any]:
    """``mtsae eval unlearning``: SAEBench's unlearning evaluation (full setting by default)."""
    from mtsae.evals.unlearning.report import save_best_recipe, summary_markdown
    from mtsae.evals.unlearning.run import UnlearningRun

    mmlu_source: str | dict[str, str] = args.mmlu_source
    if args.mmlu_file:
        mmlu_source = dict(kv.split("=", 1) for kv in args.mmlu_file)
    cfg = _settings(UnlearningConfig, args, mmlu_source=mmlu_source)
    loaded = load_eval_sae(args)
    dm = load_datamodule(args.config, config_overrides(args))
    check_d_in(loaded, dm, args.config)
    source = lm_source(dm, "eval unlearning")
    check_sae_source(loaded, source, args.config)
    run = UnlearningRun(cfg, source, cache_dir=Path(args.out) / "question_cache")
    run.load_data()  # every dataset read before the model is loaded
    device = resolve_device(args.device)
    run.prepare(device, progress=args.progress)
    sae = loaded.sae.to(device)  # raw activations: multipliers in raw units
    results = {"command": "unlearning", **loaded.label, **run.evaluate(sae, progress=args.progress)}
    out = Path(args.out)
    # the recipe names the SAE it was chosen with: the exported raw-activation SAE, beside the results
    recipe = save_best_recipe(results, sae, out)
    _write(out, results, summary_markdown(results))
    for w in results["warnings"]:
        print(f"mtsae eval unlearning: warning: {w}", file=sys.stderr)
    if recipe is not None:
        print(
            f"wrote {out / 'recipe.json'} (apply it: mtsae unlearn generate --recipe {out / 'recipe.json'} ...)"
        )
    return results


def run_disentanglement(args: argparse.Namespace) -> dict[str, Any]:
    """``mtsae eval disentanglement``: diagnostics over the validation rows, with figures."""
    from mtsae.evals.disentanglement import evaluate_disentanglement, results_to_json
    from mtsae.evals.disentanglement_figures import figures

    cfg = _settings(DisentanglementConfig, args)
    loaded = load_eval_sae(args)
    dm = load_datamodule(args.config, config_overrides(args))
    check_d_in(loaded, dm, args.config)
    setup_cache(dm)
    device = resolve_device(args.device)
    sae = loaded.sae.to(device)  # acts on raw activations
    truth = dm.ground_truth  # a GroundTruth, or None
    batches = val_batches(dm, cfg.max_batches, args.progress, "disentanglement")
    res = evaluate_disentanglement(sae, batches, truth, cfg)
    results = {"command": "disentanglement", **loaded.label, **results_to_json(res)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(res)
    for name, fig in figs.items():
        fig.savefig(out / f"{name}.png", dpi=120)
    scalars = results["scalars"]
    lines = ["# Disentanglement", "", *_label_lines(loaded), "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()]
    lines += ["", *[f"![{n}]({n}.png)" for n in figs]]
    _write(out, results, "\n".join(lines) + "\n")
    return results


# ---------------------------------------------------------------------------------------------- CLI
def _common(p: argparse.ArgumentParser) -> None:
    add_sae_options(p, "output folder for results.json and summary.md")


def build_parser() -> argparse.ArgumentParser:
    """The ``mtsae eval`` argument parser."""
    p = argparse.ArgumentParser(
        prog="mtsae eval", description="Evaluate a trained SAE (checkpoint or folder)."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{core,unlearning,disentanglement}")

    core = sub.add_parser("core", help="reconstruction metrics and CE-loss / KL scores with the LM")
    _common(core)
    add_settings_options(core, CoreConfig, defaults={"n_sequences": 256})
    core.add_argument(
        "--max-batches", type=int, default=None, help="cap on validation batches (reconstruction)"
    )
    core.add_argument("--no-lm", action="store_true", help="reconstruction metrics only (no LM needed)")

    un = sub.add_parser("unlearning", help="SAEBench unlearning score (WMDP-bio vs MMLU)")
    _common(un)
    add_settings_options(un, UnlearningConfig)  # one option per field, its docstring as help
    un.add_argument(
        "--mmlu-file",
        nargs="+",
        default=None,
        metavar="SUBSET=PATH",
        help="local file per MMLU subset (instead of --mmlu-source)",
    )

    dis = sub.add_parser("disentanglement", help="decoder coherence, density, persistence, recovery")
    _common(dis)
    add_settings_options(dis, DisentanglementConfig, defaults={"max_batches": None})
    return p


COMMANDS = {"core": run_core, "unlearning": run_unlearning, "disentanglement": run_disentanglement}


def main(argv: list[str] | None = None) -> int:
    """Run ``mtsae eval``; returns the exit status (2 for a user error, with its message on stderr)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def extra_errors() -> tuple[type, ...]:
        from mtsae.evals.unlearning.corpora import UnlearningDataError
        from mtsae.evals.unlearning.mcq import MCQDatasetError
        from mtsae.evals.unlearning.recipe import RecipeError

        return (MCQDatasetError, UnlearningDataError, RecipeError)

    label = f"mtsae eval {args.command}"
    return run_command(
        "eval", label, lambda: COMMANDS[args.command](args), extra_errors, getattr(args, "out", None)
    )


if __name__ == "__main__":
    sys.exit(main())
