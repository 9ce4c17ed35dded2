"""Train the runs of a comparison, each as its own ``train.py fit`` process, ``jobs`` at a time.

Every run has the fixed folder ``<out>/<name>/runs/<run>/`` (logs, checkpoints, exported SAE,
``summary.json``, ``train.log``), so results are found again: a run whose ``summary.json`` exists is
skipped, an unfinished one is resumed from its ``checkpoints/last.ckpt`` (or restarted when there is
none). A finished run that was trained with a different specification is an error, not silently reused.
Each process runs with ``OMP_NUM_THREADS=1`` (one core per run): ``--jobs N`` uses N cores.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from mtsae.compare.config import CompareConfig, RunSpec
from mtsae.hashing import file_sha256

__all__ = [
    "SPEC_FILE",
    "LOG_FILE",
    "run_dir",
    "train_args",
    "train_run",
    "train_all",
    "build_cache_first",
    "RunFailed",
]

log = logging.getLogger("mtsae.compare")

SPEC_FILE = "compare_run.json"
LOG_FILE = "train.log"
#: environment of every training process: one thread each, so that ``--jobs`` runs share the cores
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class RunFailed(RuntimeError):
    """A training process ended with an error (its log is ``<run dir>/train.log``)."""


def run_dir(out: Path, cfg: CompareConfig, run: RunSpec) -> Path:
    """The fixed folder of a run: ``<out>/<name>/runs/<run>/``."""
    return Path(out) / cfg.name / "runs" / run.name


def _spec(cfg: CompareConfig, run: RunSpec, extra: Sequence[str]) -> dict[str, Any]:
    """What decides a run's result; stored beside it to detect a changed specification."""
    return {"base": cfg.base, "overrides": [*cfg.overrides, *extra], "configs": run.configs, "args": run.args}


def _move_checkpoints(callbacks: list, rd: Path) -> bool:
    """Point every ``ModelCheckpoint`` of ``callbacks`` that pins a ``dirpath`` at ``<run dir>/checkpoints``
    (in place); whether any did."""
    moved = False
    for cb in callbacks:
        init = cb.get("init_args") if isinstance(cb, dict) else None
        if (
            "ModelCheckpoint" in str(cb.get("class_path", ""))
            and isinstance(init, dict)
            and init.get("dirpath")
        ):
            init["dirpath"] = str(rd / "checkpoints")
            moved = True
    return moved


def _checkpoint_dirs(base: str, rd: Path) -> list[str]:
    """If the base config pins a ``ModelCheckpoint`` ``dirpath`` (shared by every run), an override that
    moves it to ``<run dir>/checkpoints``; otherwise nothing (checkpoints go to the logger's folder)."""
    callbacks = ((yaml.safe_load(Path(base).read_text()) or {}).get("trainer") or {}).get("callbacks") or []
    return [f"--trainer.callbacks={json.dumps(callbacks)}"] if _move_checkpoints(callbacks, rd) else []


def _run_overrides(overrides: Sequence[str], rd: Path) -> list[str]:
    """The shared overrides for one run: a callback list given there (``trainer.callbacks``) gets its
    pinned checkpoint folders moved into the run folder, as the base config's do."""
    out = []
    for token in overrides:
        key, sep, value = token.partition("=")
        if key == "--trainer.callbacks" and sep:
            callbacks = json.loads(value)
            if isinstance(callbacks, list) and _move_checkpoints(callbacks, rd):
                token = f"{key}={json.dumps(callbacks)}"
        out.append(token)
    return out


def train_args(
    out: Path, cfg: CompareConfig, run: RunSpec, extra: Sequence[str] = (), ckpt_path: str | None = None
) -> list[str]:
    """The ``train.py`` arguments of a run (``fit`` included)."""
    rd = run_dir(out, cfg, run)
    args = ["fit", "--config", cfg.base, *_checkpoint_dirs(cfg.base, rd), *_run_overrides(cfg.overrides, rd)]
    for c in run.configs:
        args += ["--config", c]
    args += [
        *run.args,
        *extra,  # --set: forced on every run, after the run's own overlays
        "--trainer.default_root_dir",
        str(rd),
        "--trainer.logger.init_args.save_dir",
        str(rd.parent),
        "--trainer.logger.init_args.name",
        run.name,
        "--trainer.logger.init_args.version",
        "",  # no version_N sub-folder: the run folder is fixed
    ]
    if ckpt_path is not None:
        args += ["--ckpt_path", ckpt_path]
    return args


def _file_hashes(cfg: CompareConfig, run: RunSpec) -> dict[str, str]:
    """Content hashes of the base config and the run's overlays (to notice edits after training)."""
    return {p: file_sha256(p)[:16] for p in [cfg.base, *run.configs]}


def now() -> str:
    """The local time, ISO format (seconds)."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _prepare(out: Path, cfg: CompareConfig, run: RunSpec, extra: Sequence[str]) -> dict[str, Any] | None:
    """Check a run's recorded specification; ``None`` when it has finished (skip it), else its record."""
    rd = run_dir(out, cfg, run)
    spec = _spec(cfg, run, extra)
    summary_path, spec_path = rd / "summary.json", rd / SPEC_FILE
    recorded = json.loads(spec_path.read_text()) if spec_path.exists() else None
    if recorded is not None and recorded.get("spec") != spec:
        if summary_path.exists():
            raise ValueError(
                f"run {run.name!r} in {rd} was trained with a different specification:\n"
                f"  recorded: {recorded.get('spec')}\n  now:      {spec}\n"
                "delete that folder to retrain it, or give the run another name"
            )
        log.info("run %s: unfinished with another specification, restarting", run.name)
        shutil.rmtree(rd)
        recorded = None
    if summary_path.exists():
        if recorded is not None and recorded.get("files") != _file_hashes(cfg, run):
            log.warning(
                "run %s: its config files changed since it was trained; delete %s to retrain", run.name, rd
            )
        log.info("run %s: finished, skipped (%s)", run.name, summary_path)
        return None
    return {"spec": spec, "files": _file_hashes(cfg, run)}


