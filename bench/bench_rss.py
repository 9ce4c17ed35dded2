"""Peak resident memory of training from a cache 1x and 8x as large (same model, same number of steps).

For each size one process (``--child``) builds the cache of the demo's synthetic source (d_in 64,
ctx 64, float32), then a fresh one trains the demo's MTSAE for a fixed number of steps with the training
loader (no validation); each reports its peak RSS (``VmHWM``). The row is the training processes'. Memory must not grow with the cache: the
loader holds a bounded number of shuffle windows whatever the number of rows.

    python bench/bench_rss.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.common import BenchConfig, Row  # noqa: E402


def child(cache_dir: str, n: int, steps: int) -> None:
    """Build the cache (``steps == 0``) or train from it; print this process's peak RSS."""
    import lightning as L

    from data import ActivationDataModule, SyntheticSource
    from mtsae import SAEModule

    dm = ActivationDataModule(
        SyntheticSource(d_in=64, ctx_len=64, seed=0),
        cache_dir=cache_dir,
        n_sequences=n,
        val_sequences=32,
        shard_size=1024,
        dtype="float32",
        batch_size=32,
        progress=False,
    )
    if steps == 0:
        dm.prepare_data()
        _report()
        return
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(SAEModule(64, 256), datamodule=dm)
    _report()


def _report() -> None:
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak
    hwm = next(
        line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")
    )
    print(json.dumps({"maxrss_kb": int(hwm.split()[1])}))


def run(cfg: BenchConfig) -> list[Row]:
    base = 1024 if cfg.quick else 2048
    steps = 40 if cfg.quick else 100
    rss, build = {}, {}
    for mult in (1, 8):
        for phase, out in ((0, build), (steps, rss)):  # build in one process, train in a fresh one
            res = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(cfg.workdir / f"rss{mult}"),
                    str(base * mult),
                    str(phase),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            out[mult] = json.loads(res.strip().splitlines()[-1])["maxrss_kb"] / 1024
    print(f"  peak RSS: 1x {rss[1]:.0f} MB, 8x {rss[8]:.0f} MB")
    mb = base * 64 * 64 * 4 / 2**20
    return [
        Row(
            "peak RSS training from an 8x / 1x cache",
            rss[8] / rss[1],
            "<= 1.1",
            f"{rss[1]:.0f} vs {rss[8]:.0f} MB; caches {mb:.0f} and {8 * mb:.0f} MB; {steps} steps "
            f"(building them, in its own process: {build[1]:.0f} vs {build[8]:.0f} MB)",
        )
    ]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        from bench.run_all import main

        raise SystemExit(main(["--only", "rss"]))
