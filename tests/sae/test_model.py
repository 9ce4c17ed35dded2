"""The MTSAE model: causality, identity initialisation, BOS isolation, decoder norm, export folding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mtsae.sae.model import MTSAE, conv1d_scale_branches
from tests.helpers.factories import tiny_sae


def _randomise(sae: MTSAE) -> MTSAE:
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        sae.normalize_decoder_()
    return sae


def test_branches_equal_causal_depthwise_conv1d() -> None:
    sae = _randomise(tiny_sae())
    u = torch.randn(3, 40, 32)
    torch.testing.assert_close(sae.scale_branches(u), conv1d_scale_branches(sae, u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cascade", [False, True])
@pytest.mark.parametrize("t", [0, 5, 17, 38])
def test_causality(t: int, cascade: bool) -> None:
    sae = _randomise(tiny_sae(cascade=cascade))
    x = torch.randn(2, 40, 32)
    x2 = x.clone()
    x2[:, t + 1 :] += 10 * torch.randn_like(x2[:, t + 1 :])
    f, f2 = sae.encode(x), sae.encode(x2)
    torch.testing.assert_close(f[:, : t + 1], f2[:, : t + 1], atol=0, rtol=0)
    if t + 1 < 40:
        assert not torch.allclose(f[:, t + 1 :], f2[:, t + 1 :])


@pytest.mark.parametrize("cascade, window", [(False, 17), (True, 31)])
def test_receptive_field(cascade: bool, window: int) -> None:
    sae = _randomise(tiny_sae(cascade=cascade))
    assert sae.receptive_field == window
    x = torch.randn(1, 64, 32)
    t = 50
    far, near = x.clone(), x.clone()
    far[:, t - window] += 5.0  # just outside the window
    near[:, t - window + 1] += 5.0  # the oldest token inside it
    assert torch.equal(sae.encode(far)[:, t], sae.encode(x)[:, t])
    assert not torch.allclose(sae.encode(near)[:, t], sae.encode(x)[:, t])


def test_cascade_feeds_each_branch_the_previous_one() -> None:
    sae = _randomise(tiny_sae(dilations=[1, 2], cascade=True))
    u = torch.randn(2, 30, 32)
    flat = tiny_sae(dilations=[1, 2])
    with torch.no_grad():
        flat.conv_weight.copy_(sae.conv_weight)
    z, z1 = sae.scale_branches(u), flat.scale_branches(u)
    torch.testing.assert_close(z[:, :, 0], z1[:, :, 0])
    single = tiny_sae(dilations=[2])
    with torch.no_grad():
        single.conv_weight.copy_(sae.conv_weight[1:])
    torch.testing.assert_close(z[:, :, 1], single.scale_branches(z1[:, :, 0])[:, :, 0])


def _per_token_twin(mt: MTSAE) -> MTSAE:
    """The per-token SAE that an MTSAE with identity convolutions equals (W_enc = sum of its blocks)."""
    base = tiny_sae(dilations=[])
    with torch.no_grad():
        base.W_enc.copy_(mt.W_enc.view(mt.n_scales, mt.d_in, mt.d_sae).sum(0))
        base.W_dec.copy_(mt.W_dec)
        base.b_enc.copy_(mt.b_enc)
        base.b_dec.copy_(mt.b_dec)
    return base


@pytest.mark.parametrize("cascade", [False, True])
def test_context_contributions_are_the_branches_without_their_centre_tap(cascade: bool) -> None:
    sae = _randomise(tiny_sae(cascade=cascade))
    u = torch.randn(2, 40, 32)
    c = sae.context_contributions(u, sae.scale_branches(u))
    no_centre = copy.deepcopy(sae)
    with torch.no_grad():
        no_centre.conv_weight[:, :, -1] = 0.0
    no_centre.cascade = False  # every branch on the input given to it
    if cascade:  # branch s's context taps act on branch s-1's output (centre tap included)
        z = sae.scale_branches(u)
        expected = torch.stack(
            [no_centre.scale_branches(inp)[:, :, s] for s, inp in enumerate([u, *z.unbind(2)[:-1]])], dim=2
        )
    else:
        expected = no_centre.scale_branches(u)
    torch.testing.assert_close(c, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c[:, 0], torch.zeros_like(c[:, 0]), atol=1e-5, rtol=0)  # no earlier token
    with pytest.raises(ValueError, match="no context contributions"):
        tiny_sae(dilations=[]).context_contributions(u, u[:, :, None])


def test_untrained_mtsae_equals_per_token_sae() -> None:
    mt = tiny_sae(context_init_std=0.0)
    with torch.no_grad():  # arbitrary (different) blocks and biases; convs stay at their identity init
        mt.W_enc.normal_()
        mt.b_enc.normal_()
        mt.b_dec.normal_()
    base = _per_token_twin(mt)
    x = torch.randn(2, 20, 32)
    valid = torch.rand(2, 20) > 0.2
    a, b = mt(x, valid), base(x, valid)
    torch.testing.assert_close(a.f, b.f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.x_hat, b.x_hat, atol=1e-5, rtol=1e-5)
    assert b.z_scales is None and a.z_scales.shape == (2, 20, 4, 32)


def test_context_init_std_perturbs_only_context_taps_and_stays_close() -> None:
    """The default symmetry-breaking perturbation: offset-0 taps stay 1, context taps get N(0, 0.01), the
    other initial weights are those of the unperturbed model, and the untrained MTSAE's pre-activations are
    within 2% (relative norm) of the equivalent per-token SAE's."""
    torch.manual_seed(3)
    mt = tiny_sae()
    torch.manual_seed(3)
    exact = tiny_sae(context_init_std=0.0)
    for name, p in exact.named_parameters():
        if name != "conv_weight":
            assert torch.equal(p, dict(mt.named_parameters())[name]), name
    w = mt.conv_weight
    assert torch.equal(w[:, :, -1], torch.ones_like(w[:, :, -1]))
    assert 0.007 < w[:, :, :-1].std().item() < 0.013
    base = _per_token_twin(mt)
    x = torch.randn(4, 40, 32)
    pre_mt, pre_tok = mt(x).pre, base(x).pre
    rel = ((pre_mt - pre_tok).norm() / pre_tok.norm()).item()
    assert 0 < rel < 0.02
    with pytest.raises(ValueError, match="context_init_std"):
        tiny_sae(context_init_std=-0.1)


