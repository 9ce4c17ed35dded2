"""``mtsae compare``: train a set of SAEs on equal terms and write a comparison report.

    mtsae compare --config configs/compare/temporal.yaml --jobs 2     # or: python -m mtsae_app compare ...
    mtsae compare --config configs/compare/temporal.yaml --only-report

The command line only: the config schema, the runner, the frontiers and the report are the library's
:mod:`mtsae.compare`. Each run is the checkout's ``train.py`` in its own process.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from mtsae.compare.config import load_compare_config
from mtsae.compare.report import write_report
from mtsae.compare.results import collect_results
from mtsae.compare.runner import now, run_dir, train_all, train_args
from mtsae_app.checkout import CheckoutNotFoundError, require_checkout

__all__ = ["build_parser", "main", "TIMING_FILE"]

log = logging.getLogger("mtsae.compare")

#: ``<out>/<name>/timing.json``: wall time of the invocations that trained something
TIMING_FILE = "timing.json"


def build_parser() -> argparse.ArgumentParser:
    """The ``mtsae compare`` argument parser."""
    p = argparse.ArgumentParser(
        prog="mtsae compare",
        description="Train a set of SAEs on equal terms (one train.py process per run) and write a "
        "comparison report: final metrics, L0-matched frontiers over seeds, validation curves.",
        epilog="Config schema: python -c 'import mtsae.compare.config as c; help(c)'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="compare config YAML (e.g. configs/compare/temporal.yaml)")
    p.add_argument("--out", default="reports", help="root folder of reports (default: reports)")
    p.add_argument(
        "--jobs", type=int, default=1, help="training processes at once, one thread each (default 1)"
    )
    p.add_argument(
        "--only-report", action="store_true", help="train nothing; rebuild the report from finished runs"
    )
    p.add_argument(
        "--runs", nargs="+", metavar="RUN", help="train only these runs (the report shows all finished)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every run after its own overlays, e.g. --set data.cache_dir=/scratch/cache "
        "(repeatable; part of each run's recorded specification)",
    )
    p.add_argument("--dry-run", action="store_true", help="print each run's train.py command and exit")
    return p


def _record_timing(root: Path, wall_s: float, jobs: int, started: str, resumed: bool = True) -> dict:
    """Add this invocation's wall time to ``timing.json`` (a resumed comparison sums its invocations);
    ``resumed=False`` (no run had finished when it started) starts a new record."""
    path = root / TIMING_FILE
    timing = json.loads(path.read_text()) if path.exists() and resumed else {}
    timing = {
        "wall_s": timing.get("wall_s", 0.0) + wall_s,
        "jobs": jobs,
        "started": timing.get("started", started),
        "finished": now(),
        "invocations": timing.get("invocations", 0) + 1,
    }
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timing, indent=1))
    return timing


def main(argv: list[str] | None = None) -> int:
    """Run ``mtsae compare``; returns the exit status (1 when a run failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not log.handlers:  # our messages only: each training process writes its own log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s compare: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    try:
        cfg = load_compare_config(args.config)
    except ValueError as e:  # a config error: one line that says what to change, exit status 2
        print(f"mtsae compare: {e}", file=sys.stderr)
        return 2
    extra = []
    for s in args.set:
        if "=" not in s:
            raise SystemExit(f"--set expects KEY=VALUE, got {s!r}")
        extra.append(f"--{s.removeprefix('--')}")
    out = Path(args.out)
    root = out / cfg.name
    selected = cfg.runs
    if args.runs:
        unknown = sorted(set(args.runs) - {r.name for r in cfg.runs})
        if unknown:
            raise SystemExit(f"--runs: unknown run(s) {unknown}; the config has {[r.name for r in cfg.runs]}")
        selected = [r for r in cfg.runs if r.name in args.runs]
    if args.dry_run:
        for run in selected:
            print(f"# {run.name}\npython train.py {shlex.join(train_args(out, cfg, run, extra))}")
        return 0
    failed: list[str] = []
    if not args.only_report:
        try:
            train_py = require_checkout("compare") / "train.py"
        except CheckoutNotFoundError as e:
            print(e, file=sys.stderr)
            return 2
        log.info("%d runs, --jobs %d, output %s", len(selected), args.jobs, root)
        started, t0 = now(), time.perf_counter()
        # a comparison that starts with no finished run times itself afresh (an old timing.json, e.g.
        # one committed with an earlier grid, is not this grid's time)
        resumed = any((run_dir(out, cfg, r) / "summary.json").exists() for r in cfg.runs)
        try:
            failed = train_all(out, cfg, selected, extra, jobs=args.jobs, train_py=train_py)
        except ValueError as e:  # e.g. a finished run trained with another specification
            print(f"mtsae compare: {e}", file=sys.stderr)
            return 2
        _record_timing(root, time.perf_counter() - t0, args.jobs, started, resumed)
    results = collect_results(out, cfg, extra)
    if args.only_report and not results:
        raise SystemExit(f"--only-report: no finished run under {root / 'runs'}")
    timing_path = root / TIMING_FILE
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else None
    command = "mtsae compare " + shlex.join(argv)
    path = write_report(out, cfg, results, command, args.config, timing)
    print(f"report: {path}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (see their train.log)", file=sys.stderr)
        return 1
    return 0
