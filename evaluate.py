"""Offline evaluation of a trained SAE: ``mtsae eval {core,unlearning,disentanglement}``.

Each command takes the SAE, either a Lightning checkpoint (``--ckpt``, the :class:`mtsae.SAEModule`) or
an exported SAE folder (``--sae``: this project's export or a SAELens folder, e.g. a public SAE, read by
:func:`mtsae.load_sae`), and the training YAML (``--config``, e.g. the ``config.yaml`` saved beside the
run) that says which data source, cache and LM to evaluate on, and writes ``results.json`` and
``summary.md`` to ``--out``:

- ``core``: reconstruction metrics over the validation split of the cache (FVU, MSE, L0, ...) and
  SAEBench's CE-loss / KL scores with the SAE spliced into the LM (:mod:`mtsae.core_eval`);
- ``unlearning``: SAEBench's unlearning evaluation, full setting by default (all 24 orderings, all
  questions, 1024 sparsity rows of 1024 tokens; :mod:`mtsae.unlearning_eval`);
- ``disentanglement``: decoder coherence, density, scale attribution, persistence and ground-truth
  recovery (:mod:`mtsae.disentanglement`), with figures as PNG files.

Checks that need no heavy work come first (checkpoint, config, ``d_in``, source kind, dataset and model
reachability), so a mistake fails in seconds with a message that says what to change.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = ["EvalError", "EvalSAE", "build_parser", "main", "load_module", "load_eval_sae", "load_datamodule"]

log = logging.getLogger("mtsae.eval")


#: top-level keys of a training configuration; a config saved by ``train.py fit`` also has the fit
#: subcommand's own keys (``ckpt_path``, ``weights_only``, ...), which are dropped
_CONFIG_KEYS = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler")


class EvalError(RuntimeError):
    """A user error (missing file, mismatched config): printed as one message, exit status 2."""


# ---------------------------------------------------------------------------------------------- loading
def load_module(ckpt: str) -> Any:
    """The :class:`mtsae.SAEModule` of a Lightning checkpoint (on CPU, eval mode)."""
    from mtsae import SAEModule

    path = Path(ckpt).expanduser()
    if not path.is_file():
        raise EvalError(
            f"checkpoint {str(path)!r} does not exist: pass --ckpt with a Lightning checkpoint of a training "
            "run (e.g. runs/<name>/version_<n>/checkpoints/last.ckpt)"
        )
    # weights_only: a checkpoint is data, never code (explicit, whatever torch's default is)
    module = SAEModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
    step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    module.checkpoint_step = None if step is None else int(step)  # printed in every summary
    return module.eval()


class EvalSAE(NamedTuple):
    sae: Any
    """the :class:`mtsae.MTSAE` acting on raw activations (eval mode, on CPU)"""
    label: dict[str, Any]
    """where it came from, for results.json: ``{"checkpoint": path, "checkpoint_step": step}`` or
    ``{"sae": path}``"""
    metadata: Any
    """its :class:`mtsae.SAEMetadata` (``None`` for a checkpoint)"""


def load_eval_sae(args: argparse.Namespace) -> EvalSAE:
    """The SAE of ``--ckpt`` (exported: the input scale folded in) or of ``--sae`` (an SAE folder)."""
    if args.ckpt is not None:
        module = load_module(args.ckpt)
        label = {"checkpoint": str(args.ckpt), "checkpoint_step": module.checkpoint_step}
        return EvalSAE(module.export_sae(), label, None)
    from mtsae.export import ExportFormatError, load_sae, read_metadata

    path = Path(args.sae).expanduser()
    if not path.is_dir():
        raise EvalError(
            f"--sae {str(path)!r} is not a folder: pass an exported SAE (runs/<name>/version_<n>/sae) or a "
            "SAELens folder (cfg.json + sae_weights.safetensors)"
        )
    try:
        return EvalSAE(load_sae(path), {"sae": str(args.sae)}, read_metadata(path))
    except ExportFormatError as e:
        raise EvalError(str(e)) from e


def _check_sae_source(loaded: EvalSAE, source: Any, config: str) -> None:
    """An SAE folder that names its layer / hook must match the config's language model source."""
    meta = loaded.metadata
    if meta is None:
        return
    where = f"the SAE {loaded.label.get('sae')!r}"
    hook = str(meta.hook_name or "")
    if meta.hook_name is not None and (meta.layer is None or not hook.endswith(("resid_post", "resid_pre"))):
        raise EvalError(
            f"{where} reads {meta.hook_name!r}; the evaluations read the residual stream after a decoder "
            "layer (blocks.L.hook_resid_post, or blocks.L+1.hook_resid_pre)"
        )
    if meta.layer is not None and int(meta.layer) != int(source.layer):
        raise EvalError(
            f"{where} was trained on layer {meta.layer} but the config {config!r} reads layer {source.layer}: "
            f"pass --set data.source.init_args.layer={meta.layer} (or the config of that layer)"
        )
    ours, theirs = str(source.model_name).rstrip("/"), str(meta.model_name or "").rstrip("/")
    if theirs and ours.split("/")[-1].lower() != theirs.split("/")[-1].lower():
        log.warning("%s was trained on %r; the config's model is %r", where, theirs, ours)


