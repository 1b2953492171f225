"""Shrinking failing reordered states (logwrites.shrink) with synthetic failure rules."""

from __future__ import annotations

import pytest

from logwrites.crashstates import CrashState
from logwrites.shrink import shrink, with_dropped


def reorder(dropped: tuple[int, ...]) -> CrashState:
    return with_dropped(CrashState("x", "reorder", 100, 0, 3), dropped)


def test_shrinks_to_the_one_record_to_blame() -> None:
    seen: list[tuple[int, ...]] = []

    def fails(s: CrashState) -> bool:
        seen.append(s.dropped)
        return 17 in s.dropped

    result = shrink(reorder(tuple(range(1, 41))), fails)
    assert result.state.dropped == (17,)
    assert result.state.id == "r:100:-17"
    assert result.minimal
    assert result.tries == len(seen) <= 12  # halving, not one try per record


def test_shrinks_to_a_pair_that_only_fails_together() -> None:
    result = shrink(reorder((3, 5, 8, 9, 12)), lambda s: {5, 9} <= set(s.dropped))
    assert result.state.dropped == (5, 9)
    assert result.minimal


def test_try_budget_is_respected() -> None:
    result = shrink(reorder(tuple(range(1, 41))), lambda s: len(s.dropped) >= 20, max_tries=5)
    assert result.tries == 5
    assert not result.minimal
    assert len(result.state.dropped) >= 20


def test_only_reordered_states_shrink() -> None:
    with pytest.raises(ValueError, match="only reordered states"):
        shrink(CrashState("p:4", "prefix", 4, 4, 1), lambda s: True)
