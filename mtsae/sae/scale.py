"""The activation scale: the one place where an SAE trained on ``c * x`` meets raw activations ``x``.

Training multiplies inputs by a constant ``c = sqrt(d_in / E||x||^2)`` (:func:`input_scale`, from the
cache's ``mean_sq_norm``), so that ``E||c x||^2 = d_in`` whatever the model and layer
(``docs/design.md``, "Activation scaling"). :class:`ScaledSAE` is the SAE seen from raw activations:
it scales inputs (:meth:`~ScaledSAE.scale`), unscales outputs (:meth:`~ScaledSAE.unscale`), and
:meth:`~ScaledSAE.folded` writes ``c`` into a copy of the weights (what export saves). The view and the
folded copy compute the same thing: ``pre = pre_s / c``, ``f = f_s / c``, ``x_hat = x_hat_s / c``,
with the decoder rows unchanged (unit norm), so a clamp of ``-m`` means the same in both.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from mtsae.sae.model import MTSAE, ForwardOutput

__all__ = ["ScaledSAE", "input_scale"]


def input_scale(d_in: int, mean_sq_norm: float) -> float:
    """``c`` such that ``E||c x||^2 = d_in``, from ``mean_sq_norm = E||x||^2`` over valid tokens."""
    if not mean_sq_norm > 0:
        raise ValueError(f"mean_sq_norm must be positive to scale activations, got {mean_sq_norm}")
    return math.sqrt(d_in / mean_sq_norm)


class ScaledSAE(nn.Module):
    """An SAE trained on ``scale * x``, run on raw activations ``x``; no copy of the weights.

    Args:
        sae: the SAE as trained (on scaled inputs).
        scale: the input scale ``c``; a tensor is read live (``SAEModule.act_scale``), so the view stays
            right while training changes nothing but the weights.
    """

    def __init__(self, sae: MTSAE, scale: float | Tensor) -> None:
        super().__init__()
        self.sae = sae
        self._scale = scale

    @property
    def c(self) -> float:
        return float(self._scale)

    @property
    def W_dec(self) -> Tensor:
        """Decoder rows ``[d_sae, d_in]`` (unit norm; the same in raw units)."""
        return self.sae.W_dec

    @property
    def W_enc(self) -> Tensor:
        return self.sae.W_enc

    @property
    def d_sae(self) -> int:
        return self.sae.d_sae

    @property
    def max_norm_multiple(self) -> float | None:
        """The SAE's activation-sink rule (scale invariant: the same on raw activations)."""
        return self.sae.max_norm_multiple

    def valid_positions(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """:meth:`mtsae.MTSAE.valid_positions` of raw ``x``."""
        return self.sae.valid_positions(x, valid)

    def scale(self, x: Tensor) -> Tensor:
        """Raw activations to the SAE's input units."""
        return x * self._scale

    def unscale(self, y: Tensor) -> Tensor:
        """The SAE's outputs (reconstructions, codes) back to raw units."""
        return y / self._scale

    def encode(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """Codes of raw ``x`` (those of the folded SAE)."""
        return self.unscale(self.sae.encode(self.scale(x), valid))

    def decode(self, f: Tensor) -> Tensor:
        """Raw reconstruction from codes of :meth:`encode`."""
        return self.unscale(self.sae.decode(self.scale(f)))

    def forward(self, x: Tensor, valid: Tensor | None = None) -> ForwardOutput:
        out = self.sae(self.scale(x), valid)
        z = None if out.z_scales is None else self.unscale(out.z_scales)
        return ForwardOutput(self.unscale(out.x_hat), self.unscale(out.f), self.unscale(out.pre), z)

    @torch.no_grad()
    def folded(self) -> MTSAE:
        """A float32 CPU copy of the SAE with the scale folded into its weights (acts on raw ``x``)."""
        sae = copy.deepcopy(self.sae).float().cpu().eval()
        sae.fold_input_scale_(self.c)
        return sae
