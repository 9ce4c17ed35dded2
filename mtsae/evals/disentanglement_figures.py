"""Figures of the disentanglement diagnostics (:func:`mtsae.evals.disentanglement.disentanglement_results`).

Matplotlib is imported when a figure is drawn; figures use an Agg canvas and no pyplot state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["figures"]


def _new(ncols: int = 1) -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * ncols, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _density(results: Mapping[str, Any]) -> Figure:
    sc = results["scalars"]
    fig, ax = _new()
    counts, edges = results["log10_density_hist"]
    ax.stairs(counts.numpy(), edges.numpy(), fill=True)
    dense = math.log10(results["thresholds"]["dense"])
    ax.axvline(dense, color="C3", ls="--", lw=1, label=f"dense > {results['thresholds']['dense']:g}")
    ax.set(xlabel="log10 feature density", ylabel="features")
    ax.set_title(
        f"dead {sc['density/dead_fraction']:.1%}, dense {sc['density/dense_fraction']:.1%}", fontsize=9
    )
    ax.legend(fontsize=8)
    return fig


def _scale_attribution(results: Mapping[str, Any]) -> Figure:
    sc, dil = results["scalars"], results["dilations"]
    fig, (ax1, ax2) = _new(2)
    pos = torch.arange(len(dil)).numpy()
    ax1.bar(pos - 0.2, [sc[f"scale/share/dilation_{r}"] for r in dil], 0.4, label="mean share")
    ax1.bar(pos + 0.2, [sc[f"scale/majority/dilation_{r}"] for r in dil], 0.4, label="share > 1/2")
    ax1.set_xticks(pos, [str(r) for r in dil])
    ax1.set(xlabel="dilation", ylabel="fraction", title="encoder energy per scale")
    ax1.legend(fontsize=8)
    ax2.hist(results["scale_entropy"].numpy(), bins=20, range=(0, 1))
    ax2.set(xlabel="normalised entropy", ylabel="features", title=f"mean {sc['scale/entropy']:.2f}")
    return fig


def _persistence(results: Mapping[str, Any]) -> Figure:
    sc = results["scalars"]
    fig, ax = _new()
    lags, auto = results["lags"], results["autocorrelation"]
    qs = []
    for li in range(len(lags)):
        r = auto[li][~auto[li].isnan()]
        qs.append(
            torch.quantile(r, torch.tensor([0.25, 0.5, 0.75])).tolist() if r.numel() else [math.nan] * 3
        )
    q = torch.tensor(qs)
    ax.plot(lags, [sc[f"persistence/lag_{k}"] for k in lags], "o-", label="mean")
    ax.fill_between(lags, q[:, 0].numpy(), q[:, 2].numpy(), alpha=0.3, label="quartiles")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lags, [str(k) for k in lags])
    ax.minorticks_off()
    ax.set(xlabel="lag (tokens)", ylabel="autocorrelation", title="temporal persistence")
    ax.legend(fontsize=8)
    return fig


def _recovery(rec: Mapping[str, float]) -> Figure:
    groups = [k.split("/", 1)[1] for k in rec if k.startswith("mmcs/")]
    names = ["all", *groups]
    fig, ax = _new()
    pos = torch.arange(len(names)).numpy()
    ax.bar(pos - 0.2, [rec["mmcs"], *[rec[f"mmcs/{g}"] for g in groups]], 0.4, label="MMCS")
    ax.bar(pos + 0.2, [rec["recovered"], *[rec[f"recovered/{g}"] for g in groups]], 0.4, label="recovered")
    ax.set_xticks(pos, names)
    ax.set(ylim=(0, 1), ylabel="fraction", title="ground-truth recovery per group")
    ax.legend(fontsize=8)
    return fig


def figures(results: Mapping[str, Any]) -> dict[str, Figure]:
    """Matplotlib figures (Agg canvas, no pyplot state) of :func:`disentanglement_results`.

    Keys: ``density`` (histogram of log10 density), ``scale_attribution`` (MTSAE only: mean share and
    majority fraction per dilation, and the entropy histogram), ``persistence`` (mean and quartiles
    of the autocorrelation vs lag), ``recovery`` (with ground truth: MMCS and recovered fraction per group).
    """
    out = {"density": _density(results)}
    if results.get("scale_share") is not None:
        out["scale_attribution"] = _scale_attribution(results)
    out["persistence"] = _persistence(results)
    if results.get("recovery"):
        out["recovery"] = _recovery(results["recovery"])
    return out
