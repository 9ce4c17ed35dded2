"""The compare config (YAML): what to train and how the report compares it.

A comparison has a base training config and two ways to name runs, which can be combined:

``runs`` — explicit runs, one trained SAE each (the base config, plus ``--config`` overlays and
``model.*`` arguments)::

    runs:
      - name: mtsae                                   # the base config as it is
      - name: topk
        configs: [configs/baselines/demo_topk.yaml]   # extra --config overlays (only a model: section)
      - name: sep_none
        args: {model.separation: none}                # CLI overrides (only --model.*), mapping or list
    ablations:                                        # optional named ordered subsets, one table each
      separation: [sep_none, mtsae]

``frontier`` — L0-matched frontiers over seeds: every model *family* is trained at every point of every
activation's sparsity sweep, once per seed; the report interpolates each seed's frontier at common L0
values and compares the families there (mean ± std over seeds)::

    seeds: [0, 1, 2]                                  # seed_everything of each frontier run
    frontier:
      families:                                       # one entry per model family: its model.* args
        token: {model.dilations: [], model.separation: none}
        mtsae: {}
        mtsae_frozen_conv: {model.freeze_conv: true, model.separation: none}
      activations:                                    # per activation: its args and the sparsity knob
        relu: {args: {model.activation: relu}, knob: model.sparsity_coeff, values: [1, 2, 4]}
        topk: {args: {model.activation: topk}, knob: model.activation_kwargs, values: [{k: 3}, {k: 8}]}
        relu1:                                        # optional: only some families; one value = one point
          {args: {model.activation: relu}, knob: model.sparsity_coeff, values: [5.0], families: [token, mtsae]}
      contrasts: [[mtsae, token], [mtsae, mtsae_frozen_conv]]   # default: every family vs the first
      n_l0: 3                                         # common L0 values per activation (>= 1)
      metrics: [val/fvu, val/recovered/slow]          # default: see DEFAULT_METRICS
      min_effect: {val/fvu: 0.01}                     # smallest difference called one (default:
                                                      # mtsae.compare.frontier.DEFAULT_MIN_EFFECT)

Frontier runs are named ``<activation>-<family>-<point>-s<seed>`` (point = index into ``values``). An
activation with a single knob value has no frontier: its families are compared at their runs' own L0
(the report says so and shows each family's L0 beside the metrics).

Shared keys: ``name`` (report folder ``<out>/<name>/``), ``base`` (training config every run starts from;
paths are relative to the current directory), ``description`` (text at the top of the report) and
``overrides`` (shared by all runs: data, budget, trainer flags; a mapping key -> value or a list of CLI
strings). Order of precedence (later wins): base, ``overrides``, the run's ``configs``, the run's
``args`` (for frontier runs: the family's args, the activation's args, the knob), the seed, then the
command line's ``--set KEY=VALUE``. Values in mappings that are not strings are written as JSON.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtsae.compare.frontier import DEFAULT_MIN_EFFECT

__all__ = [
    "NAME_PATTERN",
    "DEFAULT_METRICS",
    "RunSpec",
    "Activation",
    "Frontier",
    "CompareConfig",
    "load_compare_config",
]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")

#: frontier metrics when the config names none (``{group}`` expands to every ground-truth group)
DEFAULT_METRICS = (
    "val/fvu",
    "val/recovered/{group}",
    "val/mmcs/{group}",
    "val/synthetic_unlearning/score",
)


@dataclass
class RunSpec:
    """One trained SAE of a comparison."""

    name: str
    """folder name of the run, ``<out>/<report>/runs/<name>/``"""
    configs: list[str] = field(default_factory=list)
    """extra ``--config`` overlays applied after the base config (may contain only ``model:``)"""
    args: list[str] = field(default_factory=list)
    """CLI overrides applied after the overlays (``--model.*``; ``--seed_everything`` for frontier runs)"""
    family: str | None = None
    """frontier runs: the model family"""
    activation: str | None = None
    """frontier runs: the activation (sweep) name"""
    point: int | None = None
    """frontier runs: index of the knob value in the activation's sweep"""
    seed: int | None = None
    """frontier runs: ``seed_everything``"""


