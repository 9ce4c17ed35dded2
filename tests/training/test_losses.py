"""Training losses: hand-worked values and where their gradients go."""

from __future__ import annotations

import math

import pytest
import torch

from mtsae.training.losses import (
    codes_separation,
    context_decorrelation,
    decoder_separation,
    fvu,
    l1_sparsity,
    recon_loss,
    scales_decorrelation,
    scales_separation,
)
from tests.helpers.factories import tiny_sae

R2 = 1 / math.sqrt(2)


def test_recon_fvu_l1_by_hand() -> None:
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [100.0, 100.0]]])  # last token invalid
    x_hat = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False]])
    assert recon_loss(x, x_hat, valid).item() == pytest.approx((1 + 4) / 2)
    # mean x = (0.5, 1); ||x - mean||^2 = 0.25 + 1 = 1.25 for both tokens
    assert fvu(x, x_hat, valid).item() == pytest.approx(2.5 / 1.25)
    f = torch.tensor([[[1.0, -2.0], [0.5, 0.0], [9.0, 9.0]]])
    assert l1_sparsity(f, valid).item() == pytest.approx((3 + 0.5) / 2)


def test_scales_separation_by_hand() -> None:
    # token 0: branches [1,0] and [1,1] -> cos 1/sqrt2; token 1: opposite -> relu(-1) = 0; token 2 invalid
    z = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [-1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]]])
    valid = torch.tensor([[True, True, False]])
    assert scales_separation(z, valid).item() == pytest.approx(R2 / 2)
    # three scales: pairs (0,1) = 0, (0,2) = (1,2) = 1/sqrt2
    z3 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])
    assert scales_separation(z3, None).item() == pytest.approx(2 * R2 / 3)
    with pytest.raises(ValueError, match="two dilations"):
        scales_separation(z3[:, :, :1], None)


def test_context_decorrelation_by_hand() -> None:
    # token 0: contributions [1,0] and [1,1] -> cos^2 1/2; token 1: opposite -> 1 (not rewarded, unlike
    # relu(cos)); token 2: one branch has no contribution -> 0; token 3 invalid
    c = torch.tensor(
        [
            [
                [[1.0, 0.0], [1.0, 1.0]],
                [[1.0, 0.0], [-2.0, 0.0]],
                [[0.0, 0.0], [1.0, 0.0]],
                [[1.0, 0.0], [1.0, 0.0]],
            ]
        ]
    )
    valid = torch.tensor([[True, True, True, False]])
    assert context_decorrelation(c, valid).item() == pytest.approx((0.5 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="two dilations"):
        context_decorrelation(c[:, :, :1], None)


def test_decoder_separation_by_hand() -> None:
    W_dec = torch.tensor([[1.0, 0.0], [R2, R2], [0.0, 1.0], [-1.0, 0.0]])
    f = torch.tensor(
        [
            [
                [1.0, 2.0, 0.0, 0.0],  # pair (0, 1): cos 1/sqrt2
                [0.0, 1.0, 1.0, 0.0],  # pair (1, 2): cos 1/sqrt2
                [3.0, 0.0, 0.0, 1.0],  # pair (0, 3): cos -1 -> 0
                [0.0, 0.0, 5.0, 0.0],  # one active feature: no pair
                [1.0, 1.0, 0.0, 0.0],  # invalid
            ]
        ]
    )
    valid = torch.tensor([[True, True, True, True, False]])
    assert decoder_separation(W_dec, f, valid).item() == pytest.approx(2 * R2 / 3)
    assert decoder_separation(W_dec, f, valid, max_pairs=1, seed=0).item() in (
        pytest.approx(0.0),
        pytest.approx(R2),
    )
    assert decoder_separation(W_dec, torch.zeros_like(f), valid).item() == 0.0


def test_codes_separation_by_hand() -> None:
    f = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]])
    valid = torch.tensor([[True, True, True, False]])
    # max cos per token: a -> b 1/sqrt2, b -> a 1/sqrt2, c -> 0
    assert codes_separation(f, valid).item() == pytest.approx(2 * R2 / 3)
    big = torch.rand(1, 500, 8)
    assert 0 < codes_separation(big, None, max_tokens=16, seed=0).item() <= 1


