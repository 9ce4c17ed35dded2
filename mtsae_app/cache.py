"""``mtsae cache verify PATH [--repair]``: read a whole activation cache and report every bad shard.
``mtsae cache norms PATH``: the norms of the stored activations at BOS, at the other invalid positions and
at ordinary tokens, before and after the SAE's zeroing of invalid positions (Gemma's BOS residual is many
times an ordinary token's).

The checks and the repair are the training application's (:mod:`data.verify`, found in the checkout);
this module parses the options and prints the verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_parser", "main", "position_norms"]


#: the multiples of the median token norm that ``mtsae cache norms`` counts tokens above
SINK_MULTIPLES = (10.0, 100.0)


def _say(msg: str, err: bool = False) -> None:
    print(msg, file=sys.stderr if err else sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    """The ``mtsae cache`` argument parser."""
    p = argparse.ArgumentParser(
        prog="mtsae cache",
        description="Check an activation cache: read every shard, report every bad one (verify), or look at "
        "the activation norms at BOS and at ordinary tokens (norms).",
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="action", required=True)
    v = sub.add_parser("verify", help="read every shard and report the bad ones", allow_abbrev=False)
    v.add_argument("path", help="the cache directory (the one holding manifest.json)")
    v.add_argument(
        "--repair",
        action="store_true",
        help="delete bad shards and mark the cache incomplete, so the next build regenerates exactly those",
    )
    v.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    n = sub.add_parser(
        "norms",
        help="activation norms at BOS, other invalid positions and ordinary tokens",
        allow_abbrev=False,
    )
    n.add_argument("path", help="the cache directory (the one holding manifest.json)")
    n.add_argument("--rows", type=int, default=64, help="the first ROWS training rows (default: %(default)s)")
    n.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return p


def _summary(norms: torch.Tensor) -> dict[str, float | int]:
    """Count, median and max of a 1-D tensor of norms (``n`` 0 when empty)."""
    if not norms.numel():
        return {"n": 0}
    return {"n": norms.numel(), "median": norms.median().item(), "max": norms.max().item()}


def position_norms(path: str | Path, rows: int = 64) -> dict[str, Any]:
    """L2 norms of the cached activations of the first ``rows`` training rows: at BOS (position 0), at the
    other invalid positions (EOS, PAD) and at valid tokens, each as stored (``*``) and as the SAE's
    convolutions receive them (``*_zeroed``: :meth:`mtsae.sae.model.MTSAE.encoder_input` of a fresh SAE,
    ``b_dec`` = 0, so only the zeroing of invalid positions changes anything). Also ``bos_over_valid``,
    the ratio of the medians, and ``sinks``: per multiple ``m`` of :data:`SINK_MULTIPLES`, how many valid
    tokens have a norm above ``m`` times the median valid norm of these rows (the ``max_norm_multiple``
    rule, :mod:`mtsae.sae.positions`, on these rows as one batch) and their share of the summed squared
    norm of the valid tokens."""
    from data.cache import ActivationCache
    from mtsae.sae.model import MTSAE
    from mtsae.sae.positions import ordinary_positions

    cache = ActivationCache(path)
    try:
        batch = cache.read(cache.rows("train")[:rows])
    finally:
        cache.close()
    x_NTD, valid_NT = batch["acts"].float(), batch["valid"]
    u_NTD = MTSAE(cache.d_in, d_sae=1).encoder_input(x_NTD, valid_NT)
    bos_NT = torch.zeros_like(valid_NT)
    bos_NT[:, 0] = True
    out: dict = {}
    for suffix, t in (("", x_NTD), ("_zeroed", u_NTD)):
        norms_NT = t.norm(dim=-1)
        out["bos" + suffix] = _summary(norms_NT[bos_NT & ~valid_NT])
        out["other_invalid" + suffix] = _summary(norms_NT[~bos_NT & ~valid_NT])
        out["valid" + suffix] = _summary(norms_NT[valid_NT])
    out["bos_over_valid"] = out["bos"]["median"] / out["valid"]["median"] if out["bos"]["n"] else None
    sq_NT = torch.where(valid_NT, x_NTD.double().pow(2).sum(-1), 0.0)
    total = float(sq_NT.sum())
    out["sinks"] = []
    for m in SINK_MULTIPLES:
        sink_NT = valid_NT & ~ordinary_positions(x_NTD, valid_NT, m)
        share = float(sq_NT[sink_NT].sum()) / total if total > 0 else 0.0
        out["sinks"].append({"multiple": m, "n": int(sink_NT.sum()), "share": share})
    return out


def main(argv: list[str] | None = None) -> int:
    """``mtsae cache verify PATH [--repair]``: exit status 0 when sound (or repaired), 1 when bad shards remain."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.action == "norms":
        return _norms(args)
    from data.cache_format import CacheMismatchError, read_manifest
    from data.verify import repair_cache, verify_cache

    try:
        bad = verify_cache(args.path, progress=args.progress)
    except CacheMismatchError as err:
        _say(f"mtsae cache verify: {err}", err=True)
        return 1
    manifest = read_manifest(Path(args.path) / "manifest.json")
    n = len(manifest["shards"])
    if not bad:
        if not manifest.get("complete"):
            _say(
                f"{args.path}: all {n} listed shards verified, but the cache is incomplete (an interrupted or "
                "repaired build): run the training command again to build the missing shards"
            )
            return 0
        _say(f"{args.path}: all {n} shards verified")
        return 0
    for b in bad:
        _say(f"bad shard {b.file}: {b.reason}", err=True)
    if not args.repair:
        _say(
            f"{len(bad)} of {n} shards are bad; `mtsae cache verify {args.path} --repair` deletes them so that "
            "the next build regenerates them",
            err=True,
        )
        return 1
    try:
        repair_cache(args.path, bad)
    except OSError as e:  # a read-only or full disk: the manifest is written first, so nothing was deleted
        _say(f"cannot repair {args.path}: {getattr(e, 'strerror', None) or e}; nothing was deleted", err=True)
        return 1
    _say(
        f"deleted {len(bad)} bad shards and marked the cache incomplete; run the build again (e.g. the same "
        "`python train.py fit --config ...`) to regenerate them"
    )
    return 0


