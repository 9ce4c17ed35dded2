"""The activation-sink rule ``max_norm_multiple`` (``mtsae/sae/positions.py``, docs/design.md §3): the mask,
its validation, the training step, the clamp, and the setting carried by checkpoints and exported folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from mtsae.evals.unlearning.intervention import clamp_intervention
from mtsae.sae.export import load_sae, save_sae
from mtsae.sae.model import MTSAE
from mtsae.sae.positions import check_max_norm_multiple, norm_median, ordinary_positions, valid_norms
from mtsae.sae.saelens import load_saelens, save_saelens
from mtsae.sae.scale import ScaledSAE
from mtsae.training.checkpoint import load_sae_from_checkpoint
from mtsae.training.module import ResumeSettingsError, SAEModule


def _norms_batch(norms: list[list[float]], d: int = 4) -> torch.Tensor:
    """``[B, T, d]`` activations whose L2 norms are ``norms`` (each along a fixed random direction)."""
    direction = torch.nn.functional.normalize(torch.randn(d), dim=0)
    return torch.tensor(norms)[..., None] * direction


# ---------------------------------------------------------------------------------------------- the mask
def test_mask_uses_the_median_of_the_valid_positions_of_the_batch() -> None:
    x = _norms_batch([[1000.0, 1.0, 2.0, 25.0], [3.0, 29.0, 31.0, 1e6]])
    valid = torch.tensor([[False, True, True, True], [True, True, True, False]])
    # valid norms 1, 2, 25, 3, 29, 31: median (lower middle) 3; the invalid 1000 and 1e6 do not enter it
    got = ordinary_positions(x, valid, 9.0)  # threshold 27: 29 and 31 go, 25 stays
    assert got.tolist() == [[False, True, True, True], [True, False, False, False]]
    # the median is over the whole batch, not per row: row 1 alone has median 29 and would keep everything
    assert ordinary_positions(x[1:], valid[1:], 9.0).tolist() == [[True, True, True, False]]


def test_specials_are_left_out_of_the_median() -> None:
    """A batch of many huge special positions: with them in the median every ordinary token would pass."""
    x = _norms_batch([[500.0, 500.0, 500.0, 1.0, 1.0, 50.0]])
    valid = torch.tensor([[False, False, False, True, True, True]])
    assert ordinary_positions(x, valid, 10.0).tolist() == [[False, False, False, True, True, False]]


def test_none_is_off_and_scale_does_not_matter() -> None:
    x = _norms_batch([[1.0, 1.0, 1e5]])
    valid = torch.tensor([[True, True, True]])
    assert ordinary_positions(x, valid, None).tolist() == [[True, True, True]]
    assert ordinary_positions(x, None, None).tolist() == [[True, True, True]]
    assert ordinary_positions(x, None, 10.0).tolist() == [[True, True, False]]
    assert torch.equal(ordinary_positions(3.7 * x, valid, 10.0), ordinary_positions(x, valid, 10.0))
    # non-finite values at valid positions stay valid (the training's non-finite check must see them)
    x[0, 2] = math.inf
    assert ordinary_positions(x, valid, 10.0).tolist() == [[True, True, True]]


def test_a_zero_median_drops_nothing() -> None:
    """More than half the valid positions zero vectors: against a median of 0 every other token would go."""
    x = _norms_batch([[0.0, 0.0, 0.0, 1.0, 5.0]])
    assert ordinary_positions(x, None, 10.0).tolist() == [[True] * 5]
    # no finite valid norm: nothing to measure against, nothing dropped
    valid = torch.tensor([[False, False, False, True, False]])
    x[0, 3] = math.nan
    assert ordinary_positions(x, valid, 10.0).tolist() == valid.tolist()


def test_a_given_median_and_no_host_sync() -> None:
    """A decode step (one new token per row) is measured against the median of the sequences so far; the
    mask is computed without reading a value back to the host (it runs on the meta device)."""
    x = _norms_batch([[1.0, 2.0, 3.0, 500.0]])
    new = x[:, -1:]  # [1, 1, d]: its own median would keep it
    assert ordinary_positions(new, None, 10.0).tolist() == [[True]]
    assert ordinary_positions(
        new, None, 10.0, median=norm_median(valid_norms(x[:, :-1], torch.ones(1, 3, dtype=torch.bool)))
    ).tolist() == [[False]]
    meta = torch.empty(2, 5, 4, device="meta")
    assert ordinary_positions(meta, torch.ones(2, 5, dtype=torch.bool, device="meta"), 10.0).shape == (2, 5)


@pytest.mark.parametrize("bad", [1, 1.0, 0.5, -3, math.nan, math.inf, "10", True])
def test_bad_values_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="max_norm_multiple"):
        check_max_norm_multiple(bad)
    with pytest.raises(ValueError, match="max_norm_multiple"):
        MTSAE(4, 8, dilations=[], max_norm_multiple=bad)
    with pytest.raises(ValueError, match="max_norm_multiple"):
        SAEModule(d_in=4, d_sae=8, dilations=[], separation="none", max_norm_multiple=bad)
    assert check_max_norm_multiple(10) == 10.0 and check_max_norm_multiple(None) is None


# ---------------------------------------------------------------------------------------------- training
def _loss_and_grads(module: SAEModule, acts: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, list]:
    """What ``training_step`` computes on a batch: the total loss and every parameter's gradient."""
    module.zero_grad()
    x, v = module._inputs({"acts": acts, "valid": valid})
    terms = module._losses(x, v, module.sae(x, v))
    terms["loss"].backward()
    return terms["loss"].detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize("rule", [None, 10.0])
