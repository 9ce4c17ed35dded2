"""``mtsae cache verify PATH [--repair]``: read a whole activation cache and report every bad shard.

The checks and the repair are the training application's (:mod:`data.verify`, found in the checkout);
this module parses the options and prints the verdict.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]


def _say(msg: str, err: bool = False) -> None:
    print(msg, file=sys.stderr if err else sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    """The ``mtsae cache`` argument parser."""
    p = argparse.ArgumentParser(
        prog="mtsae cache",
        description="Check an activation cache: read every shard, report every bad one.",
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
    return p


def main(argv: list[str] | None = None) -> int:
    """``mtsae cache verify PATH [--repair]``: exit status 0 when sound (or repaired), 1 when bad shards remain."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
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


if __name__ == "__main__":
    sys.exit(main())