def load_datamodule(config: str, overrides: list[str] | None = None) -> Any:
    """The :class:`data.ActivationDataModule` of a training YAML (instantiated, nothing built or run).

    ``overrides`` are extra LightningCLI arguments (``--data.cache_dir /elsewhere``).
    """
    if not Path(config).expanduser().is_file():
        raise EvalError(f"config {config!r} does not exist: pass --config with the training YAML of the run")
    import tempfile
    from unittest import mock

    import yaml

    from train import cli_main

    cfg = yaml.safe_load(Path(config).expanduser().read_text()) or {}
    if not isinstance(cfg, dict):
        raise EvalError(f"config {config!r} is not a YAML mapping of a training configuration")
    # the config.yaml saved by `train.py fit` has the fit subcommand's own keys: not model/data/trainer
    cfg = {k: v for k, v in cfg.items() if k in _CONFIG_KEYS}
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "config.yaml"
        clean.write_text(yaml.safe_dump(cfg))
        try:
            # LightningCLI warns when given args while sys.argv has some (ours: `mtsae eval ...`)
            with mock.patch.object(sys, "argv", sys.argv[:1]):
                cli = cli_main(["--config", str(clean), *(overrides or [])], run=False)
        except SystemExit as e:  # jsonargparse reports parse errors on stderr and exits
            raise EvalError(
                f"config {config!r} (with {overrides or []}) does not parse; see the message above"
            ) from e
    return cli.datamodule


def _check_d_in(loaded: EvalSAE, dm: Any, config: str) -> None:
    d_sae_in, d_cfg = int(loaded.sae.d_in), int(dm.d_in)
    if d_sae_in != d_cfg:
        kind, path = next(iter(loaded.label.items()))  # ("checkpoint", path) or ("sae", path)
        raise EvalError(
            f"the {kind} {path!r} has d_in={d_sae_in} but the config {config!r} gives activations of "
            f"width {d_cfg}: pass the config the {kind} was trained with (the config.yaml in its run dir)"
        )


def _lm_source(dm: Any, what: str) -> Any:
    from callbacks.core_metrics import is_lm_source

    if not is_lm_source(dm.source):
        raise EvalError(
            f"{what} needs a language-model data source (data.LMSource); the config uses "
            f"{type(dm.source).__name__}"
            + (" (--no-lm: reconstruction metrics only)" if what == "eval core" else "")
        )
    return dm.source


def _overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for kv in args.set_args:
        if "=" not in kv:
            raise EvalError(f"--set expects KEY=VALUE (e.g. data.cache_dir=/x), got {kv!r}")
        out.append("--" + kv.lstrip("-"))
    return out


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _setup_cache(dm: Any) -> None:
    try:
        dm.setup("validate")
    except FileNotFoundError as e:
        raise EvalError(
            f"{e}. The evaluation reads the validation rows of the activation cache: train first (the cache "
            "is built at the start of fit), or pass --set data.cache_path=DIR with an existing cache"
        ) from e