def test_a_sink_token_does_not_reach_the_loss_or_the_gradients(rule: float | None) -> None:
    torch.manual_seed(0)
    module = SAEModule(d_in=8, d_sae=16, dilations=[1, 2], sparsity_coeff=1.0, max_norm_multiple=rule)
    acts = torch.randn(2, 12, 8)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[:, 0] = False  # BOS
    sink, other = acts.clone(), acts.clone()
    sink[0, 1] = 100 * acts[0, 1]  # a 100x token, like the first token after BOS in SmolLM2's cache
    other[0, 1] = -120 * acts[0, 2]  # another huge value at the same position
    loss_a, grads_a = _loss_and_grads(module, sink, valid)
    loss_b, grads_b = _loss_and_grads(module, other, valid)
    same = torch.equal(loss_a, loss_b) and all(
        torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True)
    )
    assert same == (rule is not None)
    if rule is not None:  # ... and the rule acts as a special token there: the same as marking it invalid
        marked = valid.clone()
        marked[0, 1] = False
        loss_c, grads_c = _loss_and_grads(module, sink, marked)
        torch.testing.assert_close(loss_a, loss_c)
        for a, c in zip(grads_a, grads_c, strict=True):
            torch.testing.assert_close(a, c)


# ---------------------------------------------------------------------------------------------- the clamp
def test_the_clamp_leaves_a_sink_position_unchanged() -> None:
    torch.manual_seed(0)
    sae = MTSAE(6, 8, dilations=[1, 2], max_norm_multiple=10.0).eval()
    with torch.no_grad():
        sae.W_enc[:, :2] = 0.0
        sae.b_enc.fill_(1.0)  # features 0 and 1 fire everywhere: the clamp changes every valid position
    x = torch.randn(2, 10, 6)
    x[1, 3] *= 100
    valid = torch.ones(2, 10, dtype=torch.bool)
    out = clamp_intervention(x, sae, [0, 1], 5.0, valid)
    assert torch.equal(out[1, 3], x[1, 3])
    changed = (out != x).any(-1)
    assert int(changed.sum()) == 19
    sae.max_norm_multiple = None
    assert (clamp_intervention(x, sae, [0, 1], 5.0, valid) != x).any(-1).all()


# ---------------------------------------------------------------------------------------------- files
def _module(rule: float | None) -> SAEModule:
    torch.manual_seed(0)
    module = SAEModule(d_in=8, d_sae=16, dilations=[1, 2], max_norm_multiple=rule)
    module.act_scale.fill_(2.0)
    return module


def _checkpoint(module: SAEModule, path: Path, drop: str | None = None) -> Path:
    """A checkpoint file as Lightning writes it (weights and ``hyper_parameters``), optionally without a
    setting, as written before the setting existed."""
    hp = dict(module.hparams)
    if drop:
        hp.pop(drop)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": hp,
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return path


def test_the_setting_travels_with_checkpoints_and_exported_folders(tmp_path: Path) -> None:
    module = _module(10.0)
    assert module.raw_sae.max_norm_multiple == 10.0 and module.export_sae().max_norm_multiple == 10.0
    sae = load_sae_from_checkpoint(_checkpoint(module, tmp_path / "a.ckpt"))
    assert sae.max_norm_multiple == 10.0
    assert (
        SAEModule.load_from_checkpoint(tmp_path / "a.ckpt", weights_only=True).hparams.max_norm_multiple == 10
    )
    assert load_sae(save_sae(sae, tmp_path / "sae")).max_norm_multiple == 10.0
    per_token = MTSAE(8, 16, dilations=[], max_norm_multiple=10.0)
    assert load_saelens(save_saelens(per_token, tmp_path / "saelens")).sae.max_norm_multiple == 10.0


def test_old_files_load_with_the_rule_off(tmp_path: Path) -> None:
    module = _module(10.0)
    old = _checkpoint(module, tmp_path / "old.ckpt", drop="max_norm_multiple")
    assert load_sae_from_checkpoint(old).max_norm_multiple is None
    folder = save_sae(module.export_sae(), tmp_path / "sae")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["sae"]["max_norm_multiple"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_sae(folder).max_norm_multiple is None
    saelens = save_saelens(MTSAE(8, 16, dilations=[]), tmp_path / "saelens")
    cfg = json.loads((saelens / "cfg.json").read_text())
    assert cfg["metadata"].pop("max_norm_multiple") is None
    (saelens / "cfg.json").write_text(json.dumps(cfg))
    assert load_saelens(saelens).sae.max_norm_multiple is None


@pytest.mark.parametrize(("rule", "refused"), [(10.0, True), (None, False)])
def test_resuming_an_old_checkpoint_keeps_the_rule_off(rule: float | None, refused: bool) -> None:
    """A checkpoint written before the setting existed ran with the rule off (the default): resuming it
    with the rule on would switch it on mid-run, and is refused like any other changed model setting."""
    hp = dict(_module(None).hparams)
    del hp["max_norm_multiple"]
    checkpoint = {"state_dict": {}, "hyper_parameters": hp}
    if refused:
        with pytest.raises(ResumeSettingsError, match="max_norm_multiple: checkpoint None, config 10.0"):
            _module(rule).on_load_checkpoint(checkpoint)
    else:
        _module(rule).on_load_checkpoint(checkpoint)


def test_scaled_view_applies_the_same_rule() -> None:
    sae = MTSAE(4, 8, dilations=[], max_norm_multiple=10.0)
    x = _norms_batch([[1.0, 1.0, 1.0, 50.0]])
    assert torch.equal(ScaledSAE(sae, 3.0).valid_positions(x), sae.valid_positions(x))
    assert sae.valid_positions(x).tolist() == [[True, True, True, False]]
