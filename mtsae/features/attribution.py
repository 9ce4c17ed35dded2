"""Context attribution of an MTSAE feature at one token: how much of it comes from earlier tokens.

The encoder is linear up to the activation: ``pre_i(t) = sum_s c_si(t) + b_enc[i]`` with ``c_si`` the
contribution of dilation branch ``s`` (``concat``: ``z_s(t) . W_enc[s-block, i]``; ``mix``:
``z_s(t) . W_enc[:, i] / S``). Each branch output splits into the part the token itself gives and the
part its earlier tokens give, ``z_s(t) = z_s^self(t) + z_s^ctx(t)``, where ``z_s^self(t)`` is the branch
output with every earlier token removed (the sequence cut to position ``t`` alone; for side-by-side
branches this is the tap at offset 0 times ``u_t``, for a cascade the product of the offset-0 taps).
So ``pre_i(t) = sum_s (self_si + ctx_si) + b_enc[i]`` exactly, and:

- ``context_share = sum_s |ctx_si| / sum_s (|self_si| + |ctx_si|)``: the share of the pre-activation's
  (absolute) contributions that comes from the context taps, 0 for a feature that reads the token
  alone, 1 for one that reads only earlier tokens;
- ``ablated``: the feature's activation at ``t`` with the earlier tokens removed (context ablated), i.e.
  the activation of ``sum_s self_s + b_enc`` (the whole code vector goes through the activation, so
  top-k activations compete as they would).

A per-token SAE (``dilations=[]``) has no context: :func:`context_attribution` returns ``None``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ContextAttribution", "context_attribution"]


class ContextAttribution(NamedTuple):
    """Context attribution of ``N`` (example, feature) pairs, each at one position."""

    self_part: Tensor
    """``[N, S]`` contribution of branch ``s`` from the token itself (tap at offset 0)"""
    context: Tensor
    """``[N, S]`` contribution of branch ``s`` from the earlier tokens (its context taps)"""
    bias: Tensor
    """``[N]`` ``b_enc`` of the feature"""
    pre: Tensor
    """``[N]`` the pre-activation (``= self_part.sum(1) + context.sum(1) + bias``)"""
    act: Tensor
    """``[N]`` the activation with the context"""
    ablated: Tensor
    """``[N]`` the activation with every earlier token removed"""

    @property
    def context_share(self) -> Tensor:
        """``[N]``: ``sum_s |ctx| / sum_s (|self| + |ctx|)`` (0 where both are 0)."""
        ctx = self.context.abs().sum(1)
        total = ctx + self.self_part.abs().sum(1)
        return torch.where(total > 0, ctx / total.clamp_min(1e-30), torch.zeros_like(total))


def _feature_columns(sae, features: Tensor) -> Tensor:
    """``[N, S, d_in]``: the encoder weights that read each branch output for each feature."""
    W = sae.W_enc[:, features].t()  # [N, rows of W_enc]
    S, d = sae.n_scales, sae.d_in
    if sae.encoder == "mix":  # the branch mean: every branch is read by W_enc / S
        return (W / S).unsqueeze(1).expand(-1, S, d)
    return W.reshape(-1, S, d)


@torch.no_grad()
def context_attribution(
    sae, x_NTD: Tensor, valid_NT: Tensor | None, pos: Tensor, features: Tensor
) -> ContextAttribution | None:
    """Attribution of feature ``features[n]`` at position ``pos[n]`` of sequence ``x_NTD[n]``.

    Args:
        sae: an :class:`mtsae.MTSAE` (a per-token SAE gives ``None``).
        x_NTD: ``[N, T, d_in]`` activation sequences (raw, as the SAE reads them).
        valid_NT: ``[N, T]`` valid mask (invalid positions are zero in the encoder input) or ``None``.
        pos: ``[N]`` position of each example.
        features: ``[N]`` feature of each example.
    """
    if not sae.dilations:
        return None
    N = x_NTD.shape[0]
    pos, features = pos.long().to(x_NTD.device), features.long().to(x_NTD.device)
    if pos.shape != (N,) or features.shape != (N,):
        raise ValueError(f"pos and features must be [{N}], got {tuple(pos.shape)}, {tuple(features.shape)}")
    x = x_NTD.to(sae.W_enc.dtype)
    u = sae.encoder_input(x, valid_NT)  # [N, T, d]
    n = torch.arange(N, device=x.device)
    z = sae.scale_branches(u)[n, pos]  # [N, S, d]: with the context
    z_self = sae.scale_branches(u[n, pos].unsqueeze(1))[:, 0]  # [N, S, d]: the token alone
    W = _feature_columns(sae, features)  # [N, S, d]
    self_part = (z_self * W).sum(-1)
    context = ((z - z_self) * W).sum(-1)
    f_ctx, pre_ctx = sae.codes_from_branches(z.unsqueeze(1))  # [N, 1, d_sae]
    f_abl, _ = sae.codes_from_branches(z_self.unsqueeze(1))
    return ContextAttribution(
        self_part=self_part,
        context=context,
        bias=sae.b_enc[features],
        pre=pre_ctx[n, 0, features],
        act=f_ctx[n, 0, features],
        ablated=f_abl[n, 0, features],
    )