@dataclass
class Activation:
    """A sparsity sweep: shared ``model.*`` args plus one knob set to each value in turn."""

    name: str
    """label in run names and the report (``relu``, ``topk``, ...)"""
    args: list[str]
    """CLI overrides shared by every point of the sweep"""
    knob: str
    """the swept key (``model.sparsity_coeff``, ``model.activation_kwargs``, ...)"""
    values: list[Any]
    """the knob's values, one frontier point each (a single value: compared at the runs' own L0)"""
    families: list[str] | None = None
    """the families trained with this activation (``None``: every family of the frontier)"""


@dataclass
class Frontier:
    """L0-matched frontiers: families × activations × knob values × seeds."""

    families: dict[str, list[str]]
    """family name -> its ``model.*`` CLI overrides (the first family is the default reference)"""
    activations: list[Activation]
    """the sparsity sweeps"""
    contrasts: list[tuple[str, str]]
    """pairs (a, b): the report states whether a is better than b, worse, or no different"""
    n_l0: int = 3
    """number of common L0 values per activation"""
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    """metrics interpolated at the common L0 values (``{group}`` expands to every ground-truth group)"""
    min_effect: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIN_EFFECT))
    """metric -> the smallest difference of means that is called a difference (``{group}`` allowed);
    the defaults with the config's entries on top"""


@dataclass
class CompareConfig:
    """A comparison (see the module docstring)."""

    name: str
    """report name; output folder ``<out>/<name>/``"""
    base: str
    """the training config every run starts from"""
    runs: list[RunSpec]
    """every trained SAE: the explicit runs, then the frontier runs"""
    overrides: list[str] = field(default_factory=list)
    """CLI overrides shared by all runs (data, budget, trainer flags)"""
    ablations: dict[str, list[str]] = field(default_factory=dict)
    """named ordered subsets of explicit runs, reported as separate tables"""
    description: str = ""
    """free text put at the top of the report"""
    frontier: Frontier | None = None
    """the L0-matched frontier grid, if any"""
    seeds: list[int] = field(default_factory=list)
    """seeds of the frontier runs"""


def as_cli(value: Any, where: str) -> list[str]:
    """A mapping ``{key: value}`` or a list of CLI strings -> a list of CLI tokens."""
    if value is None:
        return []
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            key = str(k) if str(k).startswith("--") else f"--{k}"
            out.append(f"{key}={v if isinstance(v, str) else json.dumps(v)}")
        return out
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    raise ValueError(f"{where} must be a mapping key -> value or a list of CLI strings, got {value!r}")


def cli_keys(tokens: list[str]) -> list[str]:
    """The dotted keys that a list of CLI tokens sets (``--a.b=1`` and ``--a.b 1`` -> ``a.b``)."""
    return [t[2:].split("=", 1)[0] for t in tokens if t.startswith("--")]


def _only_model(tokens: list[str], where: str) -> None:
    not_model = [k for k in cli_keys(tokens) if not k.startswith("model.")]
    if not_model:
        raise ValueError(
            f"{where} overrides {not_model}; a run may change only model.* (shared settings go under "
            "'overrides', seeds under 'seeds')"
        )


def _check_overlay(path: str, run: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"run {run!r}: overlay {path} does not exist")
    content = yaml.safe_load(p.read_text()) or {}
    extra = sorted(set(content) - {"model"})
    if extra:
        raise ValueError(
            f"run {run!r}: overlay {path} sets {extra}; a run may change only the model section so that all "
            "runs share data, seed and budget (put shared settings under 'overrides')"
        )