def _train_process(train_py: Path, args: list[str], log_file: Path, what: str, mode: str = "w") -> None:
    """Run ``train_py`` with ``args`` (one thread), output into ``log_file``; :class:`RunFailed` with the
    log's tail when it fails."""
    with open(log_file, mode) as fh:
        proc = subprocess.run(
            [sys.executable, str(train_py), *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **THREAD_ENV},
            check=False,
        )
    if proc.returncode != 0:
        tail = log_file.read_text().splitlines()[-15:]
        raise RunFailed(
            f"{what} failed (exit status {proc.returncode}); log: {log_file}\n"
            + "\n".join(f"  | {line}" for line in tail)
        )


def train_run(
    out: Path, cfg: CompareConfig, run: RunSpec, extra: Sequence[str] = (), *, train_py: Path
) -> bool:
    """Train one run in a ``train.py fit`` process (``train_py``: the checkout's ``train.py``) unless it has
    finished; returns whether it trained.

    A run with ``summary.json`` is skipped (its recorded specification must match); an unfinished run with
    ``checkpoints/last.ckpt`` is resumed from it; otherwise its folder is cleared and it starts afresh.
    Raises :class:`RunFailed` when the process fails.
    """
    record = _prepare(out, cfg, run, extra)
    if record is None:
        return False
    rd = run_dir(out, cfg, run)
    spec_path = rd / SPEC_FILE
    last = rd / "checkpoints" / "last.ckpt"
    ckpt = str(last) if last.exists() else None
    if ckpt is None and rd.exists():
        log.info("run %s: unfinished and no checkpoint, restarting", run.name)
        shutil.rmtree(rd)
    rd.mkdir(parents=True, exist_ok=True)
    record["started"] = now()
    if spec_path.exists():
        record = {**json.loads(spec_path.read_text()), "resumed": now()}
    spec_path.write_text(json.dumps(record, indent=1))
    args = train_args(out, cfg, run, extra, ckpt)
    log.info(
        "run %s: %s\n  python train.py %s", run.name, "resuming" if ckpt else "training", shlex.join(args)
    )
    t0 = time.perf_counter()
    _train_process(train_py, args, rd / LOG_FILE, f"run {run.name!r}", mode="a")
    wall = time.perf_counter() - t0
    if not (rd / "summary.json").exists():
        raise RunFailed(
            f"run {run.name!r} ended without {rd / 'summary.json'}: the base config's trainer.callbacks must "
            "include callbacks.RunSummary (and a logger with save_dir/name/version, e.g. TensorBoardLogger)"
        )
    record["wall_s"] = record.get("wall_s", 0.0) + wall
    record["finished"] = now()
    spec_path.write_text(json.dumps(record, indent=1))
    log.info("run %s: finished in %.0f s", run.name, wall)
    return True


def train_all(
    out: Path,
    cfg: CompareConfig,
    runs: Sequence[RunSpec],
    extra: Sequence[str] = (),
    jobs: int = 1,
    *,
    train_py: Path,
) -> list[str]:
    """Train ``runs`` (finished ones are skipped), ``jobs`` processes at a time; returns failed run names.

    ``train_py`` is the ``train.py`` each run is launched with (the command passes its checkout's).

    Every specification is checked before anything trains. With ``jobs > 1`` one process first builds the
    shared activation cache (:func:`build_cache_first`), so that the parallel runs only read it. A failed
    run does not stop the others; its error is logged.
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if not Path(train_py).is_file():
        raise FileNotFoundError(
            f"mtsae compare launches {train_py}, which does not exist: run it from a source checkout of mtsae"
        )
    pending = [r for r in runs if _prepare(out, cfg, r, extra) is not None]
    failed: list[str] = []
    total = len(pending)
    done = 0

    def one(run: RunSpec) -> None:
        nonlocal done
        try:
            train_run(out, cfg, run, extra, train_py=train_py)
        except RunFailed as e:
            log.error("%s", e)
            failed.append(run.name)
        done += 1
        log.info("progress: %d/%d runs done (%d failed)", done, total, len(failed))

    if not pending:
        return failed
    if jobs == 1:
        for run in pending:
            one(run)
        return failed
    try:
        build_cache_first(out, cfg, pending[0], extra, train_py=train_py)
    except RunFailed as e:  # the runs will each report the problem; train the first alone as before
        log.error("%s", e)
        one(pending[0])
        pending = pending[1:]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, pending))
    return failed


def build_cache_first(
    out: Path, cfg: CompareConfig, run: RunSpec, extra: Sequence[str] = (), *, train_py: Path
) -> None:
    """Build (or check) the activation cache of ``run`` in one ``train.py fit --trainer.max_steps=0``
    process that trains nothing and writes nothing but the cache: no callbacks, no logger, its folder
    ``<out>/<name>/.cache_build`` removed afterwards. Runs share the data settings, so this is every run's
    cache. Raises :class:`RunFailed` when the process fails."""
    tmp = Path(out) / cfg.name / ".cache_build"
    args = [
        *train_args(out, cfg, run, extra),
        "--trainer.max_steps=0",
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp}",
    ]
    tmp.mkdir(parents=True, exist_ok=True)
    log.info("building the shared activation cache before the parallel runs")
    try:
        _train_process(train_py, args, tmp / LOG_FILE, "building the activation cache")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
