"""Streaming encoding: an MTSAE fed a sequence a few positions at a time, as inside ``generate``.

An MTSAE's encoder is causal with a finite receptive field ``R`` (:attr:`mtsae.MTSAE.receptive_field`):
the code at position ``t`` depends on the encoder inputs at ``t - R + 1 .. t`` only. So a state holding
each sequence's last ``R - 1`` encoder inputs ``u = (x - b_dec)·valid`` is all a decode step needs: the
branches are computed over that window plus the new positions, and only the new positions go through
``W_enc``. Each step costs O(R), not O(sequence), and the codes equal those of the full-sequence encoding
(positions before the start of a row, and left padding marked invalid, are zeros in both).

A per-token SAE (``dilations=[]``, ``R = 1``) keeps no state: its codes pass straight through
``sae.encode``.

The state is written against the model's public pieces (:meth:`mtsae.MTSAE.encoder_input`,
:meth:`~mtsae.MTSAE.scale_branches`, :meth:`~mtsae.MTSAE.codes_from_branches`), so any encoder that
computes per-position branch outputs from a causal window streams the same way; the state checks this
once when it is made (a few positions encoded both ways) and refuses an encoder that does not.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["StreamingEncoder"]


class StreamingEncoder:
    """Encoder state for one batch of sequences fed in order (prefill, then one token per step).

    Args:
        sae: the SAE (:class:`mtsae.MTSAE`, or any module with ``encode(x, valid)``, which then passes
            straight through as a per-token SAE). Use it in eval mode: a training-mode BatchTopK
            couples the positions of a batch.
    """

    def __init__(self, sae: nn.Module) -> None:
        self.sae = sae
        rf = int(getattr(sae, "receptive_field", 1))
        self.streams = rf > 1 and hasattr(sae, "scale_branches") and hasattr(sae, "codes_from_branches")
        self.context = rf - 1 if self.streams else 0
        """number of earlier positions kept per sequence (``receptive_field - 1``)"""
        self.buffer: Tensor | None = None  # [B, context, d_in]: the last encoder inputs u
        self.n_seen = 0
        """positions encoded since the last :meth:`reset`"""
        if self.streams:
            self._check_against_full_encoding()

    @torch.no_grad()
    def _check_against_full_encoding(self) -> None:
        """Fail at once if this encoder's pre-activations are not per-position functions of its branch
        outputs (an encoder variant whose :meth:`~mtsae.MTSAE.codes_from_branches` does not cover it)."""
        p = next(self.sae.parameters())
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 2 * self.context + 3, self.sae.d_in, generator=g).to(p.device, p.dtype)
        full = self.sae(x).pre  # pre-activations: no top-k ties to flip under round-off
        cut = self.context + 1
        streamed = torch.cat([self._step(x[:, :cut], None)[1], self._step(x[:, cut:], None)[1]], dim=1)
        self.reset()
        tol = 2e-2 if p.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if not torch.allclose(streamed, full, atol=tol * (1 + float(full.abs().max())), rtol=tol):
            raise RuntimeError(
                f"{type(self.sae).__name__}: the streaming encoding differs from the full-sequence one: its "
                "encoder must compute the pre-activations per position from scale_branches() outputs "
                "through codes_from_branches()"
            )

    def reset(self) -> None:
        """Forget every sequence (the next :meth:`step` starts new ones)."""
        self.buffer, self.n_seen = None, 0

    def step(self, x_BTD: Tensor, valid_BT: Tensor | None = None) -> Tensor:
        """Codes ``[B, T, d_sae]`` of the next ``T`` positions ``x_BTD`` of every sequence.

        ``valid_BT`` (bool, default all True) marks positions that are encoded; invalid ones (BOS, PAD)
        get zero codes and are zeros in the context of later positions, as in the full-sequence
        encoding. The batch size must stay the same until :meth:`reset`.
        """
        if x_BTD.dim() != 3:
            raise ValueError(f"expected activations [B, T, d_in], got {tuple(x_BTD.shape)}")
        if valid_BT is not None and valid_BT.shape != x_BTD.shape[:2]:
            raise ValueError(
                f"valid mask {tuple(valid_BT.shape)} does not match activations {tuple(x_BTD.shape[:2])}"
            )
        return self._step(x_BTD, valid_BT)[0]

    def _step(self, x_BTD: Tensor, valid_BT: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(f, pre)`` of the next positions (``pre`` is ``None`` for a per-token SAE)."""
        B, T = x_BTD.shape[:2]
        if self.buffer is not None and self.buffer.shape[0] != B:
            raise ValueError(
                f"the stream holds {self.buffer.shape[0]} sequences but this step has {B}: reset() first"
            )
        self.n_seen += T
        if not self.streams:
            return self.sae.encode(x_BTD, valid_BT), None
        u = self.sae.encoder_input(x_BTD, valid_BT)  # [B, T, d_in]
        if self.buffer is None:
            self.buffer = u.new_zeros(B, self.context, u.shape[-1])  # before the start: zeros
        window = torch.cat([self.buffer.to(u.dtype), u], dim=1)  # [B, context + T, d_in]
        z = self.sae.scale_branches(window)[:, -T:]  # [B, T, S, d_in]: exact, the window covers R
        self.buffer = window[:, window.shape[1] - self.context :]
        return self.sae.codes_from_branches(z, valid_BT)
