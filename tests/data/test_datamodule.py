"""ActivationDataModule: batches of whole sequences, shuffled across rows only, disjoint per rank."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data.datamodule import ActivationDataModule
from data.loading import BlockShuffleSampler, ShardedRowSampler
from tests.helpers.factories import tiny_source


def _dm(tmp_path: Path, **kw) -> ActivationDataModule:
    args = dict(
        cache_dir=str(tmp_path), n_sequences=24, val_sequences=6, shard_size=8, batch_size=4, progress=False
    )
    return ActivationDataModule(tiny_source(), **(args | kw))


def test_batches_are_whole_rows_shuffled_across_rows(tmp_path: Path) -> None:
    dm = _dm(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    src_rows = next(tiny_source().generate(0, 30, 30))
    seen = []
    for batch in dm.train_dataloader():
        assert batch["acts"].shape == (4, 16, 16) and batch["valid"].shape == (4, 16)
        for row in batch["acts"]:
            match = [i for i in range(24) if torch.equal(row, src_rows.acts[i])]
            assert len(match) == 1  # an intact training row (temporal order kept)
            seen.append(match[0])
    assert sorted(seen) == list(range(24))  # every training row exactly once per epoch
    assert seen != list(range(24))  # shuffled across rows
    val = torch.cat([b["acts"] for b in dm.val_dataloader()])
    assert torch.equal(val, src_rows.acts[24:30])  # validation rows are held out, in order
    assert dm.d_in == 16 and dm.stats["mean_sq_norm"] > 0


def test_sampler_ranks_are_disjoint_and_epochs_differ() -> None:
    a = ShardedRowSampler(103, shuffle=True, seed=1, rank=0, world_size=2, drop_last=True)
    b = ShardedRowSampler(103, shuffle=True, seed=1, rank=1, world_size=2, drop_last=True)
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == len(a) == 51
    assert not set(ia) & set(ib)
    a.set_epoch(1)
    assert list(a) != ia
    full = [ShardedRowSampler(103, False, 0, r, 3, drop_last=False) for r in range(3)]
    assert sorted(np.concatenate([list(s) for s in full]).tolist()) == list(range(103))
    with pytest.raises(ValueError, match="rank"):
        ShardedRowSampler(10, False, 0, rank=2, world_size=2)


def test_too_few_rows_for_a_batch_is_a_clear_error(tmp_path: Path) -> None:
    dm = _dm(tmp_path, batch_size=64)
    dm.prepare_data()
    with pytest.raises(ValueError, match="less than one batch"):
        dm.train_dataloader()


def test_workers_read_the_same_rows(tmp_path: Path) -> None:
    dm0 = _dm(tmp_path)
    dm0.prepare_data()
    dm2 = _dm(tmp_path, num_workers=2)
    a = torch.cat([b["acts"] for b in dm0.train_dataloader()])
    b = torch.cat([b["acts"] for b in dm2.train_dataloader()])
    assert torch.equal(a, b)


def test_every_device_needs_a_validation_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _dm(tmp_path)  # 6 validation rows
    dm.prepare_data()
    monkeypatch.setattr(dm, "_world", lambda: (0, 8))
    with pytest.raises(ValueError, match="6 sequences for 8 devices"):
        dm.val_dataloader()


def _rows_of(sampler: BlockShuffleSampler) -> list[list[int]]:
    """The rows of every window of the sampler's current epoch, in read order."""
    return [[r for a, b in w.ranges for r in range(a, b)] for w in sampler.windows()]


SHARDS = [(0, 40), (40, 80), (80, 103)]  # three shards, the last one short


def test_block_sampler_covers_every_row_once_with_contiguous_blocks() -> None:
    s = BlockShuffleSampler(SHARDS, batch_size=4, block_rows=5, shuffle_buffer_rows=18, drop_last=False)
    assert s.window_rows == 16  # rounded down to whole batches
    windows = s.windows()
    rows = [r for w in _rows_of(s) for r in w]
    assert sorted(rows) == list(range(103)) and rows != list(range(103))
    assert [len(w) for w in _rows_of(s)] == [16] * 6 + [7]
    assert len(s) == 7 and s.n_batches() == math.ceil(103 / 4)
    for w in windows:
        for a, b in w.ranges:  # each read is a slice of at most one block, inside one shard
            assert 0 < b - a <= 5 and any(lo <= a and b <= hi for lo, hi in SHARDS)
    s.set_epoch(1)
    assert _rows_of(s) != [[r for a, b in w.ranges for r in range(a, b)] for w in windows]
    ordered = BlockShuffleSampler(SHARDS, batch_size=4, shuffle=False, drop_last=False)
    assert _rows_of(ordered) == [list(range(103))] and ordered.windows()[0].seed is None


def test_block_sampler_ranks_are_disjoint_with_equal_batches() -> None:
    world = 3
    samplers = [
        BlockShuffleSampler(
            SHARDS, batch_size=4, block_rows=5, shuffle_buffer_rows=8, rank=r, world_size=world
        )
        for r in range(world)
    ]
    shares = [[r for w in _rows_of(s) for r in w] for s in samplers]
    assert [len(x) for x in shares] == [32, 32, 32]  # 103 // 3 = 34, trimmed to whole batches
    assert {s.n_batches() for s in samplers} == {8}
    assert len(set().union(*map(set, shares))) == 96  # disjoint
    with pytest.raises(ValueError, match="rank"):
        BlockShuffleSampler(SHARDS, batch_size=4, rank=3, world_size=3)
    with pytest.raises(ValueError, match="block_rows"):
        BlockShuffleSampler(SHARDS, batch_size=4, block_rows=0)


