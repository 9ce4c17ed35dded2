"""Deprecated: an old import path (``import mtsae.unlearning``) kept for code written against it.

Every name here has one home, where new code imports it from: the scores in :mod:`mtsae.evals.scores`,
feature sparsity in :mod:`mtsae.evals.sparsity`, the clamp, :func:`clamped` and :data:`POSITION_RULES` in
:mod:`mtsae.evals.unlearning.intervention`, selection and the sweep in :mod:`mtsae.evals.unlearning.selection`.
Importing this module warns (``DeprecationWarning``); it will be removed.
"""

import warnings

from mtsae.evals.scores import ce_loss_score, kl_div_score, kl_per_token, next_token_ce
from mtsae.evals.sparsity import SparsityAccumulator, feature_sparsity, round_sparsity
from mtsae.evals.unlearning.intervention import (
    POSITION_RULES,
    ClampIntervention,
    GenerationClamp,
    clamp_intervention,
    clamped,
    intervention_mask,
    valid_token_mask,
)
from mtsae.evals.unlearning.selection import (
    GridConfig,
    GridPoint,
    check_grid,
    pooled_accuracy,
    select_features,
    unlearning_score,
)

warnings.warn(
    "mtsae.unlearning is deprecated: import from mtsae.evals.unlearning.intervention (clamped, "
    "GenerationClamp, ...), mtsae.evals.unlearning.selection, mtsae.evals.sparsity or mtsae.evals.scores",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "POSITION_RULES",
    "ClampIntervention",
    "GenerationClamp",
    "GridConfig",
    "GridPoint",
    "SparsityAccumulator",
    "ce_loss_score",
    "check_grid",
    "clamp_intervention",
    "clamped",
    "feature_sparsity",
    "intervention_mask",
    "kl_div_score",
    "kl_per_token",
    "next_token_ce",
    "pooled_accuracy",
    "round_sparsity",
    "select_features",
    "unlearning_score",
    "valid_token_mask",
]
