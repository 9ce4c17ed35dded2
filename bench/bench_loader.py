"""The training loader against the disk's speed and against what the training step consumes.

A bf16 cache of random activations at Gemma-2-2B's width (d_in 2304, ctx 128: 590 KB per row) is
written with ``data.cache.build_cache`` (the real format: one-row chunks, fletcher32), then, with a
warm page cache, side by side (interleaved whole-epoch passes, medians):
- the training loader of ``ActivationDataModule`` (block shuffle) with ``num_workers`` 0, 2 and 4;
- contiguous HDF5 reads of the same shards (``acts``, ``tokens``, ``valid``: one slice per shard);
- ``numpy.memmap`` of the same ``acts`` bytes written flat to one file, read in the same slices.
The step's consumption is the rows per second of the MTSAE (concat) training step at 2304 x 16384 on
this machine (``bench/bench_step.py``'s step, timed here on one row).

    python bench/bench_loader.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import shutil  # noqa: E402
import time  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bench_step import _module, _step_fn  # noqa: E402
from bench.common import BenchConfig, Row, interleaved  # noqa: E402
from data.cache import ActivationCache  # noqa: E402
from data.datamodule import ActivationDataModule  # noqa: E402
from data.sources import ActivationSource, SourceChunk  # noqa: E402

D_IN, CTX = 2304, 128


class RandomSource(ActivationSource):
    """Gaussian activation rows (the loader does not care what the numbers are)."""

    kind = "random"

    def __init__(self, d_in: int = D_IN, ctx_len: int = CTX) -> None:
        self._d, self._t = d_in, ctx_len

    d_in = property(lambda self: self._d)
    ctx_len = property(lambda self: self._t)

    def fingerprint(self) -> dict:
        return {"source": "bench-random", "d_in": self._d, "ctx_len": self._t}

    def generate(self, start: int, stop: int, batch_size: int):
        for a in range(start, stop, batch_size):
            b = min(stop, a + batch_size)
            g = torch.Generator().manual_seed(a)
            valid = torch.ones(b - a, self._t, dtype=torch.bool)
            valid[:, 0] = False
            yield SourceChunk(
                acts=torch.randn(b - a, self._t, self._d, generator=g),
                tokens=torch.zeros(b - a, self._t, dtype=torch.int32),
                valid=valid,
            )


def _datamodule(root: str, n: int, shard: int, workers: int) -> ActivationDataModule:
    return ActivationDataModule(
        RandomSource(),
        cache_dir=root,
        n_sequences=n,
        val_sequences=1,
        shard_size=shard,
        dtype="bfloat16",
        batch_size=32,
        num_workers=workers,
        progress=False,
    )


def run(cfg: BenchConfig) -> list[Row]:
    n, shard = (256, 128) if cfg.quick else (1024, 256)
    root = cfg.workdir / "loader_cache"
    t0 = time.perf_counter()
    dms = {w: _datamodule(str(root), n, shard, w) for w in (0, 2, 4)}
    dms[0].prepare_data()
    for dm in dms.values():
        dm.setup("fit")
    cache: ActivationCache = dms[0].cache
    gb = n * CTX * D_IN * 2 / 1e9
    print(f"  cache: {n} rows, {gb:.2f} GB of bf16 acts, built in {time.perf_counter() - t0:.0f} s")
    flat = cfg.workdir / "acts_flat.u16"
    mm = np.lib.format.open_memmap(flat, mode="w+", dtype=np.uint16, shape=(n, CTX, D_IN))
    for a, b in cache.shard_ranges("train"):
        mm[a:b] = cache.read_ranges([(a, b)])["acts"].view(torch.int16).numpy().view(np.uint16)
    mm.flush()
    del mm
    loaders = {w: dm.train_dataloader() for w, dm in dms.items()}
    epoch = [0]

    def loader_epoch(w: int) -> None:
        loader = loaders[w]
        loader.sampler.set_epoch(epoch[0])
        rows = sum(b["acts"].shape[0] for b in loader)
        assert rows == n, rows

    shards = [cache.root / s["file"] for s in cache.manifest["shards"] if s["split"] == "train"]

    def h5_contiguous() -> None:
        for path in shards:
            with h5py.File(path, "r") as h5:
                for k in ("acts", "tokens", "valid"):
                    ds = h5[k]
                    out = np.empty(ds.shape, ds.dtype)
                    ds.read_direct(out)

    def memmap_contiguous() -> None:
        mm = np.load(flat, mmap_mode="r")
        for a, b in cache.shard_ranges("train"):
            np.array(mm[a:b])

    fns = {f"loader nw{w}": (lambda w=w: loader_epoch(w)) for w in loaders}
    fns |= {"hdf5 contiguous": h5_contiguous, "memmap contiguous": memmap_contiguous}
    for w in loaders:  # start the persistent workers outside the timing
        loader_epoch(w)
    t = interleaved(fns, max(3, cfg.repeats // 2), cfg.device, warmup=0)
    rate = {k: n / v for k, v in t.items()}
    print("  rows/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rate.items()))

    # what the step consumes: the MTSAE (concat) step at 2304 x 16384 on one row of 128 tokens
    dev = cfg.device
    rows_per_step = 32 if dev.type == "cuda" else 1
    m = _module(D_IN, 16384, "MTSAE concat", dev)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)
    x = torch.randn(rows_per_step, CTX, D_IN, device=dev)
    valid = torch.ones(rows_per_step, CTX, dtype=torch.bool, device=dev)
    t_step = interleaved({"step": _step_fn(m, opt, x, valid, cfg)}, 3, dev)["step"]
    consume = rows_per_step / t_step
    mb = CTX * D_IN * 2 / 1e6
    rows = [
        Row(
            "loader nw0 / contiguous HDF5 reads",
            rate["loader nw0"] / rate["hdf5 contiguous"],
            ">= 0.5",
            f"{rate['loader nw0']:.0f} vs {rate['hdf5 contiguous']:.0f} rows/s ({rate['hdf5 contiguous'] * mb:.0f} MB/s)",
        ),
        Row(
            "contiguous HDF5 / numpy.memmap (same bytes)",
            rate["hdf5 contiguous"] / rate["memmap contiguous"],
            ">= 0.7",
            f"memmap {rate['memmap contiguous']:.0f} rows/s ({rate['memmap contiguous'] * mb:.0f} MB/s), warm page cache",
        ),
    ]
    for w in loaders:
        rows.append(
            Row(
                f"loader nw{w} rows/s / step consumption (2304, bf16)",
                rate[f"loader nw{w}"] / consume,
                ">= 5",
                f"{rate[f'loader nw{w}']:.0f} rows/s vs step {consume:.2f} rows/s (MTSAE concat 2304x16384)",
            )
        )
    for dm in dms.values():
        dm.teardown()
    shutil.rmtree(root, ignore_errors=True)
    flat.unlink()
    return rows


if __name__ == "__main__":
    from bench.run_all import main

    raise SystemExit(main(["--only", "loader"]))
