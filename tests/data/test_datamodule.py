"""ActivationDataModule: batches of whole sequences, shuffled across rows only, disjoint per rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.datamodule import ActivationDataModule, ShardedRowSampler
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