def _check_keys(raw: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _explicit_runs(raw: list, path: str) -> list[RunSpec]:
    runs = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or "name" not in r:
            raise ValueError(f"{path}: runs[{i}] must be a mapping with a 'name'")
        _check_keys(r, {"name", "configs", "args"}, f"{path}: runs[{i}]")
        run = RunSpec(
            name=str(r["name"]),
            configs=[str(c) for c in (r.get("configs") or [])],
            args=as_cli(r.get("args"), f"runs[{i}].args"),
        )
        if not NAME_PATTERN.match(run.name):
            raise ValueError(f"{path}: run name {run.name!r} must match {NAME_PATTERN.pattern}")
        for c in run.configs:
            _check_overlay(c, run.name)
        _only_model(run.args, f"{path}: run {run.name!r}")
        runs.append(run)
    return runs


def _frontier(raw: Any, path: str) -> Frontier:
    where = f"{path}: frontier"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping (families, activations, ...)")
    _check_keys(raw, {"families", "activations", "contrasts", "n_l0", "metrics", "min_effect"}, where)
    fams_raw = raw.get("families")
    if not isinstance(fams_raw, dict) or not fams_raw:
        raise ValueError(f"{where}.families must be a non-empty mapping name -> model.* args")
    families: dict[str, list[str]] = {}
    for name, args in fams_raw.items():
        if not NAME_PATTERN.match(str(name)) or "-" in str(name):
            raise ValueError(f"{where}: family name {name!r} must match [A-Za-z0-9_.]+")
        families[str(name)] = as_cli(args or {}, f"{where}.families.{name}")
        _only_model(families[str(name)], f"{where}.families.{name}")
    acts_raw = raw.get("activations")
    if not isinstance(acts_raw, dict) or not acts_raw:
        raise ValueError(f"{where}.activations must be a non-empty mapping name -> {{args, knob, values}}")
    activations = []
    for name, spec in acts_raw.items():
        w = f"{where}.activations.{name}"
        if not NAME_PATTERN.match(str(name)) or "-" in str(name):
            raise ValueError(f"{w}: name must match [A-Za-z0-9_.]+")
        if not isinstance(spec, dict):
            raise ValueError(f"{w} must be a mapping with knob and values")
        _check_keys(spec, {"args", "knob", "values", "families"}, w)
        knob, values = spec.get("knob"), spec.get("values")
        if not isinstance(knob, str) or not knob.startswith("model."):
            raise ValueError(f"{w}.knob must be a model.* key, got {knob!r}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{w}.values must list the knob's values (one: compared at the runs' own L0)")
        subset = spec.get("families")
        if subset is not None and (
            not isinstance(subset, list) or not subset or not all(f in families for f in subset)
        ):
            raise ValueError(f"{w}.families must list family names from {list(families)}, got {subset!r}")
        args = as_cli(spec.get("args") or {}, f"{w}.args")
        _only_model(args, w)
        activations.append(
            Activation(
                str(name), args, knob, list(values), None if subset is None else [str(f) for f in subset]
            )
        )
    names = list(families)
    contrasts_raw = raw.get("contrasts")
    if contrasts_raw is None:
        contrasts = [(f, names[0]) for f in names[1:]]
    else:
        contrasts = []
        for c in contrasts_raw:
            if not (isinstance(c, list | tuple) and len(c) == 2 and all(x in families for x in c)):
                raise ValueError(f"{where}.contrasts: {c!r} must be a pair of family names from {names}")
            if c[0] == c[1]:
                raise ValueError(f"{where}.contrasts: {c!r} compares a family with itself")
            contrasts.append((str(c[0]), str(c[1])))
    n_l0 = raw.get("n_l0", 3)
    if not isinstance(n_l0, int) or n_l0 < 1:
        raise ValueError(f"{where}.n_l0 must be a positive integer, got {n_l0!r}")
    metrics = raw.get("metrics")
    if metrics is not None and (
        not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics)
    ):
        raise ValueError(f"{where}.metrics must be a list of metric names (val/...)")
    min_effect = raw.get("min_effect") or {}
    if not isinstance(min_effect, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in min_effect.values()
    ):
        raise ValueError(f"{where}.min_effect must map metric names to numbers >= 0, got {min_effect!r}")
    return Frontier(
        min_effect={**DEFAULT_MIN_EFFECT, **{str(k): float(v) for k, v in min_effect.items()}},
        families=families,
        activations=activations,
        contrasts=contrasts,
        n_l0=n_l0,
        metrics=list(metrics) if metrics else list(DEFAULT_METRICS),
    )


