"""Evaluation metrics: reconstruction quality accumulated over a split, and ground-truth recovery.

``ReconstructionMetrics`` is a ``torchmetrics.Metric``: its sums are synchronised across DDP ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["ReconstructionMetrics", "max_cosine", "ground_truth_recovery", "RECOVERY_THRESHOLD"]

RECOVERY_THRESHOLD = 0.9


class ReconstructionMetrics(Metric):
    """FVU, MSE, cos(x, x_hat), L0, L1, l2 ratio and dead fraction over the valid tokens of a split.

    FVU is pooled: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` with ``mean(x)`` over the whole split.
    MSE is the mean squared error per element; a feature is dead if it never fires in the split.
    """

    full_state_update = False

    def __init__(self, d_in: int, d_sae: int) -> None:
        super().__init__()
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq_err", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq_x", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cos", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("l0", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("l1", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("l2_ratio", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fired", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum")
        self.d_in = d_in

    def update(self, x: Tensor, x_hat: Tensor, f: Tensor, valid: Tensor | None = None) -> None:
        if valid is not None:
            x, x_hat, f = x[valid], x_hat[valid], f[valid]
        else:
            x, x_hat, f = x.flatten(0, -2), x_hat.flatten(0, -2), f.flatten(0, -2)
        x, x_hat, f = x.double(), x_hat.double(), f.double()
        # out-of-place updates: states made under inference_mode (trainer.validate) stay usable in fit
        self.n = self.n + x.shape[0]
        self.sq_err = self.sq_err + (x - x_hat).pow(2).sum()
        self.sum_x = self.sum_x + x.sum(0)
        self.sum_sq_x = self.sum_sq_x + x.pow(2).sum()
        self.cos = self.cos + F.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).sum()
        self.l0 = self.l0 + (f > 0).sum()
        self.l1 = self.l1 + f.abs().sum()
        self.l2_ratio = self.l2_ratio + (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-8)).sum()
        self.fired = self.fired + (f > 0).sum(0)

    def compute(self) -> dict[str, Tensor]:
        n = self.n.clamp_min(1)
        total_var = self.sum_sq_x - self.sum_x.pow(2).sum() / n
        fvu = self.sq_err / total_var.clamp_min(1e-12)
        return {
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "mse": self.sq_err / (n * self.d_in),
            "cossim": self.cos / n,
            "l0": self.l0 / n,
            "l1": self.l1 / n,
            "l2_ratio": self.l2_ratio / n,
            "dead_fraction": (self.fired == 0).double().mean(),
        }


def max_cosine(true_dirs: Tensor, W_dec: Tensor) -> Tensor:
    """For each true direction ``[n_true, d]``, the max cosine with any decoder row ``[d_sae, d]``."""
    t = F.normalize(true_dirs.float(), dim=-1)
    w = F.normalize(W_dec.detach().float().to(t.device), dim=-1)
    return (t @ w.t()).max(dim=-1).values


def ground_truth_recovery(
    true_dirs: Tensor,
    W_dec: Tensor,
    group_index: Tensor | None = None,
    group_names: list[str] | None = None,
    threshold: float = RECOVERY_THRESHOLD,
) -> dict[str, float]:
    """MMCS (mean max cosine similarity) and the fraction of true features recovered (max cos > threshold).

    Returns ``{"mmcs": .., "recovered": .., "mmcs/<group>": .., "recovered/<group>": ..}``.
    """
    mc = max_cosine(true_dirs, W_dec)
    out = {"mmcs": mc.mean().item(), "recovered": (mc > threshold).float().mean().item()}
    if group_index is not None and group_names is not None:
        for i, name in enumerate(group_names):
            sel = mc[group_index.to(mc.device) == i]
            if sel.numel():
                out[f"mmcs/{name}"] = sel.mean().item()
                out[f"recovered/{name}"] = (sel > threshold).float().mean().item()
    return out
