"""What was written to an image since a given moment: byte ranges, by generation.

The crash loop's cursor image is written by its `StateBuilder` alone (entries applied, a
state's writes undone) and by checkers that put back what they wrote. A checker that keeps
bytes it read from the cursor (the journal it scanned, the ranges e2fsck read) then needs to
compare only what was written since it read them, instead of all it keeps: `since(g)`.
Whoever writes the image some other way, or cannot say what it wrote, calls `forget()`.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Final

KEEP: Final = 1 << 16  # writes remembered; asking about an older moment gets None


class ImageChanges:
    """The writes made to one image, each stamped with a generation (a counter)."""

    def __init__(self, keep: int = KEEP) -> None:
        self.generation = 0
        self._floor = 0  # `since` a generation before this is not known
        self._writes: deque[tuple[int, int, int]] = deque()  # (generation, offset, length)
        self._keep = keep

    def wrote(self, offset: int, length: int) -> None:
        self.generation += 1
        self._writes.append((self.generation, offset, length))
        if len(self._writes) > self._keep:
            self._floor = self._writes.popleft()[0]

    def forget(self) -> None:
        """Anything may have changed (the image was rebuilt)."""
        self.generation += 1
        self._writes.clear()
        self._floor = self.generation

    def since(self, generation: int) -> Written | None:
        """The ranges written after `generation`, or None when that is no longer known."""
        if generation < self._floor:
            return None
        spans = []
        for g, offset, length in reversed(self._writes):
            if g <= generation:
                break
            spans.append((offset, offset + length))
        return Written(spans)


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) spans sorted, overlapping and adjoining ones joined."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


class Written:
    """A set of written byte ranges, merged, to ask which parts of a range were written."""

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        self._spans = merge_spans(spans)
        self._starts = [s for s, _ in self._spans]

    def __bool__(self) -> bool:
        return bool(self._spans)

    def within(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """The written parts of [offset, offset + length), as (offset, length)."""
        end = offset + length
        k = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while k < len(self._spans) and self._spans[k][0] < end:
            lo, hi = max(offset, self._spans[k][0]), min(end, self._spans[k][1])
            if lo < hi:
                yield lo, hi - lo
            k += 1

    def kept(self, pieces: Iterable[tuple[int, bytes]],
             read: Callable[[int, int], bytes]) -> bool:
        """Whether `read(offset, length)` still gives the bytes of `pieces` ((offset, bytes)
        read earlier) wherever this set was written: all that can have changed."""
        return all(read(at, n) == data[at - offset:at - offset + n]
                   for offset, data in pieces for at, n in self.within(offset, len(data)))


__all__ = ["ImageChanges", "Written", "merge_spans"]