def test_invalid_positions_do_not_leak() -> None:
    sae = _randomise(tiny_sae())
    x = torch.randn(2, 24, 32)
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[:, 0] = False
    huge = x.clone()
    huge[:, 0] = 1e4  # a Gemma-like BOS activation
    f, f_huge = sae.encode(x, valid), sae.encode(huge, valid)
    torch.testing.assert_close(f, f_huge, atol=0, rtol=0)
    assert torch.all(f[:, 0] == 0)  # no features at invalid positions


def test_encode_refuses_ambiguous_2d_input_and_bad_shapes() -> None:
    sae = _randomise(tiny_sae())
    x = torch.randn(20, 32)
    # [20, 32] could be one sequence or 20 tokens of different sequences: the MTSAE asks for [B, T, d]
    with pytest.raises(ValueError, match=r"2-D input \(20, 32\).*x\[None\] for one sequence"):
        sae.encode(x)
    with pytest.raises(ValueError, match="Pass \\[B, T, 32\\]"):
        sae(x, torch.ones(20, dtype=torch.bool))
    # one token is one sequence either way; a per-token SAE takes [N, d] tokens as before
    torch.testing.assert_close(sae.encode(x[:1]), sae.encode(x[None, :1])[0])
    base = _randomise(tiny_sae(dilations=[]))
    torch.testing.assert_close(base.encode(x), base.encode(x[:, None])[:, 0])
    with pytest.raises(ValueError, match="expected activations"):
        sae.encode(torch.randn(2, 20, 31))
    with pytest.raises(ValueError, match="valid mask"):
        sae.encode(torch.randn(2, 20, 32), torch.ones(2, 19, dtype=torch.bool))


@pytest.mark.parametrize("bad", [dict(dilations=[0]), dict(dilations=[2, 2]), dict(d_sae=0)])
def test_bad_config_is_refused(bad: dict) -> None:
    kw = dict(d_in=8, d_sae=16) | bad
    with pytest.raises(ValueError):
        MTSAE(**kw)


def test_decoder_rows_stay_unit_norm_and_gradient_is_projected() -> None:
    sae = tiny_sae()
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    x = torch.randn(4, 16, 32)
    for _ in range(5):
        out = sae(x)
        loss = (x - out.x_hat).pow(2).sum(-1).mean() + out.f.abs().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        raw = sae.W_dec.grad.clone()
        sae.project_decoder_grad_()
        g = sae.W_dec.grad
        assert (g * sae.W_dec).sum(-1).abs().max() < 1e-5  # orthogonal to each row
        assert not torch.allclose(raw, g)  # the projection did something
        opt.step()
        assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-6  # Adam alone leaves the sphere
        sae.normalize_decoder_()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


