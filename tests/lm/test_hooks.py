"""mtsae.lm.hooks (capture / splice of resid_post) and mtsae.lm.tiny_lm, on tiny offline models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import mtsae_app.cli as mtsae_cli
from mtsae.lm.hooks import capture_resid_post, decoder_layers, lm_hidden_size, n_layers, splice_resid_post
from mtsae.lm.tiny_lm import build_tiny_lm
from tests.helpers.lm import tiny_lm_dir

ARCHS = ["gemma2", "llama", "gpt2", "gpt_neox"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, nn.Module]:
    from transformers import AutoModelForCausalLM

    return {
        arch: AutoModelForCausalLM.from_pretrained(tiny_lm_dir(tmp_path_factory, arch)).eval()
        for arch in ARCHS
    }


def _ids(b: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(4, 500, (b, t))


def _n_hooks(model: nn.Module) -> list[int]:
    """Forward hooks per decoder layer (transformers installs its own once output_hidden_states is used)."""
    return [len(layer._forward_hooks) for layer in decoder_layers(model)]


# ---------------------------------------------------------------------------------------- capture
@pytest.mark.parametrize("arch", ARCHS)
def test_capture_equals_hidden_states(tiny_models: dict[str, nn.Module], arch: str) -> None:
    model = tiny_models[arch]
    ids = _ids()
    with torch.inference_mode():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    n = len(decoder_layers(model))
    assert n == 4 and len(hs) == n + 1
    for layer in range(n - 1):  # the last entry of hidden_states has the final norm applied
        h = capture_resid_post(model, layer, ids)
        assert h.shape == (2, 12, 64)
        torch.testing.assert_close(h, hs[layer + 1], rtol=0, atol=0)


def test_capture_last_layer_is_before_final_norm(tiny_models: dict[str, nn.Module]) -> None:
    model = tiny_models["gemma2"]
    ids = _ids()
    with torch.inference_mode():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        h = capture_resid_post(model, 3, ids)
        torch.testing.assert_close(model.model.norm(h), hs[-1])
    assert not torch.allclose(h, hs[-1])


def test_capture_with_attention_mask(tiny_models: dict[str, nn.Module]) -> None:
    model = tiny_models["llama"]
    ids, mask = _ids(), torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    h = capture_resid_post(model, 1, ids, attention_mask=mask)
    torch.testing.assert_close(h[:, 5:], ref[:, 5:])


@pytest.mark.parametrize("arch", ["gemma2", "gpt2"])
def test_capture_stops_after_layer(tiny_models: dict[str, nn.Module], arch: str) -> None:
    model = tiny_models[arch]
    layers = decoder_layers(model)
    calls: list[int] = []
    head = model.get_output_embeddings()
    before = _n_hooks(model)
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, layer in enumerate(layers)
    ]
    handles.append(head.register_forward_pre_hook(lambda m, a: calls.append(-1)))
    try:
        capture_resid_post(model, 1, _ids())
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]  # layers 2, 3 and the unembedding never ran
    assert _n_hooks(model) == before  # the capture hook is gone


def test_capture_removes_hook_on_error(tiny_models: dict[str, nn.Module]) -> None:
    model = tiny_models["gemma2"]
    before = _n_hooks(model)
    with pytest.raises(IndexError):
        capture_resid_post(model, 2, torch.full((1, 4), 10_000))  # token id outside the vocabulary
    assert _n_hooks(model) == before


@pytest.mark.parametrize("layer", [-1, 4, 100])
def test_out_of_range_layer(tiny_models: dict[str, nn.Module], layer: int) -> None:
    with pytest.raises(ValueError, match=r"out of range.*4 decoder layers.*0 \.\. 3"):
        capture_resid_post(tiny_models["gemma2"], layer, _ids())
    with pytest.raises(ValueError, match="out of range"):
        with splice_resid_post(tiny_models["gpt2"], layer, lambda h: h):
            pass


def test_unsupported_architecture() -> None:
    class MyEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ValueError, match=r"MyEncoder.*Gemma2.*Llama.*Pythia.*GPT-2"):
        decoder_layers(MyEncoder())
    with pytest.raises(ValueError, match="MyEncoder"):
        capture_resid_post(MyEncoder(), 0, _ids())


class _TupleLayer(nn.Module):
    """A decoder layer that returns a tuple, as transformers < 5 layers do."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, None]:
        return h + self.lin(h), None