def frontier_runs(frontier: Frontier, seeds: list[int]) -> list[RunSpec]:
    """Every frontier run: seed × activation × family × knob value (in that nesting order, so that a grid
    stopped part-way has every model at the seeds it finished)."""
    runs = []
    for seed in seeds:
        for act in frontier.activations:
            for family, fargs in frontier.families.items():
                if act.families is not None and family not in act.families:
                    continue
                for point, value in enumerate(act.values):
                    knob = as_cli({act.knob: value}, act.knob)
                    runs.append(
                        RunSpec(
                            name=f"{act.name}-{family}-{point}-s{seed}",
                            args=[*fargs, *act.args, *knob, f"--seed_everything={seed}"],
                            family=family,
                            activation=act.name,
                            point=point,
                            seed=seed,
                        )
                    )
    return runs


def load_compare_config(path: str | os.PathLike) -> CompareConfig:
    """Read and validate a compare config; raises ``ValueError`` with what to change."""
    if not Path(path).is_file():
        raise ValueError(f"no compare config at {str(path)!r} (the configs are in configs/compare/)")
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a compare config is a YAML mapping (see `mtsae compare --help`)")
    _check_keys(
        raw, {"name", "base", "runs", "overrides", "ablations", "description", "frontier", "seeds"}, str(path)
    )
    for key in ("name", "base"):
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r}")
    if not raw.get("runs") and not raw.get("frontier"):
        raise ValueError(f"{path}: give 'runs' (explicit runs), 'frontier' (a frontier grid) or both")
    name = str(raw["name"])
    if not NAME_PATTERN.match(name):
        raise ValueError(f"{path}: name {name!r} must match {NAME_PATTERN.pattern}")
    if not Path(raw["base"]).is_file():
        raise ValueError(f"{path}: base config {raw['base']} does not exist (paths are relative to the cwd)")
    if raw.get("runs") is not None and not isinstance(raw["runs"], list):
        raise ValueError(f"{path}: 'runs' must be a list")
    runs = _explicit_runs(raw.get("runs") or [], str(path))
    frontier = _frontier(raw["frontier"], str(path)) if raw.get("frontier") is not None else None
    seeds = raw.get("seeds")
    if seeds is None:
        seeds = [int((yaml.safe_load(Path(raw["base"]).read_text()) or {}).get("seed_everything") or 0)]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{path}: 'seeds' has duplicates: {seeds}")
    if frontier is not None:
        runs += frontier_runs(frontier, seeds)
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate run names {dupes}")
    ablations = raw.get("ablations") or {}
    if not isinstance(ablations, dict):
        raise ValueError(f"{path}: 'ablations' must be a mapping name -> list of run names")
    for abl, members in ablations.items():
        missing = [m for m in members or [] if m not in names]
        if missing:
            raise ValueError(f"{path}: ablation {abl!r} names unknown run(s) {missing}")
    return CompareConfig(
        name=name,
        base=str(raw["base"]),
        runs=runs,
        overrides=as_cli(raw.get("overrides"), "overrides"),
        ablations={str(k): list(v or []) for k, v in ablations.items()},
        description=str(raw.get("description") or ""),
        frontier=frontier,
        seeds=list(seeds),
    )
