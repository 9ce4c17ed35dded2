"""Shared schedule of the evaluation callbacks: act on every n-th validation."""

from __future__ import annotations

from typing import Any

import lightning as L
from typing_extensions import override

__all__ = ["EveryNValidations"]


class EveryNValidations(L.Callback):
    """Base of callbacks that act on the n-th, 2n-th, ... validation (the sanity check never counts).

    Subclasses call :meth:`is_due` while a validation runs and :meth:`count_validation` once at its end.
    The count is checkpointed, so a resumed run keeps the schedule.

    Args:
        every_n_val: act on every n-th validation; 0 never acts during validation.
    """

    def __init__(self, every_n_val: int = 1) -> None:
        if every_n_val < 0:
            raise ValueError(f"every_n_val must be >= 0, got {every_n_val}")
        self.every_n_val = every_n_val
        self.n_validations = 0  # completed validations, sanity check excluded

    def is_due(self, trainer: L.Trainer) -> bool:
        """Whether the validation now running is one to act on."""
        if trainer.sanity_checking or self.every_n_val == 0:
            return False
        return (self.n_validations + 1) % self.every_n_val == 0

    def count_validation(self, trainer: L.Trainer) -> bool:
        """At the end of a validation: count it and return whether it was due."""
        due = self.is_due(trainer)
        if not trainer.sanity_checking:
            self.n_validations += 1
        return due

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"n_validations": self.n_validations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_validations = int(state_dict.get("n_validations", 0))
