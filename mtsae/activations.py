"""Sparsifying activations: the map from encoder pre-activations to feature codes.

Every activation is an ``nn.Module`` with the signature ``forward(pre, valid=None) -> f`` where
``pre`` is ``[..., d_sae]`` and ``valid`` (optional) is a boolean mask over the leading dims. Positions
that are not valid get ``f = 0``. Activations are positively homogeneous in ``pre`` once their
thresholds are rescaled, which is what :meth:`Activation.fold_scale` does when an SAE trained on scaled
inputs is exported to act on raw activations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Activation", "ReLU", "ACTIVATIONS", "make_activation"]


class Activation(nn.Module):
    """Base class. Subclasses implement :meth:`forward`; thresholds (if any) live in buffers/params."""

    #: whether the training objective should add an L1 penalty on the codes (ReLU SAEs do)
    uses_l1: bool = False

    def forward(self, pre: Tensor, valid: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def fold_scale(self, c: float) -> None:
        """Adapt to pre-activations divided by ``c`` (inputs scaled by ``1/c``). No-op by default."""

    @staticmethod
    def _mask(f: Tensor, valid: Tensor | None) -> Tensor:
        return f if valid is None else f * valid.unsqueeze(-1).to(f.dtype)


class ReLU(Activation):
    """``f = relu(pre)``, trained with an L1 penalty (Bricken et al. 2023, "Towards Monosemanticity")."""

    uses_l1 = True

    def forward(self, pre: Tensor, valid: Tensor | None = None) -> Tensor:
        return self._mask(torch.relu(pre), valid)


#: name -> class; the names are what users type in YAML (``activation: relu``)
ACTIVATIONS: dict[str, type[Activation]] = {"relu": ReLU}


def make_activation(name: str, d_sae: int, **kwargs) -> Activation:
    """Build the activation called ``name`` for ``d_sae`` features; ``kwargs`` are its options."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    cls = ACTIVATIONS[name]
    if cls is ReLU:
        if kwargs:
            raise ValueError(f"activation 'relu' takes no options, got {sorted(kwargs)}")
        return ReLU()
    return cls(d_sae=d_sae, **kwargs)
