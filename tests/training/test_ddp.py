"""Multi-GPU DDP simulated on CPU (2 processes, gloo): ``configs/tiny_lm.yaml`` with ``strategy: ddp``.

``train.py`` runs as a subprocess, exactly as a user starts it; Lightning launches the second rank
itself. A probe callback (``tests/helpers/ddp_probe.py``) reports from inside every rank. The test shows that
1. the cache is built once: one process loads the language model, one fingerprint folder, every
   shard file written once (same inode and mtime as seen by both ranks, nothing rewritten later);
2. the ranks read disjoint rows, and together every training row exactly once per epoch;
3. the SAE parameters are identical on both ranks after training.

About 35 s on 2 CPU cores (two processes importing torch/transformers), so it is not marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.cache import ActivationCache
from tests.helpers.ddp_probe import row_hashes
from tests.helpers.lm import tiny_lm_args, tiny_lm_dir

REPO = Path(__file__).resolve().parents[2]
WORLD = 2


def test_ddp_on_cpu_builds_once_reads_disjoint_rows_and_syncs_params(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    lm = tiny_lm_dir(tmp_path_factory)
    probe_dir, cache_dir, runs = tmp_path / "probe", tmp_path / "cache", tmp_path / "runs"
    probe = json.dumps(
        {"class_path": "tests.helpers.ddp_probe.DDPProbe", "init_args": {"out_dir": str(probe_dir)}}
    )
    steps = 6  # tiny_lm.yaml: 384 rows / 2 ranks / 32 per batch = one epoch
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        *tiny_lm_args(lm, cache_dir, runs, steps),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        str(WORLD),
        "--trainer.accelerator",
        "cpu",
        f"--trainer.callbacks+={probe}",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # cwd = tmp_path: the config's relative paths (checkpoint dirpath) land there, not in the repo
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    reports = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, rep in enumerate(reports):
        assert rep["global_rank"] == r and rep["world_size"] == WORLD
        assert rep["strategy"] == "DDPStrategy" and rep["backend"] == "gloo"
        assert rep["global_step"] == steps

    # 1. built once: one LM load among all processes, one cache folder, files untouched after the build
    logs = {r: (probe_dir / f"log_rank{r}.txt").read_text() for r in range(WORLD)}
    loads = {r: sum("loading " in line for line in text.splitlines()) for r, text in logs.items()}
    assert loads == {0: 1, 1: 0}, logs
    (root,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    assert {rep["cache_root"] for rep in reports} == {str(root.resolve())}
    cache = ActivationCache(root)
    assert cache.manifest["complete"]
    shard_files = sorted(s["file"] for s in cache.manifest["shards"])
    assert sorted(p.name for p in root.glob("*.h5")) == shard_files and not list(root.glob("*.tmp"))
    seen = reports[0]["files_at_setup"]
    assert set(shard_files) <= set(seen)
    for rep in reports:  # every rank read the very same files, and nothing rewrote them during training
        assert rep["files_at_setup"] == seen and rep["files_at_end"] == seen

    # 2. disjoint rows: no sequence reaches both ranks, and one epoch covers every training row once
    train_rows = cache.read(cache.rows("train"))
    all_rows = row_hashes(train_rows)
    assert len(set(all_rows)) == len(all_rows)  # rows are distinguishable by content
    per_rank = [[h for b in rep["batches"] if b["epoch"] == 0 for h in b["hashes"]] for rep in reports]
    for hashes in per_rank:
        assert len(hashes) == len(set(hashes)) == steps * 32
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(all_rows)
    assert (
        train_rows["tokens"][:, 0] == train_rows["tokens"][0, 0]
    ).all()  # sanity: every row starts with BOS

    # 3. DDP kept the replicas in sync
    assert reports[0]["sae_hash"] == reports[1]["sae_hash"]
    assert reports[0]["act_scale"] == reports[1]["act_scale"]
