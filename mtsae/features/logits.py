"""What a feature writes into a language model's output: its decoder direction through the unembedding.

The logit effect of feature ``i`` is ``W_U'^T w_i`` for its unit decoder row ``w_i`` (the direct path
from the residual stream to the logits), computed as sae_vis does on a TransformerLens model loaded
with ``fold_ln=True, center_writing_weights=True, center_unembed=True`` (its default):

- the final norm's elementwise gain ``g`` is folded into the unembedding, ``W_U' = diag(g) W_U``; its
  division by the token's RMS (or standard deviation) is a positive scalar per token and is left out:
  it scales every logit of a token alike and changes no ranking. The gain is read from the module
  itself, ``g = norm(1)`` for an RMSNorm (so Gemma's ``1 + weight`` convention needs no special case);
  a ``LayerNorm`` uses its ``weight``, and the direction is centred first (the norm subtracts the mean);
  the norm's bias adds the same vector to every token's logits and is left out;
- the logits are centred over the vocabulary (``center_unembed``: a constant added to every logit does
  not change the softmax);
- Gemma's final logit soft-capping is monotone and left out.

The ``top`` tokens are the most promoted (largest effect), the ``bottom`` the most suppressed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["LogitEffects", "final_norm", "folded_unembedding", "logit_effects"]

#: attribute paths of the final norm, by architecture family (as in :mod:`mtsae.lm.hooks`)
_NORM_PATHS = ("model.norm", "gpt_neox.final_layer_norm", "transformer.ln_f", "model.final_layernorm")


class LogitEffects(NamedTuple):
    top_ids: Tensor
    """``[F, k]`` most promoted token ids, descending"""
    top_values: Tensor
    """``[F, k]`` their (centred) logit effects"""
    bottom_ids: Tensor
    """``[F, k]`` most suppressed token ids, most negative first"""
    bottom_values: Tensor
    """``[F, k]``"""


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last residual stream before the unembedding (``ValueError`` if unknown)."""
    for path in _NORM_PATHS:
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module):
            return obj
    raise ValueError(
        f"cannot find the final norm of {type(model).__name__} (looked for {', '.join(_NORM_PATHS)})"
    )


@torch.no_grad()
def folded_unembedding(model: nn.Module) -> tuple[Tensor, bool]:
    """``(W_U' [d_model, vocab], centre_input)``: the unembedding with the final norm's gain folded in.

    ``centre_input`` is True for a LayerNorm (the direction must be centred before ``W_U'``).
    """
    W_U = model.get_output_embeddings().weight.detach().float().t()  # [d_model, vocab]
    norm = final_norm(model)
    d = W_U.shape[0]
    if isinstance(norm, nn.LayerNorm):
        gain = norm.weight.detach().float() if norm.weight is not None else torch.ones(d)
        return gain.to(W_U.device).unsqueeze(1) * W_U, True
    ones = torch.ones(1, d, dtype=next(norm.parameters()).dtype, device=W_U.device)
    gain = norm(ones).float().flatten()  # RMSNorm of a vector of ones: its gain (eps aside)
    return gain.unsqueeze(1) * W_U, False


@torch.no_grad()
def logit_effects(model: nn.Module, W_dec: Tensor, k: int = 10, chunk: int = 1024) -> LogitEffects:
    """Most promoted and suppressed tokens of each decoder row ``W_dec [F, d_model]`` (chunks of rows)."""
    W_U, centre = folded_unembedding(model)
    if W_dec.shape[1] != W_U.shape[0]:
        raise ValueError(
            f"decoder rows have width {W_dec.shape[1]}, the model's residual stream {W_U.shape[0]}"
        )
    k = min(k, W_U.shape[1])
    outs: list[list[Tensor]] = [[], [], [], []]
    for lo in range(0, W_dec.shape[0], chunk):
        w = W_dec[lo : lo + chunk].detach().float().to(W_U.device)
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if centre:
            w = w - w.mean(dim=1, keepdim=True)
        logits = w @ W_U  # [chunk, vocab]
        logits = logits - logits.mean(dim=1, keepdim=True)
        top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        for out, t in zip(outs, (top.indices, top.values, bottom.indices, bottom.values), strict=True):
            out.append(t.cpu())
    return LogitEffects(*(torch.cat(o) for o in outs))