class _TupleLM(nn.Module):
    """``model.layers`` layout with tuple outputs; ``forward(input_ids, ...)`` returns logits."""

    def __init__(self, vocab: int = 20, d: int = 8, n: int = 3) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList([_TupleLayer(d) for _ in range(n)])
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, use_cache=None, return_all=False):
        h = self.model.embed(input_ids)
        hs = [h]
        for layer in self.model.layers:
            h, _ = layer(h)
            hs.append(h)
        return hs if return_all else self.head(h)


def test_tuple_outputs() -> None:
    lm = _TupleLM()
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        hs, logits = lm(ids, return_all=True), lm(ids)
    torch.testing.assert_close(capture_resid_post(lm, 1, ids), hs[2])
    with torch.no_grad(), splice_resid_post(lm, 2, torch.zeros_like):
        zeroed = lm(ids)
    torch.testing.assert_close(zeroed, lm.head.bias.expand_as(zeroed))
    with torch.no_grad(), splice_resid_post(lm, 0, lambda h: h):
        torch.testing.assert_close(lm(ids), logits)


# ---------------------------------------------------------------------------------------- splice
@pytest.mark.parametrize("arch", ["gemma2", "gpt2"])
def test_splice_identity_and_zeros(tiny_models: dict[str, nn.Module], arch: str) -> None:
    model = tiny_models[arch]
    ids = _ids()
    with torch.inference_mode():
        clean = model(input_ids=ids).logits
        with splice_resid_post(model, 1, lambda h: h):
            same = model(input_ids=ids).logits
        with splice_resid_post(model, 1, torch.zeros_like):
            zeroed = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert (zeroed - clean).abs().max() > 1e-3
    torch.testing.assert_close(after, clean, rtol=0, atol=0)  # hook removed on exit


def test_splice_is_seen_by_capture_and_hidden_states(tiny_models: dict[str, nn.Module]) -> None:
    model = tiny_models["gemma2"]
    ids = _ids()
    h = capture_resid_post(model, 1, ids)
    with torch.inference_mode(), splice_resid_post(model, 1, lambda x: 2 * x):
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(capture_resid_post(model, 1, ids), 2 * h)
    torch.testing.assert_close(hs[2], 2 * h)


def test_splice_removed_on_exception(tiny_models: dict[str, nn.Module]) -> None:
    model = tiny_models["gemma2"]
    before = _n_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with splice_resid_post(model, 2, torch.zeros_like):
            assert _n_hooks(model)[2] == before[2] + 1
            raise RuntimeError("boom")
    assert _n_hooks(model) == before


# ---------------------------------------------------------------------------------------- configs
def test_config_helpers() -> None:
    from transformers import Gemma2Config, GPT2Config

    assert lm_hidden_size(Gemma2Config(hidden_size=2304, num_hidden_layers=26)) == 2304
    assert n_layers(Gemma2Config(hidden_size=2304, num_hidden_layers=26)) == 26
    assert lm_hidden_size(GPT2Config(n_embd=48, n_layer=5)) == 48
    assert n_layers(GPT2Config(n_embd=48, n_layer=5)) == 5
    with pytest.raises(ValueError, match="hidden size"):
        lm_hidden_size(object())


# ---------------------------------------------------------------------------------------- tiny_lm
def test_tiny_lm_loads(tmp_path_factory: pytest.TempPathFactory) -> None:
    from transformers import AutoConfig, AutoTokenizer

    path = tiny_lm_dir(tmp_path_factory, "gemma2")
    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("The cell binds the membrane.").input_ids
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in tok("x", add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "The cell binds the membrane."
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, n_layers(config), lm_hidden_size(config)) == ("gemma2", 4, 64)
    assert config.vocab_size == len(tok) <= 512
    docs = [json.loads(line)["text"] for line in (path / "corpus.jsonl").read_text().splitlines()]
    assert len(docs) == 300 and all(docs)


def test_tiny_lm_deterministic(tmp_path) -> None:
    a = build_tiny_lm(tmp_path / "a", arch="llama", seed=1, n_layers=2)
    argv = [
        "example",
        "tiny-lm",
        "--out",
        str(tmp_path / "b"),
        "--arch",
        "llama",
        "--seed",
        "1",
        "--n-layers",
        "2",
    ]
    assert mtsae_cli.main(argv) == 0
    b = tmp_path / "b"
    c = build_tiny_lm(tmp_path / "c", arch="llama", seed=2, n_layers=2)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="unknown arch"):
        build_tiny_lm(tmp_path / "d", arch="bert")
