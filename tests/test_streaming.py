"""Streaming MTSAE encoding (mtsae.streaming) equals the full-sequence encoding."""

from __future__ import annotations

import pytest
import torch

from mtsae.model import MTSAE
from mtsae.streaming import StreamingEncoder


def random_sae(dilations: list[int], cascade: bool = False, activation: str = "relu", **kw) -> MTSAE:
    """An MTSAE whose convolutions are far from the identity (so the context matters) and whose
    features fire on about half the tokens."""
    sae = MTSAE(16, 48, dilations=dilations, cascade=cascade, activation=activation, **kw).eval()
    with torch.no_grad():
        sae.conv_weight.copy_(torch.randn_like(sae.conv_weight))
        sae.b_dec.copy_(0.1 * torch.randn(16))
        sae.b_enc.copy_(0.05 * torch.randn(48))
    return sae


def left_padded(B: int = 3, T: int = 40, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``[B, T, d]`` and a valid mask with left padding of different lengths per row, a
    BOS-like invalid first real position and one invalid position in the middle of a row."""
    x = torch.randn(B, T, d) * 3
    valid = torch.ones(B, T, dtype=torch.bool)
    for b, n_pad in enumerate([0, 5, 13][:B]):
        valid[b, : n_pad + 1] = False  # padding, then BOS
    valid[0, T // 2] = False  # an EOS inside the row
    return x, valid


CASES = [
    ([1], False),
    ([1, 2, 4, 8], False),
    ([3, 5], False),
    ([2, 7, 1], False),
    ([1, 2, 4], True),
    ([4, 1, 3], True),
]


@pytest.mark.parametrize(("dilations", "cascade"), CASES)
@pytest.mark.parametrize("chunks", [[16] + [1] * 24, [1] * 40, [7, 3, 1, 1, 20, 8]])
def test_streaming_equals_full_sequence(dilations: list[int], cascade: bool, chunks: list[int]) -> None:
    sae = random_sae(dilations, cascade)
    x, valid = left_padded()
    with torch.no_grad():
        full = sae.encode(x, valid)  # [B, T, d_sae]
        stream = StreamingEncoder(sae)
        assert stream.context == sae.receptive_field - 1
        parts, start = [], 0
        for n in chunks:
            parts.append(stream.step(x[:, start : start + n], valid[:, start : start + n]))
            start += n
            # the state is the last R - 1 inputs: O(receptive field), whatever the length so far
            assert stream.buffer.shape == (3, sae.receptive_field - 1, 16)
    streamed = torch.cat(parts, dim=1)
    assert start == x.shape[1] and stream.n_seen == x.shape[1]
    assert (full > 0).float().mean() > 0.1  # the comparison is not between zeros
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dilations", [[1, 2, 4, 8], [3, 5]])
def test_streaming_mix_encoder_equals_full_sequence(dilations: list[int]) -> None:
    """The ``mix`` encoder (branches averaged before one ``W_enc``) streams exactly too."""
    sae = random_sae(dilations, encoder="mix")
    x, valid = left_padded()
    with torch.no_grad():
        full = sae.encode(x, valid)
        stream = StreamingEncoder(sae)
        streamed = torch.cat(
            [stream.step(x[:, t : t + 1], valid[:, t : t + 1]) for t in range(x.shape[1])], 1
        )
    assert (full > 0).float().mean() > 0.1
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_a_rows_codes() -> None:
    """A row streamed alone equals the same row behind left padding (pads are zeros, like the start)."""
    sae = random_sae([1, 2, 4])
    x = torch.randn(1, 12, 16)
    padded = torch.cat([torch.randn(1, 6, 16) * 100, x], dim=1)  # huge values at the pads: masked
    valid = torch.cat([torch.zeros(1, 6, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        alone = StreamingEncoder(sae)
        a = torch.cat([alone.step(x[:, :4]), *[alone.step(x[:, t : t + 1]) for t in range(4, 12)]], dim=1)
        behind = StreamingEncoder(sae)
        b = torch.cat([behind.step(padded[:, :10], valid[:, :10])] + [
            behind.step(padded[:, t : t + 1], valid[:, t : t + 1]) for t in range(10, 18)
        ], dim=1)  # fmt: skip
    torch.testing.assert_close(b[:, 6:], a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "batchtopk"])
def test_streaming_other_activations(activation: str) -> None:
    kw = {"activation_kwargs": {"k": 5}} if "topk" in activation else {}
    sae = random_sae([1, 2, 4], activation=activation, **kw)
    x, valid = left_padded(B=2, T=24)
    with torch.no_grad():
        full = sae.encode(x, valid)
        stream = StreamingEncoder(sae)
        streamed = torch.cat([stream.step(x[:, :10], valid[:, :10])] + [
            stream.step(x[:, t : t + 1], valid[:, t : t + 1]) for t in range(10, 24)
        ], dim=1)  # fmt: skip
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=1e-5)


def test_per_token_sae_passes_straight_through() -> None:
    sae = random_sae([])
    x, valid = left_padded(B=2, T=10)
    stream = StreamingEncoder(sae)
    assert stream.context == 0 and not stream.streams
    with torch.no_grad():
        out = torch.cat([stream.step(x[:, t : t + 1], valid[:, t : t + 1]) for t in range(10)], dim=1)
        torch.testing.assert_close(out, sae.encode(x, valid))
    assert stream.buffer is None  # no state kept


def test_streaming_checks_shapes_and_resets() -> None:
    sae = random_sae([1, 2])
    stream = StreamingEncoder(sae)
    with torch.no_grad():
        stream.step(torch.randn(2, 3, 16))
        with pytest.raises(ValueError, match="holds 2 sequences"):
            stream.step(torch.randn(3, 1, 16))
        with pytest.raises(ValueError, match="valid mask"):
            stream.step(torch.randn(2, 1, 16), torch.ones(2, 2, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"\[B, T, d_in\]"):
            stream.step(torch.randn(3, 16))
        stream.reset()
        assert stream.n_seen == 0 and stream.buffer is None
        x = torch.randn(3, 5, 16)
        torch.testing.assert_close(stream.step(x), sae.encode(x))


def test_an_encoder_that_does_not_stream_is_refused() -> None:
    class Pooled(MTSAE):  # codes that depend on the whole sequence: no streaming state can match them
        def codes_from_branches(self, z, valid=None):
            _, pre = super().codes_from_branches(z, valid)
            pre = pre + pre.mean(dim=1, keepdim=True)
            return self.act(pre, valid), pre

    with pytest.raises(RuntimeError, match="streaming encoding differs"):
        StreamingEncoder(Pooled(16, 32, dilations=[1, 2]).eval())
