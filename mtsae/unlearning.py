"""Public unlearning API: feature selection, the clamp intervention and :func:`clamped` (the code lives
in :mod:`mtsae.evals.unlearning`)."""

from mtsae.evals.unlearning.intervention import *  # noqa: F403
from mtsae.evals.unlearning.intervention import __all__  # noqa: F401