def _dm_blocks(tmp_path: Path, **kw) -> ActivationDataModule:
    # 48 rows in shards of 8, batches of 4, windows of 12 rows read as blocks of 3: four windows
    return _dm(tmp_path, n_sequences=48, block_rows=3, shuffle_buffer_rows=12, **kw)


def test_train_batches_come_from_shuffled_windows_and_cover_the_epoch(tmp_path: Path) -> None:
    dm = _dm_blocks(tmp_path)
    dm.prepare_data()
    src = next(tiny_source().generate(0, 48, 48)).acts
    loader = dm.train_dataloader()
    assert len(loader) == 12
    batches = [b["acts"] for b in loader]
    assert len(batches) == 12 and all(b.shape == (4, 16, 16) for b in batches)
    seen = [next(i for i in range(48) if torch.equal(row, src[i])) for b in batches for row in b]
    assert sorted(seen) == list(range(48))  # every training row exactly once per epoch
    windows = [w for w in dm.train_dataloader().sampler.windows()]
    for k, w in enumerate(windows):  # batches 3k..3k+2 hold exactly the rows of window k
        assert sorted(seen[12 * k : 12 * (k + 1)]) == sorted(r for a, b in w.ranges for r in range(a, b))
    assert seen != sorted(seen)
    workers = _dm_blocks(tmp_path, num_workers=2)
    assert torch.equal(torch.cat(batches), torch.cat([b["acts"] for b in workers.train_dataloader()]))


@pytest.mark.parametrize("done", [0, 2, 3, 7, 11, 12])
def test_train_loader_resumes_mid_epoch_across_windows(tmp_path: Path, done: int) -> None:
    """``done`` = 12: the state was saved after the epoch's last batch (a checkpoint at the end-of-epoch
    validation); the resumed loader serves the whole next epoch, not that epoch minus 12 batches."""
    dm = _dm_blocks(tmp_path)
    dm.prepare_data()
    loader = dm.train_dataloader()
    epochs = {}
    for epoch in (3, 4):
        loader.sampler.set_epoch(epoch)
        epochs[epoch] = [b["acts"] for b in loader]
    resumed = _dm_blocks(tmp_path).train_dataloader()
    resumed.load_state_dict({"epoch": 3, "batches_done": done})
    want = epochs[3][done:] if done < 12 else epochs[4]
    rest = [b["acts"] for b in resumed]
    assert len(rest) == len(want) and all(torch.equal(a, b) for a, b in zip(rest, want, strict=True))
    again = [b["acts"] for b in resumed]  # the skip applies once: the next pass is the whole epoch
    whole = epochs[3] if done < 12 else epochs[4]
    assert all(torch.equal(a, b) for a, b in zip(again, whole, strict=True))


def test_stats_without_sinks_count_only_the_positions_the_rule_keeps(tmp_path: Path) -> None:
    """The input scale comes from the tokens the SAE reads: with the activation-sink rule, positions above
    ``multiple`` x the batch's median norm (per training batch, as in training) leave the statistics."""
    dm = _dm(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    loose = dm.stats_without_sinks(1e9)  # drops nothing: the cache's own statistics
    assert math.isclose(loose["mean_sq_norm"], dm.stats["mean_sq_norm"], rel_tol=1e-6)
    np.testing.assert_allclose(loose["mean"], dm.stats["mean"], rtol=1e-5, atol=1e-6)
    strict = dm.stats_without_sinks(1.05)
    rows = dm.cache.rows("train")
    kept_sq, kept = [], 0
    for lo in range(0, len(rows), dm.batch_size):  # by hand, per batch of 4 rows
        b = dm.cache.read(rows[lo : lo + dm.batch_size])
        norms = b["acts"].double().norm(dim=-1).numpy()
        valid = b["valid"].numpy()
        v = np.sort(norms[valid])
        median = v[(len(v) - 1) // 2]  # torch.median: the lower middle value
        keep = valid & (norms <= 1.05 * median)
        kept_sq.append((norms[keep] ** 2).sum())
        kept += int(keep.sum())
    assert strict["n_valid_tokens"] == kept < loose["n_valid_tokens"]
    assert math.isclose(strict["mean_sq_norm"], sum(kept_sq) / kept, rel_tol=1e-9)
    assert strict["mean_sq_norm"] < loose["mean_sq_norm"]


@pytest.mark.parametrize("rule", [None, 1.05])
def test_fit_start_scales_inputs_from_the_positions_the_sae_reads(tmp_path: Path, rule: float | None) -> None:
    from types import SimpleNamespace

    from mtsae.sae.scale import input_scale
    from mtsae.training.module import SAEModule

    dm = _dm(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    module = SAEModule(d_in=16, d_sae=32, dilations=[1, 2], max_norm_multiple=rule)
    module.trainer = SimpleNamespace(datamodule=dm)  # what on_fit_start reads
    module.on_fit_start()
    stats = dm.stats if rule is None else dm.stats_without_sinks(rule)
    assert math.isclose(float(module.act_scale), input_scale(16, stats["mean_sq_norm"]), rel_tol=1e-6)
    if rule is not None:
        assert float(module.act_scale) > input_scale(16, dm.stats["mean_sq_norm"])
