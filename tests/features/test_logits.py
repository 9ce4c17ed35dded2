"""Promoted / suppressed tokens: the folded unembedding ranks tokens as the model's own final norm and
unembedding do on the decoder direction."""

from __future__ import annotations

import pytest
import torch

from mtsae.features.logits import final_norm, logit_effects


def _model(arch: str) -> torch.nn.Module:
    import transformers as tf

    small = dict(vocab_size=60, num_hidden_layers=1)
    if arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_head=2, **small))
    elif arch == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, **small
        )
        model = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.Gemma2Config(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            **small,
        )
        model = tf.Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # a gain far from 1 (and a LayerNorm bias), so folding it matters
        norm = final_norm(model)
        norm.weight.uniform_(-0.5, 2.0)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_(0, 1.0)
    return model.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_logit_effects_follow_the_models_norm_and_unembedding(arch: str) -> None:
    model = _model(arch)
    W_dec = torch.randn(7, 16)
    eff = logit_effects(model, W_dec, k=5, chunk=3)
    norm, head = final_norm(model), model.get_output_embeddings()
    with torch.no_grad():
        w = W_dec / W_dec.norm(dim=1, keepdim=True)
        # the direct path through the model's own modules; the norm's bias (norm(0)) is the same for
        # every token and is removed, and so is a constant over the vocabulary
        ref = head(norm(w) - norm(torch.zeros_like(w))).float()
        ref = ref - ref.mean(dim=1, keepdim=True)
    assert torch.equal(eff.top_ids, ref.topk(5, dim=1).indices)
    assert torch.equal(eff.bottom_ids, ref.topk(5, dim=1, largest=False).indices)
    # equal up to the per-direction 1/rms (or 1/std) scale of the norm, which is left out
    ratio = ref.gather(1, eff.top_ids) / eff.top_values
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-5)
    assert (ratio > 0).all()
    assert (eff.top_values[:, :-1] >= eff.top_values[:, 1:]).all()


def test_width_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="width"):
        logit_effects(_model("llama"), torch.randn(3, 8))