@pytest.mark.parametrize("dilations", [[], [1, 2, 4, 8]])
def test_fold_input_scale_gives_an_sae_on_raw_activations(dilations: list[int]) -> None:
    sae = _randomise(tiny_sae(dilations))
    c = 3.7
    x = torch.randn(2, 20, 32)
    scaled = sae(x * c)
    raw = copy.deepcopy(sae)
    raw.fold_input_scale_(c)
    out = raw(x)
    torch.testing.assert_close(out.x_hat, scaled.x_hat / c, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.f, scaled.f / c, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(raw.W_dec.norm(dim=1), torch.ones(64))


@pytest.mark.parametrize("dilations", [[], [1, 2]])
def test_every_trainable_parameter_gets_a_gradient(dilations: list[int]) -> None:
    """DDP (find_unused_parameters=False) fails on a trainable parameter that never gets a gradient."""
    sae = tiny_sae(dilations)
    out = sae(torch.randn(2, 8, 32))
    ((out.x_hat - 1).pow(2).sum() + out.f.sum()).backward()
    missing = [n for n, p in sae.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


# ---------------------------------------------------------------- the mix encoder
def test_mix_encoder_is_one_causal_depthwise_conv1d() -> None:
    """The mean of the branches is one ``F.conv1d`` kernel holding the union of their taps."""
    sae = _randomise(tiny_sae(encoder="mix"))
    assert sae.W_enc.shape == (32, 64)
    x = torch.randn(3, 40, 32)
    valid = torch.rand(3, 40) > 0.1
    u = (x - sae.b_dec) * valid.unsqueeze(-1)
    L = 1 + 2 * 8  # offsets 0, r, 2r for r in (1, 2, 4, 8)
    kernel = torch.zeros(32, L)
    for s, r in enumerate([1, 2, 4, 8]):
        for k, lag in enumerate([2 * r, r, 0]):  # tap k of the conv looks (2 - k) * r tokens back
            kernel[:, L - 1 - lag] += sae.conv_weight[s, :, k].detach() / 4
    torch.testing.assert_close(sae.mix_kernel().detach(), kernel)
    mixed = F.conv1d(F.pad(u.transpose(1, 2), (L - 1, 0)), kernel.unsqueeze(1), groups=32).transpose(1, 2)
    pre = mixed @ sae.W_enc + sae.b_enc
    out = sae(x, valid)
    torch.testing.assert_close(out.pre, pre, atol=1e-4, rtol=1e-4)
    assert out.z_scales.shape == (3, 40, 4, 32)  # per-branch outputs stay available (scales separation)
    torch.testing.assert_close(out.z_scales.mean(2), mixed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cascade", [False, True])
def test_untrained_mix_encoder_equals_per_token_sae(cascade: bool) -> None:
    mt = tiny_sae(encoder="mix", cascade=cascade, context_init_std=0.0)
    torch.testing.assert_close(mt.W_enc, mt.W_dec.t())  # per-token identity at initialisation
    with torch.no_grad():
        mt.W_enc.normal_()
        mt.b_enc.normal_()
        mt.b_dec.normal_()
    base = tiny_sae(dilations=[])
    base.load_state_dict({k: v for k, v in mt.state_dict().items() if k != "conv_weight"}, strict=False)
    x = torch.randn(2, 20, 32)
    valid = torch.rand(2, 20) > 0.2
    a, b = mt(x, valid), base(x, valid)
    torch.testing.assert_close(a.f, b.f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.x_hat, b.x_hat, atol=1e-5, rtol=1e-5)
    assert torch.all(a.f[~valid] == 0)


@pytest.mark.parametrize("cascade", [False, True])
def test_mix_encoder_is_causal_and_isolates_invalid_positions(cascade: bool) -> None:
    sae = _randomise(tiny_sae(encoder="mix", cascade=cascade))
    x = torch.randn(2, 40, 32)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[:, 0] = False
    x2 = x.clone()
    x2[:, 0] = 1e4  # a huge BOS
    x2[:, 21:] += 10 * torch.randn_like(x2[:, 21:])  # the future
    f, f2 = sae.encode(x, valid), sae.encode(x2, valid)
    torch.testing.assert_close(f[:, :21], f2[:, :21], atol=0, rtol=0)
    assert not torch.allclose(f[:, 21:], f2[:, 21:])


def test_mix_encoder_export_round_trip(tmp_path) -> None:
    from mtsae.sae.export import load_sae, save_sae

    sae = _randomise(tiny_sae(encoder="mix", cascade=True))
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert loaded.encoder == "mix" and loaded.cascade and loaded.config() == sae.config()
    x = torch.randn(2, 24, 32)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)


def test_unknown_encoder_is_refused() -> None:
    with pytest.raises(ValueError, match="encoder must be one of"):
        tiny_sae(encoder="sum")
    with pytest.raises(ValueError, match="side-by-side"):
        tiny_sae(encoder="mix", cascade=True).mix_kernel()


def test_non_finite_values_at_invalid_positions_do_not_reach_the_codes() -> None:
    """An overflowed BOS (inf) or a NaN at an invalid position is selected out, not multiplied by 0."""
    torch.manual_seed(0)
    sae = MTSAE(8, 32, dilations=[1, 2])
    x = torch.randn(2, 10, 8)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[:, 0] = False
    clean = sae.encode(x, valid)
    x[0, 0] = torch.inf
    x[1, 0, :3] = torch.nan
    assert torch.equal(sae.encode(x, valid), clean) and torch.isfinite(clean).all()
