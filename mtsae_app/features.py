"""``mtsae features``: a static feature dashboard (index.html + data) for a trained SAE.

The SAE is a Lightning checkpoint (``--ckpt``) or an exported folder (``--sae``: this project's export or a
SAELens folder); ``--config`` is the training YAML naming the activation source: its cache is read (and
built first when it does not exist yet: an LM plus text, or the synthetic source). With a language-model
source the tokens are shown as text and the promoted / suppressed output tokens are computed through the
LM's unembedding; with ground truth (synthetic data) each feature shows its closest true feature. The
dashboard is written to ``--out``; open ``--out/index.html`` in a browser (no server needed).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtsae.features.collect import DashboardTruth, FeaturesConfig
from mtsae_app.options import add_settings_options, settings_from_args
from mtsae_app.run_inputs import (
    EvalError,
    add_sae_options,
    check_d_in,
    check_sae_source,
    config_overrides,
    load_datamodule,
    load_eval_sae,
    run_command,
    setup_cache,
)

__all__ = ["build_parser", "main", "run_features"]

log = logging.getLogger("mtsae.features")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtsae features",
        description="Write a static feature dashboard (opens offline from a file) for a trained SAE.",
    )
    add_sae_options(p, "output folder of the site (index.html, feature.html, assets/, data/)")
    p.add_argument(
        "--features",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="features to show: ids and ranges (3 10-19), sample:N (N at random) or first:N (default: all)",
    )
    p.add_argument(
        "--no-lm", action="store_true", help="do not load the LM (no promoted / suppressed tokens)"
    )
    add_settings_options(p, FeaturesConfig)
    return p


def _ground_truth(dm: Any) -> DashboardTruth | None:
    """The synthetic source's planted features (``None`` when the data have none): the cache's
    :class:`mtsae.evals.ground_truth.GroundTruth`, the groups' mean spans from the source and the
    per-token coefficients from the cache."""
    gt = dm.ground_truth
    if gt is None:
        return None
    n_true = gt.features.shape[0]
    index = gt.group_index if gt.group_index is not None else torch.zeros(n_true, dtype=torch.long)
    names = list(gt.group_names)
    groups = getattr(dm.source, "groups", None)
    spans = [float(g.mean_span) for g in groups] if groups and len(groups) == len(names) else None
    cache = dm.cache
    return DashboardTruth(
        features=gt.features.float(),
        group_index=index.long(),
        group_names=names or ["all"],
        group_spans=spans,
        coefficients=lambda rows: cache.ground_truth_rows("coefficients", rows),
    )


def run_features(args: argparse.Namespace) -> Path:
    """Build the dashboard; returns the path of its ``index.html``."""
    from callbacks.core_metrics import is_lm_source
    from mtsae.features import collect_dashboard, select_features, write_site
    from mtsae.lm.loading import resolve_device

    try:
        cfg = settings_from_args(FeaturesConfig, args)
    except ValueError as e:
        raise EvalError(f"invalid option: {e}") from e
    loaded = load_eval_sae(args)
    try:
        features = select_features(args.features, loaded.sae.d_sae, cfg.seed)
    except ValueError as e:
        raise EvalError(str(e)) from e
    dm = load_datamodule(args.config, config_overrides(args))
    check_d_in(loaded, dm, args.config)
    lm_source = dm.source if is_lm_source(dm.source) else None
    if lm_source is not None:
        check_sae_source(loaded, lm_source, args.config)
    if dm.cache_path is None and not (dm.cache_root / "manifest.json").exists():
        log.info("no activation cache at %s: building it from the config's source", dm.cache_root)
        dm.prepare_data()
    setup_cache(dm)
    cache = dm.cache
    rows = (
        np.concatenate([cache.rows("train"), cache.rows("val")])
        if cfg.split == "all"
        else cache.rows(cfg.split)
    )
    device = resolve_device(args.device)

    lm, token_text = None, None
    if lm_source is not None:
        from mtsae.lm.loading import load_causal_lm, load_tokenizer

        tok = load_tokenizer(lm_source.model_name, lm_source.revision, lm_source.trust_remote_code)

        def token_text(ids: list[int]) -> list[str]:
            return [tok.decode([i], clean_up_tokenization_spaces=False) for i in ids]

        if not args.no_lm:
            lm = load_causal_lm(
                lm_source.model_name, lm_source.revision, "float32", device, lm_source.trust_remote_code
            )
    truth = _ground_truth(dm)
    data = collect_dashboard(
        loaded.sae,
        cache.read,
        rows,
        cfg,
        features=features,
        lm=lm,
        token_text=token_text,
        truth=truth,
        device=device,
        progress=args.progress,
    )
    label = dict(loaded.label)
    if "checkpoint" in label:
        data["meta"]["source"] = f"{label['checkpoint']} (step {label.get('checkpoint_step')})"
    else:
        data["meta"]["source"] = str(label.get("sae"))
    if lm_source is not None:
        data["meta"]["model"] = f"{lm_source.model_name} layer {lm_source.layer}"
    return write_site(data, args.out)


def main(argv: list[str] | None = None) -> int:
    """Run ``mtsae features``; returns the exit status (2 for a user error, with its message on stderr)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    written: list[Path] = []
    status = run_command(
        "features", "mtsae features", lambda: written.append(run_features(args)), out=args.out
    )
    if status == 0:
        print(f"wrote {written[0]} (open it in a browser: file://{written[0].resolve()})")
    return status


if __name__ == "__main__":
    sys.exit(main())
