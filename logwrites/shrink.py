"""Shrinking a failing reordered crash state to a minimal set of dropped records.

A reordered state that fails says "some of these records, missing, break the filesystem"; the
user wants to know which. Starting from the failing dropped set, we try to keep each dropped
record in turn (first halves of the set, then one record at a time, as in delta debugging) and
keep every reduction that still fails. The result is 1-minimal: putting back any single one of
its records makes the state pass (or at least stop failing). Each try is one build and one
check, so tries are bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from logwrites.crashstates import CrashState, reorder_id

log = logging.getLogger(__name__)

DEFAULT_MAX_TRIES: Final = 64


@dataclass(frozen=True, slots=True)
class Shrunk:
    state: CrashState       # the smallest failing state found
    tries: int              # states built and checked while shrinking
    minimal: bool           # False when the try budget ran out first


def with_dropped(state: CrashState, dropped: tuple[int, ...]) -> CrashState:
    """The reordered state with the same end and checkpoint, dropping only `dropped`."""
    dropped = tuple(sorted(dropped))
    return CrashState(reorder_id(state.end, dropped), "reorder", state.end, state.checkpoint,
                      state.epoch, dropped=dropped)


def shrink(state: CrashState, still_fails: Callable[[CrashState], bool],
           max_tries: int = DEFAULT_MAX_TRIES) -> Shrunk:
    """Reduce the dropped records of the failing reordered `state`.

    `still_fails(candidate)` builds and checks a candidate state; it must be True for a
    failure only (an error is not a failure worth shrinking towards).
    """
    if state.kind != "reorder":
        raise ValueError(f"only reordered states shrink, not {state.id}")
    dropped = list(state.dropped)
    tries = 0

    def attempt(candidate: list[int]) -> bool:
        nonlocal tries
        tries += 1
        fails = still_fails(with_dropped(state, tuple(candidate)))
        log.debug("shrink %s: dropping %s %s", state.id, candidate,
                  "still fails" if fails else "passes")
        return fails

    # Halves first: big sampled sets (half of a large epoch) shrink in log2(n) tries when one
    # record is to blame, instead of n.
    chunk = len(dropped) // 2
    while chunk >= 1 and len(dropped) > 1 and tries < max_tries:
        reduced = False
        for start in range(0, len(dropped), chunk):
            if tries >= max_tries:
                break
            candidate = dropped[start:start + chunk]
            if candidate and len(candidate) < len(dropped) and attempt(candidate):
                dropped, reduced = candidate, True
                break
        if not reduced:
            chunk //= 2
        else:
            chunk = min(chunk, len(dropped) // 2)
    # Then one record at a time: put each back; keep it back if the state still fails.
    i = 0
    while i < len(dropped) and len(dropped) > 1 and tries < max_tries:
        candidate = dropped[:i] + dropped[i + 1:]
        if attempt(candidate):
            dropped = candidate
        else:
            i += 1
    minimal = len(dropped) == 1 or i >= len(dropped)
    return Shrunk(with_dropped(state, tuple(dropped)), tries, minimal)


__all__ = ["Shrunk", "shrink", "with_dropped"]
