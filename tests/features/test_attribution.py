"""Context attribution: the contributions add up to the pre-activation, and the ablated activation is the
activation of the token encoded alone."""

from __future__ import annotations

import pytest
import torch

from mtsae.features.attribution import context_attribution
from tests.helpers.factories import tiny_sae


def _trained_like(sae):
    with torch.no_grad():  # context taps far from the identity initialisation
        sae.conv_weight.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae.eval()


@pytest.mark.parametrize(
    "kw",
    [{}, {"encoder": "mix"}, {"cascade": True}, {"activation": "topk", "activation_kwargs": {"k": 5}}],
    ids=["concat", "mix", "cascade", "topk"],
)
def test_contributions_sum_to_the_pre_activation(kw: dict) -> None:
    sae = _trained_like(tiny_sae(**kw))
    N, T = 6, 40
    x = torch.randn(N, T, sae.d_in)
    valid = torch.ones(N, T, dtype=torch.bool)
    valid[:, 0] = False
    pos = torch.tensor([1, 5, 17, 30, 39, 39])
    feats = torch.tensor([0, 3, 7, 63, 12, 12])
    a = context_attribution(sae, x, valid, pos, feats)
    out = sae(x, valid)
    n = torch.arange(N)
    want_pre = out.pre[n, pos, feats]
    torch.testing.assert_close(a.pre, want_pre, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.self_part.sum(1) + a.context.sum(1) + a.bias, want_pre, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.act, out.f[n, pos, feats], atol=1e-5, rtol=1e-5)
    # context ablated = the token encoded as a sequence of one (no earlier tokens)
    for i in range(N):
        alone = sae.encode(x[i : i + 1, pos[i] : pos[i] + 1], valid[i : i + 1, pos[i] : pos[i] + 1])
        torch.testing.assert_close(a.ablated[i], alone[0, 0, feats[i]], atol=1e-5, rtol=1e-5)
    assert ((a.context_share >= 0) & (a.context_share <= 1)).all()


def test_context_part_is_zero_at_the_first_token_and_share_is_exact() -> None:
    sae = _trained_like(tiny_sae(dilations=(1, 2), d_in=4, d_sae=3))
    x = torch.randn(1, 8, 4)
    a = context_attribution(sae, x, None, torch.tensor([0]), torch.tensor([1]))
    assert a.context.abs().max() == 0  # nothing before position 0
    assert a.context_share.item() == 0
    # hand computation for one branch: the context taps of dilation 2 at t = 5 read t = 3 and t = 1
    a = context_attribution(sae, x, None, torch.tensor([5]), torch.tensor([1]))
    u = x[0] - sae.b_dec
    w = sae.conv_weight[1]  # [d_in, 3]: taps at offsets -4, -2, 0
    block = sae.W_enc[4:8, 1]
    ctx = ((w[:, 0] * u[1] + w[:, 1] * u[3]) * block).sum()
    own = ((w[:, 2] * u[5]) * block).sum()
    torch.testing.assert_close(a.context[0, 1], ctx)
    torch.testing.assert_close(a.self_part[0, 1], own)
    share = a.context.abs().sum() / (a.context.abs().sum() + a.self_part.abs().sum())
    torch.testing.assert_close(a.context_share[0], share)


def test_per_token_sae_has_no_attribution() -> None:
    sae = tiny_sae(dilations=())
    assert (
        context_attribution(sae, torch.randn(2, 5, 32), None, torch.tensor([1, 2]), torch.tensor([0, 1]))
        is None
    )
