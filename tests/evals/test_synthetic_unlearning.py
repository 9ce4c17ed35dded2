"""Synthetic unlearning: hand-worked scores, the planted-SAE case, and trained vs untrained MTSAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.synthetic import SyntheticSource
from mtsae import SAEModule
from mtsae.evals.ground_truth import GroundTruth
from mtsae.evals.synthetic_unlearning import (
    SyntheticGrid,
    forget_feature_indices,
    forget_projector,
    intervention_scores,
    split_forget_retain,
    synthetic_unlearning,
)
from mtsae.sae.model import MTSAE
from mtsae.sae.scale import ScaledSAE
from tests.helpers.train import tiny_args
from train import cli_main

# two small groups so that a few seconds of training recover the slow features
GROUPS = [
    {"name": "local", "n_features": 8, "mean_span": 1, "density": 0.05, "amplitude": 1.0},
    {"name": "slow", "n_features": 8, "mean_span": 8, "density": 0.1, "amplitude": 1.0},
]


def test_forget_indices_and_split() -> None:
    truth = GroundTruth.from_arrays(  # as stored in a shard: names as HDF5 bytes
        {"features": np.eye(5), "group_index": np.array([0, 0, 1, 1, 1]), "group_names": [b"local", b"slow"]}
    )
    assert truth.group_names == ("local", "slow")
    assert forget_feature_indices(truth, "slow", 2).tolist() == [2, 3]
    assert forget_feature_indices(truth, "slow", None).tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="medium"):
        forget_feature_indices(truth, "medium")
    coef = torch.zeros(3, 4, 5)
    coef[0, 2, 2] = 1.0  # forget feature on at a valid token
    coef[1, 0, 3] = 1.0  # ... only at an invalid one
    coef[2, 1, 0] = 1.0  # another feature
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[:, 0] = False
    assert split_forget_retain(coef, valid, torch.tensor([2, 3])).tolist() == [True, False, False]


def test_scores_by_hand() -> None:
    feats = torch.eye(4)  # forget = feature 0 (axis 0)
    forget = torch.tensor([0])
    torch.testing.assert_close(forget_projector(feats, forget), torch.diag(torch.tensor([1.0, 0, 0, 0])))
    coef = torch.zeros(2, 1, 4)
    coef[0, 0] = torch.tensor([2.0, 1.0, 0, 0])  # forget sequence: s = 2 e0, o = e1
    coef[1, 0] = torch.tensor([0, 0, 3.0, 0])  # retain sequence: o = 3 e2
    valid = torch.ones(2, 1, dtype=torch.bool)
    is_forget = torch.tensor([True, False])
    delta = torch.zeros(2, 1, 4)
    assert intervention_scores(delta, coef, feats, forget, valid, is_forget) == (0.0, 0.0)
    delta[0, 0, 0] = -2.0  # exact removal
    assert intervention_scores(delta, coef, feats, forget, valid, is_forget) == pytest.approx((1.0, 0.0))
    delta[0, 0, 0] = -1.0  # half removed ...
    delta[0, 0, 3] = 1.0  # ... and damage: off-subspace on the forget sequence (1) and on retain (1)
    delta[1, 0, 1] = 1.0
    removed, damage = intervention_scores(delta, coef, feats, forget, valid, is_forget)
    assert removed == pytest.approx(0.5)
    assert damage == pytest.approx((2 / (1 + 9)) ** 0.5)
    delta[0, 0, 0] = -6.0  # overshoot: -4 left along e0 is worse than nothing
    assert intervention_scores(delta, coef, feats, forget, valid, is_forget)[0] == pytest.approx(-1.0)


def _planted_sae(features: torch.Tensor, forget: torch.Tensor) -> MTSAE:
    """A per-token SAE whose features are exactly the true directions (ReLU, threshold 0.3)."""
    n, d = features.shape
    sae = MTSAE(d, n, dilations=[])
    with torch.no_grad():
        sae.W_dec.copy_(features)
        sae.W_enc.copy_(torch.linalg.pinv(features))  # codes = least-squares coefficients
        sae.b_enc.fill_(-0.3)
        sae.b_dec.zero_()
    return sae


def test_planted_sae_removes_the_forget_group_and_scales_do_not_matter() -> None:
    # fewer features (16) than dimensions (32): no superposition; strong slow features
    src = SyntheticSource(d_in=32, ctx_len=16, groups=[*GROUPS[:1], {**GROUPS[1], "amplitude": 3.0}])
    chunk = src._rows(0, 96)
    coef = torch.as_tensor(chunk.ground_truth["coefficients"]).float()
    gt = GroundTruth.from_arrays(src.static_ground_truth())
    feats = gt.features
    forget = forget_feature_indices(gt, "slow", 2)
    sae = _planted_sae(feats, forget)
    grid = SyntheticGrid(retain_thresholds=[0.01], n_features=[2], multipliers=[0.0])
    res = synthetic_unlearning(sae, chunk.acts, chunk.valid, coef, feats, forget, grid)
    assert res["n_forget_sequences"] > 0 and res["n_retain_sequences"] > 0
    assert sorted(res["best"]["features"]) == forget.tolist()  # selection finds the planted features
    # zero-ablation leaves the 0.3 threshold of each code: removed ~ 1 - 0.3 / 3
    assert res["forget_removed"] > 0.85 and res["retain_damage"] < 0.05
    assert res["score"] == pytest.approx(res["forget_removed"] - res["retain_damage"])
    json.dumps(res)

    # the same SAE trained on 2x the activations (act_scale = 2) gives the same results
    scaled = _planted_sae(feats, forget)
    with torch.no_grad():
        scaled.b_enc.mul_(2.0)
    res2 = synthetic_unlearning(ScaledSAE(scaled, 2.0), chunk.acts, chunk.valid, coef, feats, forget, grid)
    assert res2["score"] == pytest.approx(res["score"], abs=1e-5)

    with pytest.raises(ValueError, match="retain"):  # every sequence carries the forget group
        synthetic_unlearning(sae, chunk.acts, chunk.valid, coef + 1, feats, forget, grid)


def test_trained_mtsae_unlearns_better_than_untrained(tmp_path: Path) -> None:
    """The demo MTSAE (ReLU, L1) with a short schedule; over seeds 0-7 trained scores were 0.19-0.61."""
    cli = cli_main(
        tiny_args(
            tmp_path,
            "--data.source.init_args.groups",
            json.dumps(GROUPS),
            "--trainer.max_epochs",
            "6",
            "--trainer.val_check_interval",
            "1.0",
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.callbacks",
            "[]",
            "--trainer.callbacks+=callbacks.synthetic_unlearning.SyntheticUnlearning",
            "--model.sparsity_warmup_steps",
            "0",
            "--model.lr_scheduler.init_args.warmup_steps",
            "10",
            "--model.optimizer.init_args.lr",
            "0.01",
        ),
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (cb,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "SyntheticUnlearning"]
    m = cli.trainer.callback_metrics
    for key in ("score", "forget_removed", "retain_damage"):
        assert f"val/synthetic_unlearning/{key}" in m
    trained = cb.last_results
    assert trained["score"] == pytest.approx(float(m["val/synthetic_unlearning/score"]))

    hp = {k: v for k, v in cli.model.hparams.items() if not k.startswith("_")}
    fresh = SAEModule(**hp)
    fresh.initialise_from_stats(cli.datamodule.stats)
    data = cb._data
    with torch.no_grad():
        untrained = synthetic_unlearning(
            fresh.raw_sae,
            data["acts"],
            data["valid"],
            data["coefficients"],
            data["features"],
            data["forget"],
            cb.grid,
        )
    assert trained["score"] > untrained["score"] + 0.1, (trained["best"], untrained["best"])
    assert trained["forget_removed"] > 0.2
