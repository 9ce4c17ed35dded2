"""SAEBench-style unlearning with SAE features (Farrell et al. 2024), as pure building blocks.

The method (see ``docs/saebench_unlearning.md`` for the SAEBench source it follows):

1. :func:`feature_sparsity` / :class:`SparsityAccumulator`: for every feature, the fraction of valid
   tokens (BOS/EOS/PAD excluded) on which it fires (``f > 0``), on a forget corpus (WMDP bio) and a
   retain corpus (wikitext);
2. :func:`select_features`: drop features whose retain sparsity is ``>= retain_threshold``, rank the rest
   by forget sparsity (descending) and keep the first ``n`` (features that never fire on the forget
   corpus are never selected);
3. :func:`clamp_intervention`: at layer ``L``, every selected feature that fires at a valid position is
   clamped to ``-multiplier``; the SAE error term is preserved, so
   ``x' = x + sum_{i in S, f_i > 0} (-m - f_i) W_dec[i]``;
4. multiple-choice scoring (:mod:`mtsae.evals.unlearning.mcq`) of WMDP-bio and four MMLU subsets under the intervention;
5. :class:`GridConfig` and :func:`unlearning_score`: ``1 - min`` WMDP accuracy over the grid points whose
   pooled MMLU accuracy is ``>= 0.99``.

Using the result: :class:`GenerationClamp` (or :func:`clamped` with an unlearning recipe, see
:mod:`mtsae.evals.unlearning.recipe`) applies the clamp in every forward of a Hugging Face causal LM, including
``generate`` with its KV cache, where an MTSAE encodes each new token from a streaming state
(:mod:`mtsae.sae.streaming`). :data:`POSITION_RULES` names which positions may change: SAEBench's (all but
position 0) or this project's (all but BOS/EOS/PAD tokens).

Also here: :class:`ClampIntervention`, which applies the clamp inside a Hugging Face causal LM through
:func:`mtsae.lm.hooks.splice_resid_post`. Steps 1, 2 and 5 live in :mod:`mtsae.evals.sparsity` and
:mod:`mtsae.evals.unlearning.selection`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtsae.lm.hooks import splice_resid_post
from mtsae.sae.positions import norm_median, sae_valid_positions, valid_norms

__all__ = [
    "ClampIntervention",
    "GenerationClamp",
    "POSITION_RULES",
    "clamp_intervention",
    "clamped",
    "intervention_mask",
    "valid_token_mask",
]


def clamp_intervention(
    x: Tensor,
    sae: nn.Module,
    features: Tensor | Sequence[int],
    multiplier: float,
    valid: Tensor | None = None,
) -> Tensor:
    """Clamp the selected features to ``-multiplier`` wherever they fire, keeping the SAE error term.

    ``x' = x + sum_{i in S, f_i > 0} (-m - f_i) W_dec[i]``, which equals
    ``decode(f_clamped) + (x - decode(f))`` (SAEBench's ``anthropic_clamp_resid_SAE_features``).
    Positions where no selected feature fires, and invalid positions (BOS/EOS/PAD, and the activation
    sinks of the SAE's ``max_norm_multiple``, :mod:`mtsae.sae.positions`; the codes are zero there), are
    returned unchanged. For an MTSAE the encoder sees the whole sequence ``x`` as the model
    produced it (the clamp at earlier positions does not feed back into later codes).

    Args:
        x: residual stream ``[B, T, d_in]`` (or ``[T, d_in]``), any dtype; the SAE runs in its own dtype.
        sae: an SAE with ``encode(x, valid)`` and ``W_dec [d_sae, d_in]`` (e.g. :class:`mtsae.MTSAE`).
        features: indices ``S`` of the features to clamp.
        multiplier: ``m`` (the clamp value is ``-m``).
        valid: ``[B, T]`` (or ``[T]``) bool, False at BOS/EOS/PAD. ``None``: all valid.

    Returns:
        ``x'`` with the shape and dtype of ``x``.
    """
    W_dec = sae.W_dec  # [d_sae, d_in]
    feats = _check_features(features, W_dec)
    if feats.numel() == 0:
        return x
    squeeze = x.dim() == 2
    x_BTD = x.unsqueeze(0) if squeeze else x
    if valid is not None:
        valid = (valid.unsqueeze(0) if squeeze else valid).to(device=W_dec.device, dtype=torch.bool)
    with torch.no_grad():
        xs = x_BTD.to(device=W_dec.device, dtype=W_dec.dtype)
        if getattr(sae, "max_norm_multiple", None) is not None:
            valid = sae_valid_positions(sae, xs, valid)
        out = _apply_clamp(x_BTD, sae.encode(xs, valid), W_dec, feats, multiplier, valid)
    return out.squeeze(0) if squeeze else out


def _check_features(features: Tensor | Sequence[int], W_dec: Tensor) -> Tensor:
    feats = torch.as_tensor(features, dtype=torch.long, device=W_dec.device).flatten()
    if feats.numel() and (int(feats.min()) < 0 or int(feats.max()) >= W_dec.shape[0]):
        raise ValueError(f"feature indices must lie in [0, {W_dec.shape[0]}), got {feats.tolist()}")
    return feats


def _apply_clamp(
    x_BTD: Tensor, f: Tensor, W_dec: Tensor, feats: Tensor, multiplier: float, valid: Tensor | None
) -> Tensor:
    """``x + sum_{i in S, f_i > 0} (-m - f_i) W_dec[i]`` from the codes ``f [B, T, d_sae]`` of ``x``."""
    f_S = f[..., feats]  # [B, T, |S|]
    active = f_S > 0
    if valid is not None:
        active &= valid.unsqueeze(-1)
    coef = torch.where(active, -float(multiplier) - f_S, torch.zeros_like(f_S))  # [B, T, |S|]
    delta = coef @ W_dec[feats]  # [B, T, d_in]
    touched = active.any(-1, keepdim=True).to(x_BTD.device)  # [B, T, 1]
    delta = delta.to(device=x_BTD.device, dtype=x_BTD.dtype)
    return torch.where(touched, x_BTD + delta, x_BTD)


def valid_token_mask(
    input_ids: Tensor, attention_mask: Tensor | None, special_ids: Sequence[int | None]
) -> Tensor:
    """``[B, T]`` bool: attended and not one of ``special_ids`` (BOS/EOS/PAD; ``None`` entries ignored)."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for tok in {t for t in special_ids if t is not None}:
        valid = valid & (input_ids != tok)
    return valid


#: which positions the clamp may change (and the encoder sees), by name
POSITION_RULES: dict[str, str] = {
    "saebench": "every attended position except the first of each row (SAEBench zeroes the codes at "
    "position 0, whatever its token)",
    "special_tokens": "every attended position whose token is not BOS, EOS or PAD (this project's rule: "
    "also skips EOS inside a prompt and works for tokenizers without BOS)",
}


def intervention_mask(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    rule: str,
    special_ids: Sequence[int | None] = (),
    n_past: int = 0,
) -> Tensor:
    """``[B, T]`` bool: the positions of ``input_ids [B, T]`` that the clamp may change under ``rule``.

    Args:
        input_ids: the tokens of this forward (``T`` new positions after ``n_past`` cached ones).
        attention_mask: ``[B, n_past + T]`` (``None``: everything attended).
        rule: a key of :data:`POSITION_RULES`.
        special_ids: BOS/EOS/PAD ids (rule ``special_tokens``).
        n_past: positions already processed (KV cache length).
    """
    if rule not in POSITION_RULES:
        raise ValueError(f"unknown position rule {rule!r}; use one of {sorted(POSITION_RULES)}")
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, n_past + T, dtype=torch.bool, device=input_ids.device)
    if attention_mask.shape != (B, n_past + T):
        raise ValueError(
            f"attention mask {tuple(attention_mask.shape)} does not cover {n_past} past + {T} new positions"
        )
    attended_full = attention_mask.bool()
    attended = attended_full[:, n_past:]
    if rule == "special_tokens":
        return valid_token_mask(input_ids, attended, special_ids)
    first = attended_full.int().argmax(dim=1)  # [B]: first attended position (left padding before it)
    pos = torch.arange(n_past, n_past + T, device=input_ids.device)
    return attended & (pos[None, :] != first[:, None])


@dataclass
class ClampIntervention:
    """Context-manager factory applying :func:`clamp_intervention` at decoder layer ``layer`` of a HF LM.

    ``ClampIntervention(...)(input_ids, attention_mask)`` returns a context manager (built on
    :func:`mtsae.lm.hooks.splice_resid_post`) that, during the forwards inside it, replaces the hidden state
    after layer ``layer`` by the clamped one, with the valid mask computed from this batch's tokens.
    This is the ``intervention`` argument of :func:`mtsae.evals.unlearning.mcq.score_mcq`.
    """

    model: nn.Module
    """the Hugging Face causal LM"""
    layer: int
    """decoder layer whose output (``resid_post``) is modified"""
    sae: nn.Module
    """the SAE trained on that layer's output (acting on raw activations)"""
    features: Tensor | Sequence[int]
    """features to clamp (from :func:`select_features`)"""
    multiplier: float
    """clamp value is ``-multiplier``"""
    special_ids: Sequence[int | None] = ()
    """token ids treated as invalid (BOS, EOS, PAD): never modified (rule ``special_tokens``)"""
    position_rule: str = "special_tokens"
    """which positions may change: a key of :data:`POSITION_RULES` (``saebench``: all but position 0)"""

    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> contextlib.AbstractContextManager:
        valid = intervention_mask(input_ids, attention_mask, self.position_rule, self.special_ids)

        def fn(h: Tensor) -> Tensor:  # [B, T, d]
            return clamp_intervention(h, self.sae, self.features, self.multiplier, valid.to(h.device))

        return splice_resid_post(self.model, self.layer, fn)


class GenerationClamp:
    """The clamp inside every forward of a Hugging Face causal LM, ``generate`` with its KV cache included.

    A forward pre-hook on ``model`` reads each call's ``input_ids``, ``attention_mask`` and cache length;
    a forward hook on decoder layer ``layer`` clamps its output. A call without past positions (a plain
    forward, the prefill of ``generate``, every step of ``generate(use_cache=False)``) starts new
    sequences; a call with past positions continues them through a :class:`mtsae.sae.streaming.StreamingEncoder`,
    so an MTSAE encodes each new token with exactly the context it has in the full sequence, at O(receptive
    field) per step. Cached and uncached generation therefore clamp the same values. With the SAE's
    activation-sink rule (``max_norm_multiple``), a new token is compared against the median norm of the
    valid positions of every sequence so far (the clamp keeps the norms it has seen), as the uncached
    step whose last position it is compares it; a position already in the cache keeps the mask it had
    when it was new.

    Use it as a context manager (or :func:`clamped`). Greedy and sampled generation are supported; beam
    search reorders the cache between steps, which the encoder state does not follow (not supported).

    Args:
        model: the causal LM (call this module, not its backbone, so the token ids are seen).
        layer: decoder layer whose output (resid_post) is clamped.
        sae: SAE on that layer's raw activations (``encode``, ``W_dec``; an MTSAE streams).
        features: features to clamp.
        multiplier: clamp value is ``-multiplier``.
        position_rule: a key of :data:`POSITION_RULES`.
        special_ids: BOS/EOS/PAD ids (rule ``special_tokens``).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int,
        sae: nn.Module,
        features: Tensor | Sequence[int],
        multiplier: float,
        position_rule: str = "special_tokens",
        special_ids: Sequence[int | None] = (),
    ) -> None:
        from mtsae.lm.hooks import _check_layer, decoder_layers
        from mtsae.sae.streaming import StreamingEncoder

        if position_rule not in POSITION_RULES:
            raise ValueError(f"unknown position rule {position_rule!r}; use one of {sorted(POSITION_RULES)}")
        self.layers = decoder_layers(model)
        _check_layer(layer, len(self.layers), model)
        self.model, self.layer, self.sae = model, layer, sae
        self.features = _check_features(features, sae.W_dec)
        self.multiplier = float(multiplier)
        self.position_rule = position_rule
        self.special_ids = [int(i) for i in special_ids if i is not None]
        self.stream = StreamingEncoder(sae)
        self._call: tuple[Tensor, Tensor | None, int] | None = None  # (input_ids, attention_mask, n_past)
        self._handles: list[Any] = []
        self._norms: Tensor | None = None  # [B, n_seen] norms for the sink rule, NaN where not valid

    # ------------------------------------------------------------------ hooks
    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError(
                "the clamp needs input_ids (inputs_embeds alone do not say which tokens to skip)"
            )
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # renamed `cache` in transformers 5
        if mask is not None and mask.dim() == 2:
            n_past = mask.shape[1] - ids.shape[1]
        elif cache is not None and hasattr(cache, "get_seq_length"):
            n_past, mask = int(cache.get_seq_length()), None
        else:
            n_past, mask = 0, None
        self._call = (ids, mask, n_past)

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._call = None

    def _layer(self, module: nn.Module, args: Any, output: Tensor | tuple) -> Tensor | tuple:
        h = output[0] if isinstance(output, tuple) else output  # [B, T, d]
        out = self.clamp(h)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    @torch.no_grad()
    def clamp(self, h: Tensor) -> Tensor:
        """The clamped hidden state of the current call (``h: [B, T, d]``, the layer's output)."""
        if self._call is None:
            raise RuntimeError(
                "decoder layer ran outside a forward of the model given to the clamp: call that model "
                "(its generate or forward), not its backbone"
            )
        ids, mask, n_past = self._call
        if ids.shape != h.shape[:2]:
            raise RuntimeError(f"input_ids {tuple(ids.shape)} do not match hidden states {tuple(h.shape)}")
        if n_past == 0:
            self._reset()
        elif self.stream.n_seen != n_past:
            raise RuntimeError(
                f"the KV cache holds {n_past} positions but the clamp has encoded {self.stream.n_seen}: a "
                "cache made outside the clamp (or reordered by beam search) cannot be continued; generate "
                "inside the `with` block from the prompt"
            )
        W_dec = self.sae.W_dec
        valid = intervention_mask(ids, mask, self.position_rule, self.special_ids, n_past).to(W_dec.device)
        x = h.to(device=W_dec.device, dtype=W_dec.dtype)  # [B, T, d]
        # activation sinks: the median is over the valid positions of the sequences so far (a decode
        # step's x holds one new token per row, whose own norm would be its median)
        median = None
        if getattr(self.sae, "max_norm_multiple", None) is not None:
            norms = valid_norms(x, valid)  # [B, T]
            self._norms = norms if n_past == 0 else torch.cat([self._norms, norms], dim=1)
            median = norm_median(self._norms)
        valid = sae_valid_positions(self.sae, x, valid, median)
        f = self.stream.step(x, valid)  # [B, T, d_sae]
        return _apply_clamp(h, f, W_dec, self.features, self.multiplier, valid)

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> GenerationClamp:
        if self._handles:
            raise RuntimeError("this clamp is already active")
        self._reset()
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post, with_kwargs=True, always_call=True),
            self.layers[self.layer].register_forward_hook(self._layer, prepend=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._call = [], None
        self._reset()

    def _reset(self) -> None:
        """Forget the sequences seen so far (the encoder's state and the norms of the sink rule)."""
        self.stream.reset()
        self._norms = None


def clamped(
    model: nn.Module,
    sae: nn.Module | None,
    recipe: Any,
    special_ids: Sequence[int | None] | None = None,
) -> GenerationClamp:
    """``with clamped(model, sae, recipe): model.generate(...)``: apply an unlearning recipe to ``model``.

    Args:
        model: the Hugging Face causal LM.
        sae: the recipe's SAE, or ``None`` to load it from the recipe's path (its hash is checked).
        recipe: a :class:`mtsae.evals.unlearning.recipe.UnlearningRecipe` or the path of its JSON file.
        special_ids: BOS/EOS/PAD ids for the ``special_tokens`` rule (default: the recipe's).

    Returns:
        A :class:`GenerationClamp` (a context manager). With ``recipe.sae_in_model_dtype`` (SAEBench),
        the SAE runs in the model's dtype (on a copy when ``sae`` is given).
    """
    import copy

    from mtsae.evals.unlearning.recipe import UnlearningRecipe

    if not isinstance(recipe, UnlearningRecipe):
        recipe = UnlearningRecipe.load(recipe)
    param = next(model.parameters())
    if sae is None:
        sae = recipe.load_sae(param.device)
    elif recipe.sae_in_model_dtype and sae.W_dec.dtype != param.dtype:
        sae = copy.deepcopy(sae)
    if recipe.sae_in_model_dtype:
        sae = sae.to(dtype=param.dtype)
    ids = recipe.special_ids if special_ids is None else special_ids
    return GenerationClamp(
        model, recipe.layer, sae.eval(), recipe.features, recipe.multiplier, recipe.position_rule, ids
    )
