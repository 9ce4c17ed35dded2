"""Training losses (docs/design.md §4). All of them average over *valid* tokens only.

Shapes: ``x, x_hat [B, T, d_in]``, ``f [B, T, d_sae]``, ``z [B, T, S, d_in]``, ``valid [B, T]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SEPARATION_KINDS",
    "recon_loss",
    "fvu",
    "l1_sparsity",
    "scales_separation",
    "scales_decorrelation",
    "context_decorrelation",
    "decoder_separation",
    "codes_separation",
]

SEPARATION_KINDS = ("none", "scales", "scales_decorr", "context_decorr", "decoder", "codes")
#: kinds that compare the per-dilation branches (they need at least two dilations)
SCALE_KINDS = ("scales", "scales_decorr", "context_decorr")


def _valid_rows(t: Tensor, valid: Tensor | None) -> Tensor:
    """Flatten ``[B, T, ...]`` to ``[N, ...]`` keeping the valid tokens."""
    return t.flatten(0, 1) if valid is None else t[valid]


def recon_loss(x: Tensor, x_hat: Tensor, valid: Tensor | None) -> Tensor:
    """Mean over valid tokens of ``||x - x_hat||^2`` (summed over ``d_in``)."""
    return _valid_rows((x - x_hat).pow(2).sum(-1), valid).mean()


def fvu(x: Tensor, x_hat: Tensor, valid: Tensor | None) -> Tensor:
    """Fraction of variance unexplained: ``recon_loss / mean ||x - mean(x)||^2`` over valid tokens."""
    xv = _valid_rows(x, valid).float()
    err = (xv - _valid_rows(x_hat, valid).float()).pow(2).sum(-1).mean()
    var = (xv - xv.mean(0)).pow(2).sum(-1).mean()
    return err / var.clamp_min(1e-12)


def l1_sparsity(f: Tensor, valid: Tensor | None) -> Tensor:
    """Mean over valid tokens of ``||f||_1`` (decoder rows have unit norm, so no weighting)."""
    return _valid_rows(f.abs().sum(-1), valid).mean()


def _mean_offdiag_relu_cos(v: Tensor) -> Tensor:
    """``v [N, S, d]`` -> mean over tokens and pairs ``i != j`` of ``relu(cos(v_i, v_j))``."""
    u = F.normalize(v, dim=-1, eps=1e-8)
    cos = u @ u.transpose(-1, -2)  # [N, S, S]
    S = v.shape[1]
    off = ~torch.eye(S, dtype=torch.bool, device=v.device)
    return torch.relu(cos[:, off]).mean()


def scales_separation(z: Tensor, valid: Tensor | None) -> Tensor:
    """Per valid token, the mean over scale pairs ``i != j`` of ``relu(cos(z_i, z_j))``; averaged.

    ``z`` holds the per-dilation branch outputs. Pushes the scales to carry different information.
    The gradient reaches the convolution weights (and ``b_dec`` through ``u = x - b_dec``) only.
    """
    if z.shape[2] < 2:
        raise ValueError("the 'scales' separation loss needs at least two dilations")
    return _mean_offdiag_relu_cos(_valid_rows(z, valid))


def _mean_offdiag_cos_sq(v: Tensor) -> Tensor:
    """``v [N, S, d]`` -> mean over tokens and pairs ``i != j`` of ``cos(v_i, v_j)^2``."""
    u = F.normalize(v, dim=-1, eps=1e-8)
    cos = u @ u.transpose(-1, -2)  # [N, S, S]
    off = ~torch.eye(v.shape[1], dtype=torch.bool, device=v.device)
    return cos[:, off].pow(2).mean()


def scales_decorrelation(z: Tensor, valid: Tensor | None) -> Tensor:
    """Per valid token, the mean over scale pairs ``i != j`` of ``cos(z_i, z_j)^2``; averaged.

    The decorrelation form of :func:`scales_separation`: ``relu(cos)`` is met by flipping the sign of a
    branch (which ``W_enc`` undoes at no cost), ``cos^2`` is not, since it is zero only for orthogonal
    branch outputs. Like ``relu(cos)`` it has a zero gradient when branches are exactly equal, which is
    why :class:`mtsae.MTSAE` perturbs the context taps at initialisation (``context_init_std``).
    """
    if z.shape[2] < 2:
        raise ValueError("the 'scales_decorr' separation loss needs at least two dilations")
    return _mean_offdiag_cos_sq(_valid_rows(z, valid))


def context_decorrelation(c: Tensor, valid: Tensor | None) -> Tensor:
    """Per valid token, the mean over scale pairs ``i != j`` of ``cos(c_i, c_j)^2``; averaged.

    ``c [B, T, S, d_in]`` holds what each branch adds from earlier tokens, its *context contribution*
    ``conv_r(u) - centre_tap_r * u`` (:meth:`mtsae.MTSAE.context_contributions`). The branch outputs
    ``z_r`` all contain ``u`` itself through the centre tap, so their cosine is about 1 whatever the
    context taps do, and :func:`scales_separation` / :func:`scales_decorrelation` barely move them; the
    contributions hold no copy of ``u``, so this loss acts on them from the first step. ``cos^2`` rather
    than ``relu(cos)``: anti-parallel contributions carry the same information as parallel ones. Tokens
    whose contributions are zero (the first token of a row, with no earlier token) add 0.
    """
    if c.shape[2] < 2:
        raise ValueError("the 'context_decorr' separation loss needs at least two dilations")
    return _mean_offdiag_cos_sq(_valid_rows(c, valid))


def _generator_like(t: Tensor, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=t.device).manual_seed(seed)


def decoder_separation(
    W_dec: Tensor, f: Tensor, valid: Tensor | None, max_pairs: int = 4096, seed: int | None = None
) -> Tensor:
    """Mean ``relu(cos(W_dec[i], W_dec[j]))`` over co-active feature pairs, sampled at bounded cost.

    For each of at most ``max_pairs`` valid tokens with two or more active features (all of them when
    there are fewer), one pair ``i != j`` of its active features is drawn uniformly. Activity is read
    from ``f`` without gradient, so the loss only moves the decoder: it discourages features that fire
    together from pointing the same way (duplicates). Cost ``O(max_pairs * (d_sae + d_in))``.
    """
    fv = _valid_rows(f, valid).detach()  # [N, d_sae]
    active = fv > 0
    fv = fv[active.sum(-1) >= 2]
    active = active[active.sum(-1) >= 2]
    if fv.shape[0] == 0:
        return W_dec.sum() * 0.0
    gen = _generator_like(fv, seed)
    if fv.shape[0] > max_pairs:
        keep = torch.randperm(fv.shape[0], generator=gen, device=fv.device)[:max_pairs]
        active = active[keep]
    # two distinct active features per token: the two largest random keys among the active ones
    keys = torch.rand(active.shape, generator=gen, device=active.device).masked_fill(~active, -1.0)
    ij = keys.topk(2, dim=-1).indices  # [P, 2]
    w = F.normalize(W_dec, dim=-1, eps=1e-8)
    cos = (w[ij[:, 0]] * w[ij[:, 1]]).sum(-1)
    return torch.relu(cos).mean()


def codes_separation(
    f: Tensor, valid: Tensor | None, max_tokens: int = 1024, seed: int | None = None
) -> Tensor:
    """Mean over tokens of the max cosine between a token's code and another token's code.

    At most ``max_tokens`` valid tokens are used (a uniform sample), so the cost is bounded by
    ``max_tokens^2 * d_sae``. Tokens with an all-zero code have cosine 0 with everything.
    """
    fv = _valid_rows(f, valid)
    n = fv.shape[0]
    if n < 2:
        return f.sum() * 0.0
    if n > max_tokens:
        keep = torch.randperm(n, generator=_generator_like(fv, seed), device=fv.device)[:max_tokens]
        fv = fv[keep]
        n = max_tokens
    u = F.normalize(fv.float(), dim=-1, eps=1e-8)
    cos = (u @ u.t()).masked_fill(torch.eye(n, dtype=torch.bool, device=u.device), float("-inf"))
    return cos.max(dim=-1).values.mean()
