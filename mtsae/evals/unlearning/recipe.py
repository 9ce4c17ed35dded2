"""Unlearning recipes: which SAE features to clamp, where and how hard, in a small JSON file.

A recipe is what the feature selection of the unlearning evaluation decided (``mtsae eval unlearning``
writes the best grid point's recipe beside its results), in a form that applies to a model later:
``mtsae unlearn generate --recipe R --prompt ...`` or, in Python,
``with mtsae.evals.unlearning.intervention.clamped(model, None, "recipe.json"): model.generate(...)``.

Fields (format ``mtsae-unlearning-recipe``, version 1): the SAE's path (relative paths are relative to the
recipe's folder) and SHA-256 (checked when the SAE is loaded), the model it was evaluated with, the layer
and hook, the features, the multiplier, the position rule (:data:`mtsae.evals.unlearning.intervention.POSITION_RULES`),
whether the SAE runs in the model's dtype, the BOS/EOS/PAD ids, and the sparsities the features were
chosen from (retain threshold, rounding, forget and retain sparsity of each feature).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtsae.hashing import update_from_file

__all__ = ["RECIPE_FORMAT", "RecipeError", "UnlearningRecipe", "sae_sha256", "load_sae_path"]

RECIPE_FORMAT = "mtsae-unlearning-recipe"
_VERSION = 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class RecipeError(ValueError):
    """A recipe file is missing, malformed, or its SAE does not match the recorded hash."""


def sae_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of an SAE on disk: of the file, or of a folder's regular files (names and bytes, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    else:
        raise RecipeError(f"the SAE {str(path)!r} does not exist")
    for p in files:
        if path.is_dir():
            h.update(p.name.encode() + b"\0")
        update_from_file(h, p)
    return h.hexdigest()


def load_sae_path(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """An SAE acting on raw activations from a folder written by :func:`mtsae.save_sae` or a ``.ckpt``."""
    from mtsae.sae.export import load_sae
    from mtsae.training.checkpoint import load_sae_from_checkpoint

    path = Path(path)
    if path.is_file() and path.suffix == ".ckpt":
        return load_sae_from_checkpoint(path, device).eval()
    if path.is_dir():
        return load_sae(path, device)
    raise RecipeError(f"{str(path)!r} is neither an exported SAE folder (mtsae.save_sae) nor a .ckpt file")


@dataclass
class UnlearningRecipe:
    """One clamping intervention, ready to apply (see the module docstring for the file format)."""

    sae_path: str
    """the SAE (exported folder or ``.ckpt``); relative to the recipe file's folder when relative"""
    sae_sha256: str
    """:func:`sae_sha256` of ``sae_path``, checked on load"""
    layer: int
    """decoder layer whose output is clamped"""
    features: list[int]
    """features clamped to ``-multiplier`` wherever they fire"""
    multiplier: float
    """clamp value is ``-multiplier``"""
    hook: str = "resid_post"
    """the activation the SAE reads (the output of decoder layer ``layer``)"""
    position_rule: str = "saebench"
    """which positions may change (:data:`mtsae.evals.unlearning.intervention.POSITION_RULES`)"""
    sae_in_model_dtype: bool = True
    """run the SAE in the model's dtype (SAEBench) instead of its own"""
    special_ids: list[int] = field(default_factory=list)
    """BOS/EOS/PAD ids of the tokenizer (used by the ``special_tokens`` rule)"""
    model: dict[str, Any] = field(default_factory=dict)
    """the model the recipe was chosen on: ``name``, ``revision``, ``dtype``"""
    selection: dict[str, Any] = field(default_factory=dict)
    """how the features were chosen: ``retain_threshold``, ``n_features``, ``rounding`` (decimals or
    None), ``forget_sparsity`` and ``retain_sparsity`` of each feature, ``n_tokens`` per corpus"""
    scores: dict[str, Any] = field(default_factory=dict)
    """what the evaluation measured with it (``wmdp_accuracy``, ``mmlu_accuracy``, ...)"""
    path: Path | None = field(default=None, compare=False, repr=False)
    """where the recipe was read from / written to (not stored)"""

    def __post_init__(self) -> None:
        from mtsae.evals.unlearning.intervention import POSITION_RULES

        if self.position_rule not in POSITION_RULES:
            raise RecipeError(
                f"unknown position rule {self.position_rule!r}; use one of {sorted(POSITION_RULES)}"
            )
        if self.hook != "resid_post":
            raise RecipeError(f"only hook 'resid_post' is supported, got {self.hook!r}")
        if not isinstance(self.features, list) or not self.features:
            raise RecipeError(
                f"a recipe needs a list of at least one feature to clamp, got {self.features!r}"
            )
        bad = [i for i in self.features if not _is_int(i) or i < 0]
        if bad:
            raise RecipeError(f"features must be feature indices (integers >= 0), got {bad[:5]}")
        if not _is_int(self.layer) or self.layer < 0:
            raise RecipeError(f"layer must be a decoder layer index (an integer >= 0), got {self.layer!r}")
        self.features = [int(i) for i in self.features]
        self.check_multiplier()
        dtype = self.model.get("dtype") if isinstance(self.model, dict) else None
        if dtype is not None:
            from mtsae.lm.loading import model_dtype

            try:
                model_dtype(dtype, "the recipe's model dtype")
            except ValueError as e:
                raise RecipeError(str(e)) from None

    def check_multiplier(self) -> None:
        """Refuse a multiplier that is not a finite number >= 0 (NaN would clamp to NaN: empty output)."""
        if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, (int, float)):
            raise RecipeError(f"multiplier must be a number, got {self.multiplier!r}")
        if not 0 <= self.multiplier < math.inf:
            raise RecipeError(
                f"multiplier must be a finite number >= 0 (the clamp value is -multiplier), got {self.multiplier}"
            )

    def check_sae(self, d_sae: int) -> None:
        """Refuse features that the SAE does not have."""
        out = [i for i in self.features if i >= d_sae]
        if out:
            raise RecipeError(f"features {out[:5]} are out of range: the recipe's SAE has {d_sae} features")

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return {"format": RECIPE_FORMAT, "version": _VERSION, **d}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the recipe as JSON (atomically) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> UnlearningRecipe:
        """Read a recipe written by :meth:`save` (clear :class:`RecipeError` on a wrong file)."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(
                f"recipe {str(path)!r} does not exist: `mtsae eval unlearning` writes recipe.json beside its "
                "results.json"
            )
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RecipeError(f"recipe {str(path)!r} is not JSON ({e})") from e
        if not isinstance(d, dict) or d.get("format") != RECIPE_FORMAT:
            raise RecipeError(f"{str(path)!r} is not an unlearning recipe (no format {RECIPE_FORMAT!r})")
        if d.get("version") != _VERSION:
            raise RecipeError(f"{str(path)!r} has recipe version {d.get('version')}, expected {_VERSION}")
        d = {k: v for k, v in d.items() if k not in ("format", "version")}
        try:
            recipe = cls(**d)
        except TypeError as e:
            raise RecipeError(f"recipe {str(path)!r}: {e}") from e
        recipe.path = path
        return recipe

    # ------------------------------------------------------------------ the SAE
    def resolved_sae_path(self) -> Path:
        p = Path(self.sae_path).expanduser()
        if not p.is_absolute() and self.path is not None:
            p = self.path.parent / p
        return p

    def load_sae(self, device: str | torch.device = "cpu") -> nn.Module:
        """The recipe's SAE, after checking its SHA-256 against the recorded one."""
        p = self.resolved_sae_path()
        digest = sae_sha256(p)
        if digest != self.sae_sha256:
            raise RecipeError(
                f"the SAE at {str(p)!r} has SHA-256 {digest[:16]}..., the recipe was made with "
                f"{self.sae_sha256[:16]}...: the file changed since; rerun `mtsae eval unlearning` for it"
            )
        sae = load_sae_path(p, device)
        self.check_sae(int(sae.d_sae))
        return sae