def _val_batches(dm: Any, max_batches: int | None, progress: bool, desc: str) -> Iterator[dict]:
    from tqdm.auto import tqdm

    loader = dm.val_dataloader()
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    for i, batch in enumerate(tqdm(loader, total=total, desc=desc, disable=not progress, leave=False)):
        if max_batches is not None and i >= max_batches:
            break
        yield batch


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return _jsonable(v.tolist())
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):  # numpy
        return _jsonable(v.tolist())
    return v


def _write(out: Path, results: dict[str, Any], summary: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
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
def run_core(args: argparse.Namespace) -> dict[str, Any]:
    """``mtsae eval core``: reconstruction metrics and CE-loss / KL scores on the validation rows."""
    from tqdm.auto import tqdm

    from mtsae.core_eval import core_lm_metrics, finalize_core_metrics, load_causal_lm
    from mtsae.metrics import ReconstructionMetrics

    loaded = load_eval_sae(args)
    dm = load_datamodule(args.config, _overrides(args))
    _check_d_in(loaded, dm, args.config)
    source = _lm_source(dm, "eval core") if not args.no_lm else None
    if source is not None:
        _check_sae_source(loaded, source, args.config)
    _setup_cache(dm)
    device = _device(args.device)
    model = None
    if source is not None:  # unreachable model: fails here, before the reconstruction pass
        dtype = args.model_dtype or source.model_dtype
        model = load_causal_lm(source.model_name, source.revision, dtype, device, source.trust_remote_code)
    sae = loaded.sae.to(device)  # acts on raw activations

    metrics = ReconstructionMetrics(sae.d_in, sae.d_sae).to(device)
    with torch.no_grad():
        for batch in _val_batches(dm, args.max_batches, args.progress, "reconstruction"):
            x, valid = batch["acts"].to(device).float(), batch["valid"].to(device)
            out = sae(x, valid)
            metrics.update(x, out.x_hat, out.f, valid)
    results: dict[str, Any] = {
        "command": "core",
        **loaded.label,
        "config": str(args.config),
        "reconstruction": {k: float(v) for k, v in metrics.compute().items()},
    }
    if source is not None:
        rows = dm.cache.rows("val")[: args.n_sequences]
        tokens = torch.cat(
            [
                dm.cache.read(rows[i : i + 64])["tokens"].long()
                for i in tqdm(
                    range(0, len(rows), 64), desc="read tokens", disable=not args.progress, leave=False
                )
            ]
        )  # [N, T]
        sums = core_lm_metrics(
            model,
            sae,
            source.layer,
            tokens,
            None,
            source.special_ids,
            args.batch_size,
            act_scale=1.0,
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
    from mtsae.core_eval import load_causal_lm, load_tokenizer
    from mtsae.export import save_sae
    from mtsae.unlearning import GridConfig
    from mtsae.unlearning_eval import (
        UnlearningConfig,
        best_recipe,
        evaluate_unlearning,
        filter_questions,
        load_unlearning_data,
        summary_markdown,
    )

    grid = GridConfig(
        retain_thresholds=args.retain_thresholds,
        n_features=args.n_features,
        multipliers=args.multipliers,
        min_mmlu_accuracy=args.min_mmlu_accuracy,
    )
    mmlu_source: str | dict[str, str] = args.mmlu_source
    if args.mmlu_file:
        mmlu_source = dict(kv.split("=", 1) for kv in args.mmlu_file)
    cfg = UnlearningConfig(
        forget_corpus=args.forget_corpus,
        retain_corpus=args.retain_corpus,
        retain_config=args.retain_config or None,
        retain_split=args.retain_split,
        wmdp_source=args.wmdp_source,
        mmlu_source=mmlu_source,
        all_perms=args.all_perms,
        max_questions=args.max_questions,
        n_sparsity_rows=args.n_sparsity_rows,
        seq_len=args.seq_len,
        grid=grid,
        llm_batch_size=args.llm_batch_size,
        mcq_batch_size=args.mcq_batch_size,
        seed=args.seed,
        saebench_exact=args.saebench_exact,
        position_rule=args.position_rule,
    )
    loaded = load_eval_sae(args)
    dm = load_datamodule(args.config, _overrides(args))
    _check_d_in(loaded, dm, args.config)
    source = _lm_source(dm, "eval unlearning")
    _check_sae_source(loaded, source, args.config)
    name = args.model_name or source.model_name
    revision = args.revision if args.model_name else (args.revision or source.revision)
    dtype = args.model_dtype or source.model_dtype
    tokenizer = load_tokenizer(name, revision, source.trust_remote_code)
    data = load_unlearning_data(tokenizer, cfg)  # every dataset read before the model is loaded
    device = _device(args.device)
    model = load_causal_lm(name, revision, dtype, device, source.trust_remote_code)
    model_id = {"name": name, "revision": revision, "dtype": dtype}
    cache_dir = args.question_cache_dir or str(Path(args.out) / "question_cache")
    filtered = filter_questions(
        model,
        tokenizer,
        data.questions,
        all_perms=cfg.all_perms,
        batch_size=cfg.mcq_batch_size,
        cache_dir=cache_dir,
        model_id=model_id,
        progress=args.progress,
        strict_letters=cfg.saebench_exact,
    )
    sae = loaded.sae.to(device)  # raw activations: multipliers in raw units
    results = evaluate_unlearning(
        model, tokenizer, sae, source.layer, data, filtered, cfg, progress=args.progress
    )
    results = {
        "command": "unlearning",
        **loaded.label,
        "model": model_id,
        **results,
    }
    out = Path(args.out)
    # the recipe names the SAE it was chosen with: the exported raw-activation SAE, beside the results
    recipe = best_recipe(results, save_sae(sae.cpu(), out / "sae"), out)
    if recipe is not None:
        results["recipe"] = str(recipe.save(out / "recipe.json"))
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
    from mtsae.disentanglement import evaluate_disentanglement, figures, results_to_json

    loaded = load_eval_sae(args)
    dm = load_datamodule(args.config, _overrides(args))
    _check_d_in(loaded, dm, args.config)
    _setup_cache(dm)
    device = _device(args.device)
    sae = loaded.sae.to(device)  # acts on raw activations
    truth = dm.ground_truth or None
    batches = _val_batches(dm, args.max_batches, args.progress, "disentanglement")
    res = evaluate_disentanglement(sae, batches, act_scale=1.0, ground_truth=truth)
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
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="Lightning checkpoint of the SAEModule (.ckpt)")
    which.add_argument(
        "--sae", help="exported SAE folder instead: this project's (run_dir/sae) or SAELens's (a public SAE)"
    )
    p.add_argument("--config", required=True, help="training YAML of the run (its saved config.yaml)")
    p.add_argument("--out", required=True, help="output folder for results.json and summary.md")
    p.add_argument(
        "--set",
        dest="set_args",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value after --config (repeatable), e.g. --set data.cache_dir=/elsewhere",
    )
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The ``mtsae eval`` argument parser."""
    p = argparse.ArgumentParser(
        prog="mtsae eval", description="Evaluate a trained SAE (checkpoint or folder)."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{core,unlearning,disentanglement}")

    core = sub.add_parser("core", help="reconstruction metrics and CE-loss / KL scores with the LM")
    _common(core)
    core.add_argument("--n-sequences", type=int, default=256, help="validation rows for the LM metrics")
    core.add_argument("--batch-size", type=int, default=8, help="rows per LM forward")
    core.add_argument(
        "--max-batches", type=int, default=None, help="cap on validation batches (reconstruction)"
    )
    core.add_argument("--model-dtype", default=None, help="LM dtype (default: the source's)")
    core.add_argument("--no-lm", action="store_true", help="reconstruction metrics only (no LM needed)")

    un = sub.add_parser("unlearning", help="SAEBench unlearning score (WMDP-bio vs MMLU)")
    _common(un)
    un.add_argument("--forget-corpus", default=None, help="local bio-forget-corpus.jsonl (gated; see docs)")
    un.add_argument(
        "--model-name", default=None, help="unlearning LM (default: the source's; e.g. gemma-2-2b-it)"
    )
    un.add_argument("--revision", default=None, help="revision of the unlearning LM")
    un.add_argument("--model-dtype", default=None, help="LM dtype (default: the source's)")
    un.add_argument("--retain-corpus", default="wikitext", help="retain corpus: hub dataset, folder or file")
    un.add_argument("--retain-config", default="wikitext-2-raw-v1", help="retain corpus config ('' for none)")
    un.add_argument("--retain-split", default="test")
    un.add_argument("--wmdp-source", default="cais/wmdp", help="cais/wmdp, a snapshot folder or a local file")
    un.add_argument("--mmlu-source", default="cais/mmlu", help="cais/mmlu or a snapshot folder")
    un.add_argument(
        "--mmlu-file", nargs="+", default=None, metavar="SUBSET=PATH", help="local file per MMLU subset"
    )
    un.add_argument(
        "--all-perms",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="filter questions under all 24 orderings (SAEBench; --no-all-perms: original order only)",
    )
    un.add_argument("--max-questions", type=int, default=None, help="cap per question set (default: all)")
    un.add_argument("--n-sparsity-rows", type=int, default=1024)
    un.add_argument("--seq-len", type=int, default=1024)
    un.add_argument("--retain-thresholds", type=float, nargs="+", default=[0.001, 0.01])
    un.add_argument("--n-features", type=int, nargs="+", default=[10, 20])
    un.add_argument("--multipliers", type=float, nargs="+", default=[25.0, 50.0, 100.0, 200.0])
    un.add_argument("--min-mmlu-accuracy", type=float, default=0.99)
    un.add_argument("--llm-batch-size", type=int, default=4)
    un.add_argument("--mcq-batch-size", type=int, default=8)
    un.add_argument(
        "--question-cache-dir", default=None, help="cache of filtered questions (default: OUT/question_cache)"
    )
    un.add_argument("--seed", type=int, default=42)
    un.add_argument(
        "--saebench-exact",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SAEBench's conventions (default): position 0 left alone, sparsities rounded to 6 decimals, "
        "SAEBench's row packing, SAE in the model's dtype, instruct model and single-token letters required. "
        "--no-saebench-exact: this project's choices (docs/saebench_unlearning.md)",
    )
    un.add_argument(
        "--position-rule",
        choices=["saebench", "special_tokens"],
        default=None,
        help="override which positions the clamp may change (default: from --saebench-exact)",
    )

    dis = sub.add_parser("disentanglement", help="decoder coherence, density, persistence, recovery")
    _common(dis)
    dis.add_argument("--max-batches", type=int, default=None, help="cap on validation batches")
    return p


COMMANDS = {"core": run_core, "unlearning": run_unlearning, "disentanglement": run_disentanglement}


def main(argv: list[str] | None = None) -> int:
    """Run ``mtsae eval``; returns the exit status (2 for a user error, with its message on stderr)."""
    from data import CacheMismatchError, SourceUnavailableError
    from mtsae.core_eval import LMUnavailableError
    from mtsae.mcq import MCQDatasetError
    from mtsae.unlearning_eval import UnlearningDataError
    from mtsae.unlearning_recipe import RecipeError

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    user_errors = (
        EvalError,
        SourceUnavailableError,
        LMUnavailableError,
        MCQDatasetError,
        UnlearningDataError,
        CacheMismatchError,
        RecipeError,
    )
    try:
        COMMANDS[args.command](args)
    except user_errors as e:
        print(f"mtsae eval {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
