"""The activation scale has one owner: the view of a scaled SAE from raw activations equals its folded copy."""

from __future__ import annotations

import pytest
import torch

from mtsae.evals.unlearning.intervention import clamp_intervention
from mtsae.sae.scale import ScaledSAE, input_scale
from tests.helpers.factories import tiny_sae


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_view_and_folded_copy_agree(activation: str) -> None:
    kwargs = {"k": 8} if activation == "topk" else {}
    sae = tiny_sae(activation=activation, activation_kwargs=kwargs)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(2, 12, 32) * 40.0  # raw activations, far from unit scale
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[:, 0] = False
    c = input_scale(32, float((x[valid] ** 2).sum(-1).mean()))
    view, folded = ScaledSAE(sae, torch.tensor(c)), ScaledSAE(sae, c).folded()
    out, ref = view(x, valid), folded(x, valid)
    torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out.f, ref.f, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(view.encode(x, valid), folded.encode(x, valid), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(view.decode(out.f), ref.x_hat, rtol=1e-4, atol=1e-3)
    # a clamp of -m means the same through the view and in the exported SAE
    feats = torch.arange(5)
    torch.testing.assert_close(
        clamp_intervention(x, view, feats, 3.0, valid),
        clamp_intervention(x, folded, feats, 3.0, valid),
        rtol=1e-4,
        atol=1e-3,
    )
    assert ((view.scale(x)[valid] ** 2).sum(-1).mean() / 32).item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(view.unscale(view.scale(x)), x)


def test_input_scale_rejects_empty_statistics() -> None:
    with pytest.raises(ValueError, match="mean_sq_norm must be positive"):
        input_scale(16, 0.0)
