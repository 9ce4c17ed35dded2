"""The shared every-n-validations schedule of the evaluation callbacks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from callbacks.periodic import EveryNValidations


def _schedule(cb: EveryNValidations, n: int, sanity_first: bool = True) -> list[bool]:
    out = []
    if sanity_first:
        assert not cb.count_validation(SimpleNamespace(sanity_checking=True))
    for _ in range(n):
        trainer = SimpleNamespace(sanity_checking=False)
        due = cb.is_due(trainer)
        assert cb.count_validation(trainer) == due
        out.append(due)
    return out


def test_every_n_validations() -> None:
    assert _schedule(EveryNValidations(1), 3) == [True, True, True]
    assert _schedule(EveryNValidations(3), 7) == [False, False, True, False, False, True, False]
    assert _schedule(EveryNValidations(0), 3) == [False, False, False]


def test_schedule_survives_a_checkpoint() -> None:
    cb = EveryNValidations(2)
    _schedule(cb, 3)
    resumed = EveryNValidations(2)
    resumed.load_state_dict(cb.state_dict())
    assert _schedule(resumed, 2, sanity_first=True) == [True, False]


def test_negative_is_refused() -> None:
    with pytest.raises(ValueError, match="every_n_val"):
        EveryNValidations(-1)
