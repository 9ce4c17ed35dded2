"""The Multi-Scale Temporal Sparse Autoencoder (a plain ``nn.Module``; it knows nothing about Lightning).

Encoder: ``u = x - b_dec`` (zero at invalid positions), one causal depth-wise dilated ``Conv1d`` per
dilation (kernel 3, left padding only, so position ``t`` sees ``t, t-r, t-2r``), the branch outputs
concatenated and mapped by ``W_enc`` to ``d_sae`` pre-activations, then a sparsifying activation
(``encoder="concat"``, ``W_enc: [n_scales * d_in, d_sae]``). With ``encoder="mix"`` the branch outputs are
averaged instead, which is one causal depth-wise kernel over the union of the branches' taps, before a
single ``[d_in, d_sae]`` ``W_enc``: the encoder matmul costs what a per-token SAE's does.
Decoder: per token and linear, ``x_hat = f @ W_dec + b_dec`` with unit-norm rows of ``W_dec``.

With ``dilations=[]`` the encoder is ``(x - b_dec) @ W_enc + b_enc``: the ordinary per-token SAE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtsae.sae.activations import Activation, make_activation
from mtsae.sae.positions import check_max_norm_multiple, ordinary_positions

__all__ = ["MTSAE", "ForwardOutput", "KERNEL_SIZE", "ENCODERS", "conv1d_scale_branches"]

KERNEL_SIZE = 3
ENCODERS = ("concat", "mix")


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    """reconstruction ``[B, T, d_in]``"""
    f: Tensor
    """feature codes ``[B, T, d_sae]`` (zero at invalid positions)"""
    pre: Tensor
    """pre-activations ``[B, T, d_sae]`` (used by AuxK and JumpReLU losses)"""
    z_scales: Tensor | None
    """per-dilation branch outputs ``[B, T, n_scales, d_in]``; ``None`` for a per-token SAE"""


class MTSAE(nn.Module):
    """Multi-scale temporal SAE.

    Args:
        d_in: width of the activations (the residual stream).
        d_sae: number of features (dictionary size).
        dilations: one causal depth-wise conv branch per entry; ``[]`` gives a per-token SAE.
        activation: ``relu`` (L1), ``topk``, ``batchtopk`` or ``jumprelu`` (see :mod:`mtsae.sae.activations`).
        activation_kwargs: options of the activation (``k`` for top-k variants, ...).
        cascade: if False (default), every branch convolves ``u`` itself, so with the default
            dilations position ``t`` sees ``t - 2·max(r) .. t`` (17 tokens). If True, branch ``s``
            convolves the output of branch ``s - 1`` (a WaveNet-style stack), so the last branch sees
            ``1 + 2·sum(r)`` tokens (31 with the default). Both start as the identity.
        encoder: how the branches reach ``W_enc``. ``concat`` (default): side by side, ``W_enc`` is
            ``[n_scales * d_in, d_sae]`` and every feature weighs every scale separately. ``mix``: the
            mean of the branches (equivalently one causal depth-wise kernel; see :meth:`mix_kernel`)
            times one ``[d_in, d_sae]`` ``W_enc``, so the encoder matmul is ``n_scales`` times cheaper;
            the per-branch outputs are still returned (``z_scales``) for the ``scales`` separation loss.
            Both start equal to the per-token SAE with ``W_enc = W_dec^T``.
        context_init_std: standard deviation of the Gaussian noise added at initialisation to the
            context taps (offsets ``-r``, ``-2r``) of every branch; the tap at offset 0 stays 1. Exactly
            equal branches give every cosine-based separation loss a zero gradient; this small
            perturbation breaks the tie. It is drawn from torch's global generator after every other
            parameter, so it is seeded by ``seed_everything`` and leaves the other initial weights
            unchanged. With the default 0.01 the untrained MTSAE's pre-activations differ from those of
            the equivalent per-token SAE by about 1% (``tests/sae/test_model.py``); 0 gives the exact identity.
        max_norm_multiple: the activation-sink rule (:mod:`mtsae.sae.positions`): a valid position whose
            norm exceeds this multiple of the batch's median valid norm is treated as invalid by every
            consumer (:meth:`valid_positions`). ``None`` (default): off. Saved with the SAE
            (:meth:`config`), so every consumer of a checkpoint or exported folder applies the same rule.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        dilations: Sequence[int] = (1, 2, 4, 8),
        activation: str = "relu",
        activation_kwargs: dict | None = None,
        cascade: bool = False,
        encoder: str = "concat",
        context_init_std: float = 0.01,
        max_norm_multiple: float | None = None,
    ) -> None:
        super().__init__()
        self.max_norm_multiple = check_max_norm_multiple(max_norm_multiple)
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if context_init_std < 0:
            raise ValueError(f"context_init_std must be non-negative, got {context_init_std}")
        if d_in <= 0 or d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}")
        dilations = [int(r) for r in dilations]
        if any(r < 1 for r in dilations):
            raise ValueError(f"dilations must be positive integers, got {dilations}")
        if len(set(dilations)) != len(dilations):
            raise ValueError(f"dilations must be distinct, got {dilations}")
        self.d_in, self.d_sae, self.dilations = d_in, d_sae, dilations
        self.cascade, self.encoder = cascade, encoder
        self.activation_name = activation
        self.activation_kwargs = dict(activation_kwargs or {})
        n_blocks = len(dilations) if dilations and encoder == "concat" else 1

        # conv_weight[s, c, k]: tap k of channel c in scale s; k = KERNEL_SIZE-1 is offset 0 (the token
        # itself), k = KERNEL_SIZE-2 is offset -r, ... Identity initialisation: tap at offset 0 = 1.
        conv = torch.zeros(len(dilations), d_in, KERNEL_SIZE)
        conv[:, :, -1] = 1.0
        # a per-token SAE has no conv branch: an empty, frozen parameter (an unused trainable one breaks DDP)
        self.conv_weight = nn.Parameter(conv, requires_grad=bool(dilations))

        W_dec = torch.randn(d_sae, d_in)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # every dilation block starts as W_dec^T, so the untrained MTSAE equals a per-token SAE whose
        # W_enc is n_scales * block (scaled down to keep the pre-activation magnitude of one block);
        # with the mix encoder the branch mean is u at initialisation, and W_enc = W_dec^T
        self.W_enc = nn.Parameter(W_dec.t().repeat(n_blocks, 1).clone() / n_blocks)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.act: Activation = make_activation(activation, d_sae, **self.activation_kwargs)
        self.context_init_std = float(context_init_std)
        if dilations and context_init_std > 0:  # drawn last: the other initial weights do not change
            noise = torch.randn(len(dilations), d_in, KERNEL_SIZE - 1) * context_init_std
            with torch.no_grad():
                self.conv_weight[:, :, :-1] += noise

    # ------------------------------------------------------------------ encoder
    @property
    def n_scales(self) -> int:
        return len(self.dilations)

    @property
    def receptive_field(self) -> int:
        """Number of tokens (the current one included) that the encoder sees."""
        if not self.dilations:
            return 1
        return 1 + (KERNEL_SIZE - 1) * (sum(self.dilations) if self.cascade else max(self.dilations))

    def scale_branches(self, u_BTD: Tensor) -> Tensor:
        """Causal depth-wise dilated convolutions: ``[B, T, d_in] -> [B, T, n_scales, d_in]``.

        Written as shifted multiply-adds along time (equal to ``F.conv1d(groups=d_in)`` with left
        padding; ``bench/bench_conv.py`` compares the two), which avoids transposes and is faster.
        """
        T = u_BTD.shape[1]
        outs = []
        for s, r in enumerate(self.dilations):
            inp = outs[-1] if (self.cascade and outs) else u_BTD
            w_DK = self.conv_weight[s].to(inp.dtype)  # [d_in, K]
            acc = inp * w_DK[:, -1]  # offset 0: the token itself
            for k in range(KERNEL_SIZE - 1):
                lag = (KERNEL_SIZE - 1 - k) * r  # tap k looks `lag` tokens back
                if lag < T:  # left padding only: causal
                    acc = acc + F.pad(inp[:, : T - lag], (0, 0, lag, 0)) * w_DK[:, k]
            outs.append(acc)
        return torch.stack(outs, dim=2)  # [B, T, S, d_in]

    def context_contributions(self, u_BTD: Tensor, z_BTSD: Tensor) -> Tensor:
        """What each branch adds from earlier tokens: ``z_s - centre_tap_s * input_s``, ``[B, T, S, d_in]``.

        ``u_BTD`` is the branches' input (:meth:`encoder_input`), ``z_BTSD`` their outputs
        (:meth:`scale_branches`); a branch's input is ``u``, or in a cascade the previous branch's
        output. The result is the branch's context taps applied to earlier tokens (zero where there
        are none), without the copy of the token itself that every branch output holds. Used by the
        ``context_decorr`` separation loss.
        """
        if not self.dilations:
            raise ValueError("a per-token SAE (dilations=[]) has no context contributions")
        inputs = [u_BTD, *z_BTSD.unbind(2)[:-1]] if self.cascade else [u_BTD] * self.n_scales
        centre = self.conv_weight[:, :, -1].to(z_BTSD.dtype)  # [S, d_in]: the tap at offset 0
        return z_BTSD - torch.stack(inputs, dim=2) * centre

    def mix_kernel(self) -> Tensor:
        """The single causal depth-wise kernel ``[d_in, 1 + 2·max(r)]`` of the ``mix`` encoder.

        Tap ``j`` multiplies the input ``L - 1 - j`` tokens back (``L`` the kernel length, so the last tap
        is the token itself), as in ``F.conv1d`` with ``L - 1`` zeros of left padding. Side-by-side
        branches only: a cascade composes its branches, which is not a sum of their taps.
        """
        if self.cascade or not self.dilations:
            raise ValueError("mix_kernel needs side-by-side dilation branches (cascade=False, dilations set)")
        L = 1 + (KERNEL_SIZE - 1) * max(self.dilations)
        kernel = self.conv_weight.new_zeros(self.d_in, L)
        for s, r in enumerate(self.dilations):
            for k in range(KERNEL_SIZE):
                kernel[:, L - 1 - (KERNEL_SIZE - 1 - k) * r] += self.conv_weight[s, :, k]
        return kernel / self.n_scales

    def valid_positions(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """``valid`` without the activation sinks of ``x`` under :attr:`max_norm_multiple` (all of ``valid``
        when it is ``None``); see :func:`mtsae.sae.positions.ordinary_positions`."""
        return ordinary_positions(x, valid, self.max_norm_multiple)

    def encoder_input(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """``u = x - b_dec``, zero at invalid positions: ``[B, T, d_in]``, the input of the branches."""
        u = x - self.b_dec.to(x.dtype)
        if valid is not None:
            # invalid positions (BOS...) must not leak; a select, not a product: 0 * inf would be NaN
            u = torch.where(valid.unsqueeze(-1).bool(), u, u.new_zeros(()))
        return u

    def codes_from_branches(self, z: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(f, pre)`` from the branch outputs ``z: [B, T, S, d_in]`` (per-token SAE: ``u [B, T, d_in]``).

        Per token: position ``t`` of the output depends on position ``t`` of ``z`` only, so a streaming
        encoder (:mod:`mtsae.sae.streaming`) can compute the branches over a window and call this on the
        new positions.
        """
        if not self.dilations:
            flat = z  # per-token SAE: u [B, T, d_in]
        elif self.encoder == "mix":
            flat = z.mean(2)  # [B, T, d_in]: one causal depth-wise kernel (mix_kernel)
        else:
            flat = z.flatten(2)  # [B, T, S·d_in]
        pre = flat @ self.W_enc.to(z.dtype) + self.b_enc.to(z.dtype)
        return self.act(pre, valid), pre

    def _encode(self, x: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        squeeze = x.dim() == 2
        if squeeze and self.dilations and x.shape[0] > 1:
            raise ValueError(
                f"an MTSAE encodes sequences, but got a 2-D input {tuple(x.shape)}: one sequence of "
                f"{x.shape[0]} tokens, or tokens of several sequences flattened together (which the "
                f"convolutions would mix)? Pass [B, T, {self.d_in}]: x[None] for one sequence, "
                f"x.view(B, T, {self.d_in}) for B flattened sequences of T tokens. Per-token SAEs "
                f"(dilations=[]) take [N, {self.d_in}]."
            )
        if squeeze:
            x = x.unsqueeze(0)
            valid = None if valid is None else valid.unsqueeze(0)
        if x.dim() != 3 or x.shape[-1] != self.d_in:
            raise ValueError(
                f"expected activations [B, T, {self.d_in}] or [T, {self.d_in}], got {tuple(x.shape)}"
            )
        if valid is not None and valid.shape != x.shape[:2]:
            raise ValueError(
                f"valid mask {tuple(valid.shape)} does not match activations {tuple(x.shape[:2])}"
            )
        u = self.encoder_input(x, valid)  # [B, T, d_in]
        z = self.scale_branches(u) if self.dilations else None  # [B, T, S, d_in]
        f, pre = self.codes_from_branches(u if z is None else z, valid)
        if squeeze:
            f, pre = f.squeeze(0), pre.squeeze(0)
            z = None if z is None else z.squeeze(0)
        return f, pre, z

    def encode(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """Feature codes of ``x``: ``[B, T, d_in]`` (rows are sequences in order) -> ``[B, T, d_sae]``.

        A 2-D input is unambiguous only for a per-token SAE (``[N, d_in]`` tokens) or a single token;
        an MTSAE refuses any other 2-D input (one sequence, or flattened tokens of many?).
        """
        return self._encode(x, valid)[0]

    # ------------------------------------------------------------------ decoder
    def decode(self, f: Tensor) -> Tensor:
        """``x_hat = f @ W_dec + b_dec`` (per token)."""
        return f @ self.W_dec.to(f.dtype) + self.b_dec.to(f.dtype)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> ForwardOutput:
        f, pre, z = self._encode(x, valid)
        return ForwardOutput(x_hat=self.decode(f), f=f, pre=pre, z_scales=z)

    # ------------------------------------------------------------------ decoder norm constraint
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Renormalise the rows of ``W_dec`` to unit norm (after each optimizer step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from ``W_dec.grad`` the component parallel to each row (before each optimizer step)."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        g.sub_((g * w).sum(dim=1, keepdim=True) * w)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def fold_input_scale_(self, c: float) -> None:
        """Make an SAE trained on ``c * x`` act on raw ``x`` (decoder rows stay unit norm).

        With ``x_s = c x``: ``pre_s = conv(x_s - b_dec) W_enc + b_enc``. Dividing ``b_dec`` and ``b_enc``
        by ``c`` (and thresholds, via :meth:`Activation.fold_scale`) gives ``pre = pre_s / c``,
        ``f = f_s / c`` and ``x_hat = x_hat_s / c``.
        """
        self.b_dec.div_(c)
        self.b_enc.div_(c)
        self.act.fold_scale(c)

    def config(self) -> dict:
        """The constructor arguments (saved beside exported weights)."""
        return {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dilations": list(self.dilations),
            "activation": self.activation_name,
            "activation_kwargs": dict(self.activation_kwargs),
            "cascade": self.cascade,
            "encoder": self.encoder,
            "max_norm_multiple": self.max_norm_multiple,
        }


def conv1d_scale_branches(sae: MTSAE, u_BTD: Tensor) -> Tensor:
    """Reference for :meth:`MTSAE.scale_branches` (side-by-side branches) written with ``F.conv1d``.

    Used by the tests and ``bench/bench_conv.py`` to check and time the shifted multiply-adds.
    """
    if sae.cascade:
        raise ValueError("the conv1d reference covers side-by-side branches only (cascade=False)")
    u_BDT = u_BTD.transpose(1, 2)
    outs = []
    for s, r in enumerate(sae.dilations):
        padded = F.pad(u_BDT, ((KERNEL_SIZE - 1) * r, 0))  # left padding only: causal
        outs.append(F.conv1d(padded, sae.conv_weight[s].unsqueeze(1), dilation=r, groups=sae.d_in))
    return torch.stack(outs, dim=-1).permute(0, 2, 3, 1)  # [B, T, S, d_in]
