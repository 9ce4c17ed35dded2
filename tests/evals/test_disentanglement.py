"""Disentanglement diagnostics: hand-worked cases for each metric, and the callback in a tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtsae.evals.disentanglement import (
    DisentanglementAccumulator,
    DisentanglementConfig,
    PersistenceAccumulator,
    decoder_coherence,
    density_summary,
    disentanglement_results,
    evaluate_disentanglement,
    log10_density_histogram,
    results_to_json,
    scale_attribution,
    scale_attribution_summary,
    scale_entropy,
)
from mtsae.evals.disentanglement_figures import figures
from mtsae.evals.ground_truth import GroundTruth
from mtsae.evals.sparsity import SparsityAccumulator
from tests.helpers.factories import tiny_sae, tiny_source
from tests.helpers.train import tiny_args
from train import cli_main


# ---------------------------------------------------------------------------------------------- coherence
def test_coherence_of_orthonormal_rows_is_zero() -> None:
    c = decoder_coherence(torch.eye(8) * 3.0)  # row norms do not matter
    assert c.max == 0 and c.mean == 0 and c.frac_above == 0
    assert torch.equal(c.per_feature_max, torch.zeros(8))


def test_coherence_of_a_duplicated_row() -> None:
    W = torch.cat([torch.eye(8)[:6], -torch.eye(8)[:1]])  # row 6 = -row 0: |cos| = 1
    c = decoder_coherence(W, block_size=3)
    n_pairs = 7 * 6 // 2
    assert c.max == pytest.approx(1.0)
    assert c.mean == pytest.approx(1 / n_pairs)
    assert c.frac_above == pytest.approx(1 / n_pairs)
    assert c.per_feature_max.tolist() == pytest.approx([1, 0, 0, 0, 0, 0, 1])


@pytest.mark.parametrize("block_size", [1, 7, 50, 4096])
def test_blocked_coherence_equals_dense(block_size: int) -> None:
    W = torch.randn(50, 8)
    w = F.normalize(W, dim=1)
    cos = (w @ w.t()).abs()
    iu = torch.triu_indices(50, 50, offset=1)
    pairs = cos[iu[0], iu[1]]
    c = decoder_coherence(W, threshold=0.5, block_size=block_size)
    assert c.max == pytest.approx(pairs.max().item(), abs=1e-6)
    assert c.mean == pytest.approx(pairs.mean().item(), abs=1e-6)
    assert c.frac_above == pytest.approx((pairs > 0.5).float().mean().item())
    torch.testing.assert_close(c.per_feature_max, (cos - 2 * torch.eye(50)).max(1).values)


# ---------------------------------------------------------------------------------------------- density
def test_density_dead_and_dense_fractions_by_hand() -> None:
    # 4 valid tokens (the 5th is masked out and fires everywhere)
    f = torch.tensor(
        [[1, 0, 0, 2], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 3, 0], [9, 9, 9, 9]], dtype=torch.float
    )
    valid = torch.tensor([True, True, True, True, False])
    acc = SparsityAccumulator(4)
    acc.update(f[None], valid[None])
    rho = acc.compute()
    assert rho.tolist() == [1.0, 0.0, 0.25, 0.25]
    s = density_summary(rho, dense_threshold=0.3)
    assert s["dead_fraction"] == 0.25 and s["dense_fraction"] == 0.25
    assert s["median_log10"] == pytest.approx(math.log10(0.25))
    counts, edges = log10_density_histogram(rho, bins=4, lo=-2.0)
    assert counts.sum() == 3 and edges[0] == -2 and edges[-1] == 0  # the dead feature is left out
    assert counts[-1] == 1  # log10 1 = 0 falls in the last bin


# ---------------------------------------------------------------------------------------------- scales
def test_scale_attribution_one_block_and_uniform() -> None:
    d_in, d_sae, S = 4, 6, 4
    W = torch.zeros(S * d_in, d_sae)
    W[2 * d_in : 3 * d_in] = torch.randn(d_in, d_sae)  # weight only in block 2
    share = scale_attribution(W, S)
    assert share.shape == (S, d_sae)
    torch.testing.assert_close(share[2], torch.ones(d_sae))
    torch.testing.assert_close(scale_entropy(share), torch.zeros(d_sae))
    s = scale_attribution_summary(share, [1, 2, 4, 8])
    assert s["share/dilation_4"] == pytest.approx(1) and s["majority/dilation_4"] == 1
    assert s["entropy"] == pytest.approx(0)

    uniform = scale_attribution(torch.ones(S * d_in, d_sae), S)
    torch.testing.assert_close(uniform, torch.full((S, d_sae), 0.25))
    torch.testing.assert_close(scale_entropy(uniform), torch.ones(d_sae))
    assert scale_attribution(torch.ones(d_in, d_sae), 0) is None  # per-token SAE


def test_untrained_mtsae_reads_all_scales_equally() -> None:
    sae = tiny_sae()  # every W_enc block starts as W_dec^T / n_scales
    share = scale_attribution(sae.W_enc, sae.n_scales)
    torch.testing.assert_close(scale_entropy(share), torch.ones(sae.d_sae))


# ---------------------------------------------------------------------------------------------- persistence
def _persistence(f: torch.Tensor, valid: torch.Tensor | None = None, lags=(1, 4, 16)) -> torch.Tensor:
    acc = PersistenceAccumulator(f.shape[-1], lags)
    acc.update(f, valid)
    return acc.compute()


def test_persistence_constant_noise_alternating_and_silent() -> None:
    B, T = 64, 40
    const = torch.rand(B, 1, 1).expand(B, T, 1)  # constant within each sequence, varies across them
    noise = torch.randn(B, T, 1)
    alt = (torch.arange(T) % 2).float().view(1, T, 1).expand(B, T, 1)  # on/off/on/off
    silent = torch.zeros(B, T, 1)
    r = _persistence(torch.cat([const, noise, alt, silent], -1))  # [3 lags, 4 features]
    torch.testing.assert_close(r[:, 0], torch.ones(3))
    assert r[:, 1].abs().max() < 0.1
    torch.testing.assert_close(r[:, 2], torch.tensor([-1.0, 1.0, 1.0]))
    assert r[:, 3].isnan().all()


def test_persistence_ignores_invalid_positions_and_streams() -> None:
    B, T = 8, 20
    f = torch.rand(B, 1, 2).expand(B, T, 2).clone()
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[:, 0] = False
    f[:, 0] = 100.0  # a huge value at the (invalid) BOS must not count
    r = _persistence(f, valid, lags=(1, 4))
    torch.testing.assert_close(r, torch.ones(2, 2))
    g = torch.randn(B, T, 3)
    one = _persistence(g, valid, lags=(1, 4))
    acc = PersistenceAccumulator(3, (1, 4))
    acc.update(g[:3], valid[:3])
    acc.update(g[3:], valid[3:])
    torch.testing.assert_close(acc.compute(), one)
    assert _persistence(g, valid, lags=(T,)).isnan().all()  # no pairs at a lag >= T


# ---------------------------------------------------------------------------------------------- end to end
def _batches(src, n: int = 4, bs: int = 8) -> list[dict[str, torch.Tensor]]:
    out = []
    for chunk in src.generate(0, n * bs, bs):
        out.append({"acts": chunk.acts, "valid": chunk.valid})
    return out


def test_evaluate_disentanglement_with_ground_truth_and_figures() -> None:
    src = tiny_source()
    sae = tiny_sae(d_in=src.d_in)
    gt = GroundTruth.from_arrays(src.static_ground_truth())
    res = evaluate_disentanglement(sae, _batches(src), gt, DisentanglementConfig(lags=[1, 4]))
    sc = res["scalars"]
    for key in (
        "coherence/max",
        "density/dead_fraction",
        "scale/share/dilation_8",
        "scale/entropy",
        "persistence/lag_4",
        "recovery/mmcs/slow",
    ):
        assert key in sc and not math.isnan(sc[key]), key
    assert sum(sc[f"scale/share/dilation_{r}"] for r in (1, 2, 4, 8)) == pytest.approx(1)
    figs = figures(res)
    assert set(figs) == {"density", "scale_attribution", "persistence", "recovery"}
    json.dumps(results_to_json(res))

    flat = tiny_sae(dilations=(), d_in=src.d_in)  # per-token SAE: no scale attribution
    res = evaluate_disentanglement(flat, _batches(src, n=1), config=DisentanglementConfig(lags=[1]))
    assert res["scale_share"] is None and not any(k.startswith("scale/") for k in res["scalars"])
    assert "scale_attribution" not in figures(res) and "recovery" not in figures(res)


def test_accumulator_state_tensors_sum_like_one_pass() -> None:
    sae = tiny_sae(d_in=16)
    f = torch.relu(torch.randn(6, 10, sae.d_sae))
    whole = DisentanglementAccumulator(sae.d_sae, (1, 2))
    whole.update(f)
    a, b = DisentanglementAccumulator(sae.d_sae, (1, 2)), DisentanglementAccumulator(sae.d_sae, (1, 2))
    a.update(f[:2])
    b.update(f[2:])
    for ta, tb in zip(a.state_tensors(), b.state_tensors(), strict=True):
        ta += tb  # what the all-reduce over ranks does
    ra, rw = disentanglement_results(sae, a), disentanglement_results(sae, whole)
    assert ra["scalars"] == pytest.approx(rw["scalars"], nan_ok=True)


def test_callback_logs_scalars_and_figures(tmp_path: Path) -> None:
    cli = cli_main(
        [
            "fit",
            *tiny_args(
                tmp_path,
                "--trainer.max_epochs",
                "1",
                "--trainer.limit_train_batches",
                "4",
                "--trainer.limit_val_batches",
                "2",
                "--trainer.callbacks",
                "[]",  # the demo config has one already; this test sets its own options
                "--trainer.callbacks+=callbacks.disentanglement.Disentanglement",
                "--trainer.callbacks.config.max_batches",
                "1",
                "--trainer.callbacks+=callbacks.GroundTruthRecovery",
            ),
        ]
    )
    m = cli.trainer.callback_metrics
    for key in (
        "coherence/max",
        "coherence/mean",
        "coherence/frac_above",
        "density/dead_fraction",
        "density/dense_fraction",
        "scale/share/dilation_1",
        "scale/entropy",
        "persistence/lag_1",
        "persistence/lag_4",
    ):
        assert f"val/disentanglement/{key}" in m, key
    # MMCS is logged once, by GroundTruthRecovery, under one name
    assert "val/mmcs/slow" in m and not [k for k in m if "mmcs" in k and not k.startswith("val/mmcs")]
    assert "val/disentanglement/persistence/lag_16" not in m  # ctx_len 16: undefined, not logged
    (cb,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "Disentanglement"]
    assert cb.state_dict() == {"n_validations": 2}  # val_check_interval 0.5
    ea = EventAccumulator(cli.trainer.logger.log_dir)
    ea.Reload()
    assert {"disentanglement/density", "disentanglement/persistence"} <= set(ea.Tags()["images"])


def test_mix_encoder_has_no_per_scale_attribution() -> None:
    """A mix encoder's W_enc has d_in rows (no dilation blocks): no scale share, even when d_in % S == 0."""
    sae = tiny_sae(d_in=16, encoder="mix")
    acc = DisentanglementAccumulator(sae.d_sae, (1, 2))
    acc.update(torch.relu(torch.randn(2, 10, sae.d_sae)))
    res = disentanglement_results(sae, acc)
    assert res["scale_share"] is None and not any(k.startswith("scale/") for k in res["scalars"])
    assert res["scalars"]["coherence/max"] >= 0