def _grads(kind: str) -> dict[str, bool]:
    sae = tiny_sae(dilations=[1, 2, 4])
    with torch.no_grad():
        sae.conv_weight.normal_()
        sae.b_dec.normal_()
    x = torch.randn(2, 12, 32)
    valid = torch.ones(2, 12, dtype=torch.bool)
    out = sae(x, valid)
    loss = {
        "scales": lambda: scales_separation(out.z_scales, valid),
        "scales_decorr": lambda: scales_decorrelation(out.z_scales, valid),
        "context_decorr": lambda: context_decorrelation(
            sae.context_contributions(sae.encoder_input(x, valid), out.z_scales), valid
        ),
        "decoder": lambda: decoder_separation(sae.W_dec, out.f, valid),
        "codes": lambda: codes_separation(out.f, valid),
    }[kind]()
    assert loss.item() > 0
    loss.backward()
    return {n: p.grad is not None and p.grad.abs().sum().item() > 0 for n, p in sae.named_parameters()}


@pytest.mark.parametrize(
    "kind, reached",
    [
        ("scales", {"conv_weight", "b_dec"}),
        ("scales_decorr", {"conv_weight", "b_dec"}),
        ("context_decorr", {"conv_weight", "b_dec"}),
        ("decoder", {"W_dec"}),
        ("codes", {"conv_weight", "W_enc", "b_enc", "b_dec"}),
    ],
)
def test_separation_gradients_reach_only_their_parameters(kind: str, reached: set[str]) -> None:
    got = _grads(kind)
    assert {n for n, g in got.items() if g} == reached


@pytest.mark.parametrize("loss_fn", [scales_separation, scales_decorrelation])
def test_scale_separation_has_a_gradient_at_initialisation(loss_fn) -> None:
    """With exactly equal (identity) branches the cosine is at its maximum and the gradient vanishes; the
    default context-tap perturbation of an untrained MTSAE gives a nonzero gradient from step 0."""
    x = torch.randn(2, 24, 32)
    valid = torch.ones(2, 24, dtype=torch.bool)
    norms = {}
    for std in (0.0, 0.01):
        torch.manual_seed(0)
        sae = tiny_sae(context_init_std=std)
        loss = loss_fn(sae(x, valid).z_scales, valid)
        assert loss.item() == pytest.approx(1.0, abs=1e-3)  # branches (nearly) equal
        loss.backward()
        norms[std] = sae.conv_weight.grad.norm().item()
    assert norms[0.0] < 1e-5 < 1e-3 < norms[0.01]


def test_sign_flipped_branch_is_not_rewarded_by_decorrelation() -> None:
    z = torch.randn(3, 10, 1, 16)
    valid = torch.ones(3, 10, dtype=torch.bool)
    same, flipped = torch.cat([z, z], dim=2), torch.cat([z, -z], dim=2)
    orth = torch.zeros(3, 10, 2, 16)
    orth[..., 0, 0], orth[..., 1, 1] = 1.0, 2.0
    # relu(cos) is fully satisfied by flipping the sign of a branch ...
    assert scales_separation(same, valid).item() == pytest.approx(1.0)
    assert scales_separation(flipped, valid).item() == pytest.approx(0.0)
    # ... cos^2 is not: only orthogonal branches score 0
    assert scales_decorrelation(flipped, valid).item() == pytest.approx(1.0)
    assert scales_decorrelation(same, valid).item() == pytest.approx(1.0)
    assert scales_decorrelation(orth, valid).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="two dilations"):
        scales_decorrelation(z, valid)


def test_context_decorrelation_moves_the_context_taps_from_initialisation() -> None:
    """At initialisation the branch outputs share the token itself (cosine ~1), so ``scales_decorr``
    barely reaches the context taps; the context contributions do not share it, and their decorrelation
    has a gradient on those taps orders of magnitude larger (and a term far from its maximum)."""
    x = torch.randn(2, 24, 32)
    valid = torch.ones(2, 24, dtype=torch.bool)
    norms, terms = {}, {}
    for name in ("scales_decorr", "context_decorr"):
        torch.manual_seed(0)
        sae = tiny_sae()
        out = sae(x, valid)
        if name == "scales_decorr":
            loss = scales_decorrelation(out.z_scales, valid)
        else:
            loss = context_decorrelation(
                sae.context_contributions(sae.encoder_input(x, valid), out.z_scales), valid
            )
        loss.backward()
        norms[name], terms[name] = sae.conv_weight.grad[:, :, :-1].norm().item(), loss.item()
    assert terms["scales_decorr"] == pytest.approx(1.0, abs=1e-3)
    assert terms["context_decorr"] < 0.2  # random taps: contributions nearly orthogonal, ~1/d_in
    assert norms["context_decorr"] > 100 * norms["scales_decorr"], norms
