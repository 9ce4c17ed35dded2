"""Sparsifying activations: the map from encoder pre-activations to feature codes.

Every activation is an ``nn.Module`` with the signature ``forward(pre, valid=None) -> f`` where
``pre`` is ``[..., d_sae]`` and ``valid`` (optional) is a boolean mask over the leading dims. Positions
that are not valid get ``f = 0``. Activations are positively homogeneous in ``pre`` once their
thresholds are rescaled, which is what :meth:`Activation.fold_scale` does when an SAE trained on scaled
inputs is exported to act on raw activations.

Which extra training terms an activation needs is told by three class flags, so the LightningModule
never has to switch on the class:

- ``uses_l1``: add ``λ · mean ‖f‖₁`` (ReLU SAEs);
- ``uses_l0``: add ``λ · act.l0_penalty(pre, valid)`` (JumpReLU);
- ``uses_auxk``: add the AuxK loss of :func:`mtsae.training.aux_losses.auxk_loss` (TopK and BatchTopK).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

__all__ = [
    "Activation",
    "ReLU",
    "TopK",
    "BatchTopK",
    "JumpReLU",
    "ACTIVATIONS",
    "make_activation",
]


class Activation(nn.Module):
    """Base class. Subclasses implement :meth:`forward`; thresholds (if any) live in buffers/params."""

    #: whether the training objective should add an L1 penalty on the codes (ReLU SAEs do)
    uses_l1: bool = False
    #: whether the training objective should add ``l0_penalty(pre, valid)`` (JumpReLU does)
    uses_l0: bool = False
    #: whether the training objective should add the AuxK dead-latent loss (top-k variants do)
    uses_auxk: bool = False

    def forward(self, pre: Tensor, valid: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def fold_scale(self, c: float) -> None:
        """Adapt to pre-activations divided by ``c`` (inputs scaled by ``1/c``). No-op by default."""

    @staticmethod
    def _mask(f: Tensor, valid: Tensor | None) -> Tensor:
        return f if valid is None else f * valid.unsqueeze(-1).to(f.dtype)

    @staticmethod
    def _check_valid(pre: Tensor, valid: Tensor | None) -> None:
        if valid is not None and valid.shape != pre.shape[:-1]:
            raise ValueError(
                f"valid mask {tuple(valid.shape)} does not match the leading dims of {tuple(pre.shape)}"
            )

    @staticmethod
    def _check_scale(c: float) -> None:
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"fold_scale needs a finite positive constant, got {c}")


def _check_k(k: int, d_sae: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 0 < k <= d_sae:
        raise ValueError(f"k must satisfy 0 < k <= d_sae={d_sae}, got k={k}")
    return k


def _check_d_sae(d_sae: int) -> int:
    if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae <= 0:
        raise ValueError(f"d_sae must be a positive integer, got {d_sae!r}")
    return d_sae


class ReLU(Activation):
    """``f = relu(pre)``, trained with an L1 penalty (Bricken et al. 2023, "Towards Monosemanticity")."""

    uses_l1 = True

    def forward(self, pre: Tensor, valid: Tensor | None = None) -> Tensor:
        return self._mask(torch.relu(pre), valid)


class TopK(Activation):
    """Keep the ``k`` largest pre-activations of each token (Gao et al. 2024, "Scaling and evaluating
    sparse autoencoders", arXiv:2406.04093): ``f = relu(TopK(pre))``.

    ReLU convention (as in the paper's ``z = ReLU(TopK(W_enc(x − b_pre)))`` and OpenAI's code): the
    top ``k`` are chosen among the raw pre-activations and then ReLU'd, so a token has exactly ``k``
    non-zeros when it has at least ``k`` positive pre-activations, and fewer otherwise (never a
    negative code). Ties are broken by :func:`torch.topk`. No threshold, so :meth:`fold_scale` is a
    no-op: top-k and ReLU commute with a positive scale.

    Args:
        d_sae: number of features.
        k: non-zeros per token, ``0 < k <= d_sae``.
    """

    uses_auxk = True

    def __init__(self, d_sae: int, k: int) -> None:
        super().__init__()
        self.d_sae = _check_d_sae(d_sae)
        self.k = _check_k(k, d_sae)

    def forward(self, pre: Tensor, valid: Tensor | None = None) -> Tensor:
        self._check_valid(pre, valid)
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)  # [..., k]
        f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        return self._mask(f, valid)

    def fold_scale(self, c: float) -> None:
        self._check_scale(c)

    def extra_repr(self) -> str:
        return f"d_sae={self.d_sae}, k={self.k}"


class BatchTopK(Activation):
    """Top ``k·N`` activations over a batch of ``N`` valid tokens (Bussmann et al. 2024, "BatchTopK
    Sparse Autoencoders", arXiv:2412.06410).

    Training mode: ``relu(pre)`` of the ``N`` valid tokens is flattened and its ``k·N`` largest
    entries are kept, so the *average* L0 is ``k`` while single tokens may use more or fewer latents
    (exactly ``k·N`` non-zeros per batch when at least ``k·N`` pre-activations are positive). Invalid
    tokens take no part and get 0. Each training forward also updates the inference threshold (buffer
    ``threshold``) by an exponential moving average of the batch statistic of the paper,
    ``θ = E_X[min{z_ij(X) | z_ij(X) > 0}]``, the smallest positive kept activation of the batch:
    ``θ ← m·θ + (1 − m)·min_kept`` (the first batch sets ``θ`` directly; as in the authors'
    dictionary_learning implementation, ``threshold < 0`` means "not estimated yet").

    Eval mode: a per-token JumpReLU with that threshold, ``f = relu(pre) · 1[pre > θ]``, which is
    ``pre · 1[pre > θ]`` once ``θ ≥ 0`` (before any training step, ``θ = −1`` and this is a plain
    ReLU). The output of a token then no longer depends on the rest of its batch.

    Args:
        d_sae: number of features.
        k: mean non-zeros per valid token in training, ``0 < k <= d_sae``.
        threshold_momentum: EMA momentum ``m`` of the threshold estimate, in ``[0, 1)``
            (dictionary_learning uses 0.999).
    """

    uses_auxk = True
    threshold: Tensor

    def __init__(self, d_sae: int, k: int, threshold_momentum: float = 0.999) -> None:
        super().__init__()
        self.d_sae = _check_d_sae(d_sae)
        self.k = _check_k(k, d_sae)
        if not 0.0 <= threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {threshold_momentum}")
        self.threshold_momentum = float(threshold_momentum)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def forward(self, pre: Tensor, valid: Tensor | None = None) -> Tensor:
        self._check_valid(pre, valid)
        if not self.training:
            f = torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
            return self._mask(f, valid)
        acts = self._mask(torch.relu(pre), valid)  # invalid tokens are 0: never among the kept > 0
        n_valid = pre[..., 0].numel() if valid is None else int(valid.sum())
        if n_valid == 0:
            return torch.zeros_like(pre)
        flat = acts.flatten()
        vals, idx = flat.topk(self.k * n_valid, sorted=False)
        self._update_threshold(vals)
        f = torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)
        return self._mask(f, valid)

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        positive = kept[kept > 0]
        if positive.numel() == 0:
            return  # nothing fired in this batch: no information about the threshold
        batch_min = positive.min().float()
        if self.threshold < 0:
            self.threshold.copy_(batch_min)
        else:
            self.threshold.lerp_(batch_min, 1.0 - self.threshold_momentum)

    @torch.no_grad()
    def fold_scale(self, c: float) -> None:
        self._check_scale(c)
        self.threshold.div_(c)  # an unset threshold (< 0) stays negative, i.e. unset

    def extra_repr(self) -> str:
        return f"d_sae={self.d_sae}, k={self.k}, threshold_momentum={self.threshold_momentum}"


# ---------------------------------------------------------------------- JumpReLU straight-through
def _rectangle(u: Tensor) -> Tensor:
    """Rectangle kernel ``K(u) = 1[-1/2 < u < 1/2]``."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to_threshold(g: Tensor, threshold: Tensor) -> Tensor:
    """Sum a ``[..., d_sae]`` gradient over its leading dims to the ``[d_sae]`` threshold."""
    return g.reshape(-1, g.shape[-1]).sum(0).to(threshold.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """``JumpReLU_θ(z) = z·H(z − θ)`` with the pseudo-derivatives of Rajamanoharan et al. 2024 (eq. 11):
    ``∂/∂z = H(z − θ)`` and ``∂/∂θ = −(θ/ε)·K((z − θ)/ε)``."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_thr = None
        if ctx.needs_input_grad[0]:
            grad_pre = grad_out * (pre > threshold).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            thr = threshold.float()
            pseudo = -(thr / eps) * _rectangle((pre.float() - thr) / eps)
            grad_thr = _sum_to_threshold(grad_out.float() * pseudo, threshold)
        return grad_pre, grad_thr, None


class _StepFn(torch.autograd.Function):
    """Heaviside ``H(z − θ)`` with the pseudo-derivatives of Rajamanoharan et al. 2024 (eq. 12):
    ``∂/∂z = 0`` and ``∂/∂θ = −(1/ε)·K((z − θ)/ε)``."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_thr = None  # ∂H/∂pre = 0: None is autograd's zero gradient
        if ctx.needs_input_grad[1]:
            thr = threshold.float()
            pseudo = -(1.0 / eps) * _rectangle((pre.float() - thr) / eps)
            grad_thr = _sum_to_threshold(grad_out.float() * pseudo, threshold)
        return grad_pre, grad_thr, None


class JumpReLU(Activation):
    """``f = pre · H(pre − θ)`` with a learned per-feature threshold ``θ > 0`` (Rajamanoharan et al.
    2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders",
    arXiv:2407.14435).

    ``θ = exp(log_threshold)`` (the parameter is ``log_threshold``, as in the paper's pseudo-code, so
    ``θ`` stays positive). The jump has no useful derivative, so training uses the paper's
    straight-through estimators with a rectangle kernel ``K`` of width ``ε = bandwidth``: the
    gradient reaches ``θ`` through the jump in ``f`` (``∂f/∂θ = −(θ/ε)K((pre − θ)/ε)``) and through
    the L0 penalty :meth:`l0_penalty` (``∂H/∂θ = −(1/ε)K((pre − θ)/ε)``); only pre-activations within
    ``ε/2`` of ``θ`` contribute. The encoder gets ``∂f/∂pre = H(pre − θ)`` and nothing from the L0
    term. Train with ``loss = recon + λ · l0_penalty(pre, valid)`` and no L1.

    ``bandwidth`` and ``init_threshold`` are in units of the (scaled) pre-activations, so they go
    with the input normalisation; the defaults are the paper's / Gemma Scope's 0.001.

    Args:
        d_sae: number of features.
        init_threshold: initial ``θ`` of every feature, ``> 0``.
        bandwidth: STE kernel width ``ε``, ``> 0``.
    """

    uses_l0 = True

    def __init__(self, d_sae: int, init_threshold: float = 0.001, bandwidth: float = 0.001) -> None:
        super().__init__()
        self.d_sae = _check_d_sae(d_sae)
        if not (math.isfinite(init_threshold) and init_threshold > 0):
            raise ValueError(f"init_threshold must be positive, got {init_threshold}")
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        self.bandwidth = float(bandwidth)
        self.init_threshold = float(init_threshold)
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))

    @property
    def threshold(self) -> Tensor:
        """``θ = exp(log_threshold)``, ``[d_sae]`` (differentiable)."""
        return self.log_threshold.exp()

    def forward(self, pre: Tensor, valid: Tensor | None = None) -> Tensor:
        self._check_valid(pre, valid)
        f = _JumpReLUFn.apply(pre, self.threshold, self.bandwidth)
        return self._mask(f, valid)

    def l0_penalty(self, pre: Tensor, valid: Tensor | None = None) -> Tensor:
        """Mean over valid tokens of ``Σ_i H(pre_i − θ_i)`` (the L0 of ``f``), differentiable in ``θ``
        through the STE; a float32 scalar (0 when no token is valid)."""
        self._check_valid(pre, valid)
        l0 = _StepFn.apply(pre, self.threshold, self.bandwidth).float().sum(-1)  # [...]
        if valid is None:
            return l0.mean()
        w = valid.to(l0.dtype)
        return (l0 * w).sum() / w.sum().clamp_min(1.0)

    @torch.no_grad()
    def fold_scale(self, c: float) -> None:
        self._check_scale(c)
        self.log_threshold.sub_(math.log(c))

    def extra_repr(self) -> str:
        return f"d_sae={self.d_sae}, bandwidth={self.bandwidth}"


#: name -> class; the names are what users type in YAML (``activation: relu``)
ACTIVATIONS: dict[str, type[Activation]] = {
    "relu": ReLU,
    "topk": TopK,
    "batchtopk": BatchTopK,
    "jumprelu": JumpReLU,
}


def make_activation(name: str, d_sae: int, **kwargs) -> Activation:
    """Build the activation called ``name`` for ``d_sae`` features; ``kwargs`` are its options.

    ``relu`` takes none; ``topk`` takes ``k``; ``batchtopk`` takes ``k`` and ``threshold_momentum``;
    ``jumprelu`` takes ``init_threshold`` and ``bandwidth``. Unknown names, unknown or missing options
    and out-of-range values raise ``ValueError``.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    cls = ACTIVATIONS[name]
    if cls is ReLU:
        if kwargs:
            raise ValueError(f"activation 'relu' takes no options, got {sorted(kwargs)}")
        return ReLU()
    params = inspect.signature(cls.__init__).parameters
    options = [p for p in params if p not in ("self", "d_sae")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"activation {name!r} has no option(s) {unknown}; its options are {options}")
    missing = [p for p in options if params[p].default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ValueError(f"activation {name!r} needs option(s) {missing} (e.g. activation_kwargs: {{k: 32}})")
    return cls(d_sae=d_sae, **kwargs)
