"""Public unlearning API: feature sparsity and selection, the sweep and its score, the clamp
intervention and :func:`clamped` (the code lives in :mod:`mtsae.evals`)."""

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