def _norms(args: argparse.Namespace) -> int:
    """``mtsae cache norms``: one line per kind of position, or ``--json``."""
    from data.cache_format import CacheMismatchError

    try:
        norms = position_norms(args.path, args.rows)
    except (CacheMismatchError, FileNotFoundError) as err:
        _say(f"mtsae cache norms: {err}", err=True)
        return 1
    if args.json:
        _say(json.dumps(norms, indent=2))
        return 0
    names = {
        "bos": "BOS (position 0)",
        "other_invalid": "other invalid (EOS/PAD)",
        "valid": "ordinary tokens",
    }
    _say(f"{args.path}: L2 norms of the activations, first {args.rows} training rows")
    _say(f"{'':26} {'n':>7} {'median':>12} {'max':>12}   after zeroing (median, max)")
    for key, name in names.items():
        a, z = norms[key], norms[key + "_zeroed"]
        if a["n"]:
            _say(
                f"{name:26} {a['n']:7d} {a['median']:12,.1f} {a['max']:12,.1f}   {z['median']:,.1f}, {z['max']:,.1f}"
            )
        else:
            _say(f"{name:26} {0:7d}")
    if norms["bos_over_valid"] is not None:
        _say(f"BOS / ordinary (medians): {norms['bos_over_valid']:.1f}x")
    n_valid = norms["valid"]["n"]
    for s in norms["sinks"]:
        _say(
            f"ordinary tokens above {s['multiple']:g} x median: {s['n']} of {n_valid}, "
            f"{100 * s['share']:.1f}% of the summed squared norm (model.max_norm_multiple: {s['multiple']:g} drops them)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
