"""Synthetic activation sequences with known ground truth, at several timescales.

Each true feature is a random unit direction in ``d_in`` (there are more features than dimensions,
so they live in superposition). A feature belongs to a timescale group; within a sequence it is
switched on and off by a two-state Markov chain whose mean "on" span is the group's ``mean_span``
tokens and whose stationary on-probability is the group's ``density``. While on, its per-token
coefficient is ``amplitude * lognormal(0, jitter)``. Token-local features (span 1) are strong and
brief; slow features persist over tens of tokens at low per-token amplitude, which is exactly the
case where seeing earlier tokens should help an encoder. Gaussian noise is added to every token.

Position 0 is a BOS-like token: a huge fixed vector with ``valid = False`` (as Gemma's BOS
activations are), so that leaks of invalid positions through the convolutions would show.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from data.sources import ActivationSource, SourceChunk

__all__ = ["FeatureGroup", "SyntheticSource", "DEFAULT_GROUPS"]


@dataclass(frozen=True)
class FeatureGroup:
    """A set of true features sharing one timescale."""

    name: str
    """group label used in metric names (``val/recovered/<name>``)"""
    n_features: int
    """number of features in the group"""
    mean_span: float
    """mean number of consecutive tokens a feature stays on (1 = token-local)"""
    density: float
    """stationary fraction of tokens on which a feature is on"""
    amplitude: float
    """typical coefficient while on"""

    def __post_init__(self) -> None:
        if self.n_features < 1:
            raise ValueError(f"group {self.name!r}: n_features must be >= 1, got {self.n_features}")
        if self.mean_span < 1:
            raise ValueError(f"group {self.name!r}: mean_span must be >= 1, got {self.mean_span}")
        if not 0 < self.density < 1:
            raise ValueError(f"group {self.name!r}: density must be in (0, 1), got {self.density}")
        # P(off -> on) = density / (mean_span * (1 - density)) must be a probability
        if self.density / (self.mean_span * (1 - self.density)) > 1:
            raise ValueError(
                f"group {self.name!r}: density {self.density} is too high for mean_span {self.mean_span}"
            )
        if not 0 < self.amplitude < math.inf:
            raise ValueError(f"group {self.name!r}: amplitude must be positive, got {self.amplitude}")


DEFAULT_GROUPS: tuple[FeatureGroup, ...] = (
    FeatureGroup("local", n_features=64, mean_span=1.0, density=0.03, amplitude=1.0),
    FeatureGroup("medium", n_features=32, mean_span=8.0, density=0.04, amplitude=0.6),
    FeatureGroup("slow", n_features=32, mean_span=32.0, density=0.05, amplitude=0.35),
)


class SyntheticSource(ActivationSource):
    """Activation sequences with planted multi-timescale features (the embedded default source).

    Args:
        d_in: activation width.
        ctx_len: tokens per sequence, the BOS-like position 0 included.
        groups: timescale groups of true features (default: local, medium and slow).
        noise_std: standard deviation of the Gaussian noise added per coordinate.
        jitter: log-normal spread of per-token coefficients while a feature is on.
        bos_norm: norm of the (invalid) BOS vector at position 0.
        seed: seed of the feature directions and of every sequence.
    """

    kind = "synthetic"

    def __init__(
        self,
        d_in: int = 64,
        ctx_len: int = 64,
        groups: list[FeatureGroup] | None = None,
        noise_std: float = 0.05,
        jitter: float = 0.25,
        bos_norm: float = 100.0,
        seed: int = 0,
    ) -> None:
        if d_in < 2:
            raise ValueError(f"d_in must be >= 2, got {d_in}")
        if ctx_len < 2:
            raise ValueError(f"ctx_len must be >= 2 (BOS + at least one token), got {ctx_len}")
        for name, v in (("noise_std", noise_std), ("jitter", jitter), ("bos_norm", bos_norm)):
            if not 0 <= v < math.inf:  # NaN fails too: it would reach the cache and every statistic
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        self.groups = tuple(
            DEFAULT_GROUPS
            if groups is None
            else (FeatureGroup(**g) if isinstance(g, dict) else g for g in groups)
        )
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be distinct, got {names}")
        self._d_in, self._ctx_len = d_in, ctx_len
        self.noise_std, self.jitter, self.bos_norm, self.seed = noise_std, jitter, bos_norm, seed

        g = torch.Generator().manual_seed(seed)
        feats = torch.randn(self.n_features, d_in, generator=g, dtype=torch.float64)
        self.features = (feats / feats.norm(dim=1, keepdim=True)).float()  # [n_features, d_in]
        bos = torch.randn(d_in, generator=g, dtype=torch.float64)
        self.bos_vector = (bos / bos.norm() * bos_norm).float()  # [d_in]
        self.group_index = torch.cat([torch.full((grp.n_features,), i) for i, grp in enumerate(self.groups)])
        spans = torch.cat([torch.full((grp.n_features,), grp.mean_span) for grp in self.groups])
        dens = torch.cat([torch.full((grp.n_features,), grp.density) for grp in self.groups])
        self._amp = torch.cat([torch.full((grp.n_features,), grp.amplitude) for grp in self.groups])
        self._p_off = (1.0 / spans).double()  # P(on -> off)
        self._p_on = (dens / (spans * (1 - dens))).double()  # P(off -> on)
        self._density = dens.double()

    # ------------------------------------------------------------------ interface
    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def ctx_len(self) -> int:
        return self._ctx_len

    @property
    def n_features(self) -> int:
        return sum(g.n_features for g in self.groups)

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def fingerprint(self) -> dict:
        return {
            "source": self.kind,
            "d_in": self._d_in,
            "ctx_len": self._ctx_len,
            "groups": [asdict(g) for g in self.groups],
            "noise_std": self.noise_std,
            "jitter": self.jitter,
            "bos_norm": self.bos_norm,
            "seed": self.seed,
        }

    def static_ground_truth(self) -> dict[str, np.ndarray]:
        return {
            "features": self.features.numpy(),
            "group_index": self.group_index.numpy().astype(np.int32),
            "group_names": np.array(self.group_names, dtype="S"),
        }

    def generate(self, start: int, stop: int, batch_size: int) -> Iterator[SourceChunk]:
        for lo in range(start, stop, batch_size):
            hi = min(stop, lo + batch_size)
            yield self._rows(lo, hi)

    # ------------------------------------------------------------------ generation
    def _row_generator(self, row: int) -> torch.Generator:
        # every row has its own stream, so row r is the same whatever range it is generated in
        key = hashlib.sha256(json.dumps([self.seed, row]).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))

    def _rows(self, lo: int, hi: int) -> SourceChunk:
        T, n_f = self._ctx_len, self.n_features
        u, init, jit, noise = [], [], [], []
        for row in range(lo, hi):  # the random draws of each row come from that row's own stream
            gen = self._row_generator(row)
            u.append(torch.rand(T - 1, n_f, generator=gen, dtype=torch.float64))
            init.append(torch.rand(n_f, generator=gen, dtype=torch.float64))
            jit.append(torch.randn(T - 1, n_f, generator=gen))
            noise.append(torch.randn(T, self._d_in, generator=gen))
        u_NTF = torch.stack(u)
        state = torch.stack(init) < self._density  # [n, n_features], stationary start
        on = torch.empty(u_NTF.shape, dtype=torch.bool)
        for t in range(T - 1):  # two-state Markov chain per feature, vectorised over rows
            if t > 0:
                state = state ^ torch.where(state, u_NTF[:, t] < self._p_off, u_NTF[:, t] < self._p_on)
            on[:, t] = state
        c_NTF = torch.zeros(hi - lo, T, n_f)
        c_NTF[:, 1:] = on.float() * self._amp * torch.exp(self.jitter * torch.stack(jit))
        acts = c_NTF @ self.features + self.noise_std * torch.stack(noise)  # [n, T, d_in]
        acts[:, 0] = self.bos_vector
        valid = torch.ones(hi - lo, T, dtype=torch.bool)
        valid[:, 0] = False
        tokens = torch.full((hi - lo, T), -1, dtype=torch.int32)
        return SourceChunk(
            acts=acts, tokens=tokens, valid=valid, ground_truth={"coefficients": c_NTF.half().numpy()}
        )
