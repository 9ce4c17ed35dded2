"""Nothing non-finite trains silently: NaN settings are refused up front, non-finite activations at valid
positions are refused when the cache is built, non-finite values at invalid positions never reach the SAE,
and a non-finite training loss stops the run with its step and cause, keeping the earlier checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import train
from data import SyntheticSource
from data.cache_format import CacheSpec, NonFiniteActivationsError
from data.cache_writer import build_cache
from tests.helpers.train import tiny_args
from train import cli_main


@pytest.mark.parametrize(
    "option", ["--model.sparsity_coeff", "--data.source.init_args.noise_std", "--model.separation_coeff"]
)
def test_nan_settings_are_refused_before_work(tmp_path: Path, option: str, capsys) -> None:
    assert train.main(["fit", *tiny_args(tmp_path, option, ".nan")]) == 2
    err = capsys.readouterr().err
    name = option.rsplit(".", 1)[1]
    assert f"configuration error: {name} must be a finite number >= 0, got nan" in err, err
    assert "Traceback" not in err and not (tmp_path / "cache").exists()


def test_float16_overflow_at_a_valid_position_is_refused_when_caching(tmp_path: Path) -> None:
    source = SyntheticSource(d_in=16, ctx_len=16, noise_std=3e4, seed=0)  # float16 ends at 65504
    spec = CacheSpec(n_sequences=8, val_sequences=4, shard_size=4, dtype="float16")
    with pytest.raises(NonFiniteActivationsError) as err:
        build_cache(source, tmp_path, spec, source_batch_size=4, progress=False)
    msg = str(err.value)
    assert re.search(
        r"shard_00000\.h5: activation -?inf at shard row \d+ \(global row \d+\), position \d+", msg
    )
    assert "set data.dtype to bfloat16 or float32" in msg
    (root,) = tmp_path.iterdir()
    assert not list(root.glob("shard_*"))  # nothing non-finite is cached
    build_cache(source, tmp_path, CacheSpec(8, 4, 4, "float32"), source_batch_size=4, progress=False)


def test_overflowed_bos_at_the_invalid_position_never_reaches_the_sae(tmp_path: Path) -> None:
    """float16 stores a BOS of norm 1e6 as inf at position 0 (invalid): the cache takes it, training
    ignores it (before: 0 * inf = NaN in the encoder and in the decoder's gradient, a NaN SAE)."""
    args = ["--data.dtype", "float16", "--data.source.init_args.bos_norm", "1e6", "--trainer.max_steps", "16"]
    cli = cli_main(["fit", *tiny_args(tmp_path, *args)])
    acts = cli.datamodule.cache.read([0])["acts"]
    assert torch.isinf(acts[0, 0]).any() and torch.isfinite(acts[0, 1:]).all()
    assert all(torch.isfinite(v).all() for v in cli.model.state_dict().values() if v.is_floating_point())
    assert np.isfinite(float(cli.trainer.callback_metrics["val/fvu"]))


def test_a_nan_in_a_training_row_stops_the_run_naming_the_step(tmp_path: Path, capsys) -> None:
    cli = cli_main(["fit", *tiny_args(tmp_path, "--trainer.max_steps", "1")])
    shard = Path(cli.datamodule.cache.root) / "shard_00000.h5"
    cli.datamodule.cache.close()
    with h5py.File(shard, "r+") as h5:  # rewritten through HDF5: its checksums stay valid
        acts = h5["acts"][100]
        acts[5, 3] = np.nan
        h5["acts"][100] = acts
    runs = tmp_path / "again"
    args = tiny_args(tmp_path, "--trainer.max_steps", "32", "--trainer.default_root_dir", str(runs))
    args += ["--trainer.logger.init_args.save_dir", str(runs)]  # one epoch: row 100 is trained on
    assert train.main(["fit", *args]) == 1
    err = capsys.readouterr().err
    found = re.search(
        r"NonFiniteLossError: the training loss was not finite at step (\d+): the batch held", err
    )
    assert found and "Traceback" not in err, err
    step = int(found.group(1))
    assert 0 <= step < 32
    ckpts = list(runs.rglob("*.ckpt"))
    for ckpt in ckpts:  # every checkpoint on disk predates the NaN
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["global_step"] <= step
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not list(runs.rglob("sae.safetensors"))  # nothing exported
