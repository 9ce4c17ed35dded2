"""Shared fixtures: deterministic seeds and tiny factories (d_in=32, d_sae=64)."""

from __future__ import annotations

import pytest
import torch

from data.synthetic import FeatureGroup, SyntheticSource
from mtsae.sae.model import MTSAE


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny matmuls run faster on one thread than on two contended ones (and CI has 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_sae(dilations=(1, 2, 4, 8), d_in: int = 32, d_sae: int = 64, **kw) -> MTSAE:
    return MTSAE(d_in, d_sae, dilations=list(dilations), **kw)


def tiny_source(d_in: int = 16, ctx_len: int = 16, seed: int = 0) -> SyntheticSource:
    groups = [
        FeatureGroup("local", n_features=12, mean_span=1, density=0.05, amplitude=1.0),
        FeatureGroup("slow", n_features=8, mean_span=8, density=0.1, amplitude=0.5),
    ]
    return SyntheticSource(d_in=d_in, ctx_len=ctx_len, groups=groups, seed=seed)
