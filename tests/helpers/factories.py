"""Tiny factories shared by the tests (d_in=32, d_sae=64 SAEs; a two-timescale synthetic source)."""

from __future__ import annotations

from data.synthetic import FeatureGroup, SyntheticSource
from mtsae.sae.model import MTSAE


def tiny_sae(dilations=(1, 2, 4, 8), d_in: int = 32, d_sae: int = 64, **kw) -> MTSAE:
    return MTSAE(d_in, d_sae, dilations=list(dilations), **kw)


def tiny_source(d_in: int = 16, ctx_len: int = 16, seed: int = 0) -> SyntheticSource:
    groups = [
        FeatureGroup("local", n_features=12, mean_span=1, density=0.05, amplitude=1.0),
        FeatureGroup("slow", n_features=8, mean_span=8, density=0.1, amplitude=0.5),
    ]
    return SyntheticSource(d_in=d_in, ctx_len=ctx_len, groups=groups, seed=seed)
