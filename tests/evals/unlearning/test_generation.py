"""The clamp inside Hugging Face ``generate`` with the KV cache (mtsae.evals.unlearning.intervention.GenerationClamp)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mtsae.evals.unlearning.intervention import ClampIntervention, GenerationClamp, clamped
from mtsae.evals.unlearning.recipe import RecipeError, UnlearningRecipe, sae_sha256
from mtsae.lm.hooks import capture_resid_post
from mtsae.sae.model import MTSAE
from mtsae.sae.positions import ordinary_positions
from tests.helpers.lm import tiny_lm_dir

LAYER = 1


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_lm_dir(tmp_path_factory)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return model, tok


def prompts(tok) -> dict[str, torch.Tensor]:
    texts = ["The cell binds the membrane", "A virus crosses", "My cat looks at the blue house again"]
    return tok(texts, return_tensors="pt", padding=True)


def sae_and_features(
    model, batch, dilations: list[int], cascade: bool = False, max_norm_multiple: float | None = None
) -> tuple[MTSAE, list[int]]:
    """An SAE with non-identity convolutions and the 6 features that fire most on the prompts."""
    sae = MTSAE(64, 128, dilations=dilations, cascade=cascade, max_norm_multiple=max_norm_multiple).eval()
    with torch.no_grad():
        if dilations:
            sae.conv_weight.copy_(torch.randn_like(sae.conv_weight) * 0.5)
        h = capture_resid_post(model, LAYER, batch["input_ids"], batch["attention_mask"])
        f = sae.encode(h, batch["attention_mask"].bool())
    feats = (f > 0).float().sum((0, 1)).topk(6).indices.tolist()
    return sae, feats


@contextlib.contextmanager
def position_sinks(
    model, on: bool = True, positions: tuple[int, ...] = (10, 12), scale: float = 100.0
) -> Iterator[None]:
    """Activation sinks in the tiny LM: the residual stream entering decoder layer 0 scaled by ``scale`` at
    the ``positions`` (position ids, so generated tokens of every prompt row, two of them at the same step
    for :func:`prompts`), far above the median norm at every later layer, in cached and uncached forwards
    alike."""
    if not on:
        yield
        return
    from mtsae.lm.hooks import decoder_layers

    def hook(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sink = torch.isin(kwargs["position_ids"], torch.tensor(positions))  # [B, T]
        h = args[0] if args else kwargs.pop("hidden_states")
        h = h * torch.where(sink, scale, 1.0)[..., None].to(h.dtype)
        return (h, *args[1:]), kwargs

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def generate(model, batch, tok, use_cache: bool, n: int = 8):
    out = model.generate(
        **batch,
        max_new_tokens=n,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=tok.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences, torch.stack(out.logits, dim=1)  # [B, T0 + n], [B, n, V]


@pytest.mark.parametrize(
    ("dilations", "cascade"), [([1, 2, 4], False), ([3, 5], False), ([1, 2], True), ([], False)]
)
@pytest.mark.parametrize("rule", ["saebench", "special_tokens"])
@pytest.mark.parametrize(("max_norm_multiple", "n_rows"), [(None, 3), (3.0, 3), (3.0, 1)])
def test_cached_and_uncached_generation_agree(
    lm, dilations: list[int], cascade: bool, rule: str, max_norm_multiple: float | None, n_rows: int
) -> None:
    """With the activation-sink rule on, the LM writes sinks (:func:`position_sinks`) and a decode step's one
    new token per row is compared against the median of the sequences so far, as uncached (the median
    of the new tokens alone is a sink's own norm when there is one row)."""
    model, tok = lm
    batch = {k: v[:n_rows] for k, v in prompts(tok).items()}
    with position_sinks(model, on=max_norm_multiple is not None):
        _check_cached_and_uncached_agree(model, tok, batch, dilations, cascade, rule, max_norm_multiple)


def _check_cached_and_uncached_agree(
    model, tok, batch, dilations: list[int], cascade: bool, rule: str, max_norm_multiple: float | None
) -> None:
    sae, feats = sae_and_features(model, batch, dilations, cascade, max_norm_multiple)
    special = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    plain_seq, plain_logits = generate(model, batch, tok, use_cache=True)
    clamp = GenerationClamp(model, LAYER, sae, feats, 20.0, rule, special)
    with clamp:
        seq_c, logits_c = generate(model, batch, tok, use_cache=True)
        seq_u, logits_u = generate(model, batch, tok, use_cache=False)
    assert clamp.stream.n_seen == 0  # reset on exit
    assert torch.equal(seq_c, seq_u)
    torch.testing.assert_close(logits_c, logits_u, atol=1e-4, rtol=1e-4)
    assert (logits_c - plain_logits).abs().max() > 0.1  # the clamp acts
    # every step equals the clamp on the whole generated sequence in one forward
    mask = torch.cat([batch["attention_mask"], torch.ones_like(seq_c[:, batch["input_ids"].shape[1] :])], 1)
    iv = ClampIntervention(model, LAYER, sae, feats, 20.0, special, position_rule=rule)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad(), iv(seq_c, mask):
        full = model(input_ids=seq_c, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    n = logits_c.shape[1]
    torch.testing.assert_close(logits_c, full[:, -n - 1 : -1], atol=1e-4, rtol=1e-4)
    assert not torch.equal(plain_seq, seq_c) or (logits_c - plain_logits).abs().max() > 0.1
    if max_norm_multiple is not None:  # the rule leaves out generated tokens
        h = capture_resid_post(model, LAYER, seq_c, mask)
        assert (~ordinary_positions(h, mask.bool(), max_norm_multiple)[:, -n:]).any()


def test_the_hooks_are_removed_and_misuse_is_reported(lm) -> None:
    model, tok = lm
    batch = prompts(tok)
    sae, feats = sae_and_features(model, batch, [1, 2])
    layer = model.model.layers[LAYER]
    n_hooks = (len(model._forward_pre_hooks), len(model._forward_hooks), len(layer._forward_hooks))
    clamp = GenerationClamp(model, LAYER, sae, feats, 20.0, "saebench")
    with clamp:
        assert len(layer._forward_hooks) == n_hooks[2] + 1
        with torch.no_grad():  # a cache made outside the clamp cannot be continued
            past = model(**prompts(tok), use_cache=True).past_key_values
        clamp.stream.reset()
        nxt = torch.full((3, 1), 5)
        mask = torch.cat([batch["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
        with pytest.raises(RuntimeError, match="KV cache holds"), torch.no_grad():
            model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True)
        with pytest.raises(RuntimeError, match="backbone"), torch.no_grad():
            model.model(**batch)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks), len(layer._forward_hooks)) == n_hooks
    with pytest.raises(ValueError, match="position rule"):
        GenerationClamp(model, LAYER, sae, feats, 20.0, "first")
    with pytest.raises(ValueError, match="out of range"):
        GenerationClamp(model, 9, sae, feats, 20.0)


def test_clamped_applies_a_recipe_file(lm, tmp_path: Path) -> None:
    from mtsae import save_sae

    model, tok = lm
    batch = prompts(tok)
    sae, feats = sae_and_features(model, batch, [1, 2, 4])
    save_sae(sae, tmp_path / "sae")
    recipe = UnlearningRecipe(
        sae_path="sae",
        sae_sha256=sae_sha256(tmp_path / "sae"),
        layer=LAYER,
        features=feats,
        multiplier=20.0,
        special_ids=[tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
    )
    path = recipe.save(tmp_path / "recipe.json")
    with GenerationClamp(model, LAYER, sae, feats, 20.0, "saebench"):
        want, _ = generate(model, batch, tok, use_cache=True)
    with clamped(model, None, str(path)):  # the SAE is loaded from the recipe's folder
        got, _ = generate(model, batch, tok, use_cache=True)
    assert torch.equal(got, want)
    assert UnlearningRecipe.load(path) == recipe
    # a changed SAE file is refused
    (tmp_path / "sae" / "config.json").write_text((tmp_path / "sae" / "config.json").read_text() + " ")
    with pytest.raises(RecipeError, match="SHA-256"):
        clamped(model, None, path)
    with pytest.raises(RecipeError, match="does not exist"):
        UnlearningRecipe.load(tmp_path / "missing.json")
    with pytest.raises(RecipeError, match="at least one feature"):
        UnlearningRecipe(sae_path="sae", sae_sha256="0", layer=1, features=[], multiplier=1.0)


def test_generation_clamp_leaves_activation_sinks_alone(lm) -> None:
    """``max_norm_multiple`` (docs/design.md §3): the positions the rule drops are not clamped. A multiple
    just above 1 drops the prompt tokens above the median norm of the forward's valid positions."""
    from mtsae.evals.unlearning.intervention import intervention_mask
    from mtsae.lm.hooks import decoder_layers
    from mtsae.sae.positions import ordinary_positions

    model, tok = lm
    batch = prompts(tok)
    special = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    sae = MTSAE(64, 8, dilations=[1, 2], max_norm_multiple=1.05).eval()
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(1.0)  # every feature fires at every position the SAE reads
    h = capture_resid_post(model, LAYER, batch["input_ids"], batch["attention_mask"])
    valid = intervention_mask(batch["input_ids"], batch["attention_mask"], "special_tokens", special)
    kept = ordinary_positions(h, valid, 1.05)
    assert 0 < int(kept.sum()) < int(valid.sum())
    seen: list[torch.Tensor] = []
    handle = decoder_layers(model)[LAYER].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with GenerationClamp(model, LAYER, sae, [0, 1], 20.0, "special_tokens", special), torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    changed = (seen[0] != h).any(-1)
    assert torch.equal(changed, kept)
