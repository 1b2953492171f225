"""Replay against a naive reference, property-based: random logs of overlapping writes (small
ones read from the reader's chunk, big ones copied in the kernel), discards, write-zeroes,
flushes, FUA writes and marks, replayed with random limits, start points, resumes and check
points, must leave exactly the image that applying the same operations one by one leaves.

The reference knows nothing of the log format or of the replay engine: it applies the list of
operations that the log was written from to a bytearray.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logwrites.format import Entry, EntryFlag
from logwrites.logfile import BUFFERED_PAYLOAD, LogReader
from logwrites.replay import replay, replay_entries, resolve_start
from tests.unit import test_replay as replay_cases

IMAGE_SECTORS = 160  # sectorsize units; small enough for many examples, big enough to overlap

Op = tuple  # ("w", sector, nr, seed, flags) | ("z", sector, nr) | ("d", sector, nr)
            # | ("f",) | ("m", name)


def payload(seed: int, nbytes: int) -> bytes:
    """Distinct, position-dependent bytes: a write landing at the wrong place shows."""
    unit = bytes((seed * 31 + i * 7) & 0xFF for i in range(251))
    return (unit * (nbytes // len(unit) + 1))[:nbytes]


def ops_strategy(sectorsize: int) -> st.SearchStrategy[list[Op]]:
    # Big enough to take the kernel-copy path at either sector size, and still fit the image.
    big = BUFFERED_PAYLOAD // sectorsize + 1
    assert big <= IMAGE_SECTORS

    @st.composite
    def extent(draw: st.DrawFn, longest: int, shortest: int = 1) -> tuple[int, int]:
        nr = draw(st.integers(shortest, min(longest, IMAGE_SECTORS)))
        return draw(st.integers(0, IMAGE_SECTORS - nr)), nr

    write = st.builds(lambda e, seed, fua: ("w", e[0], e[1], seed,
                                            EntryFlag.FUA if fua else EntryFlag(0)),
                      extent(8), st.integers(0, 255), st.booleans())
    big_write = st.builds(lambda e, seed: ("w", e[0], e[1], seed, EntryFlag(0)),
                          extent(2 * big, big), st.integers(0, 255))
    zeroes = st.builds(lambda e: ("z", *e), extent(8))
    discard = st.builds(lambda e: ("d", *e), extent(IMAGE_SECTORS))
    flush = st.just(("f",))
    mark = st.just(("m",))  # named below, so that names are unique
    one = st.one_of(write, write, write, big_write, zeroes, discard, flush, mark)

    def name_marks(ops: list[Op]) -> list[Op]:
        return [("m", f"m{i}") if op[0] == "m" else op for i, op in enumerate(ops)]

    return st.lists(one, min_size=1, max_size=40).map(name_marks)


def build_log(path: Path, sectorsize: int, ops: list[Op]) -> None:
    replay_cases.build_log(path, sectorsize, ops, fill=payload)


def reference(base: bytes, sectorsize: int, ops: list[Op]) -> bytes:
    """The image after applying `ops` one by one, in order."""
    return replay_cases.model(base, sectorsize, ops, fill=payload)


def base_image(sectorsize: int) -> bytes:
    return payload(1000, IMAGE_SECTORS * sectorsize)


@contextmanager
def workdir() -> Iterator[Path]:
    # hypothesis runs many examples per test: a fresh directory each, not pytest's tmp_path.
    with tempfile.TemporaryDirectory(prefix="lw-replay-prop-") as name:
        yield Path(name)


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(data=st.data(), sectorsize=st.sampled_from([512, 4096]))
def test_replay_with_limit_and_start_equals_reference(data: st.DataObject,
                                                      sectorsize: int) -> None:
    ops = data.draw(ops_strategy(sectorsize))
    start = data.draw(st.integers(0, len(ops)), label="start")
    limit = data.draw(st.none() | st.integers(0, len(ops) + 2), label="limit")
    known_block = data.draw(st.booleans(), label="start block known")
    base = base_image(sectorsize)
    with workdir() as tmp:
        log_path, target = tmp / "log", tmp / "target.img"
        build_log(log_path, sectorsize, ops)
        # The image as it stood at the start point, then the replay from there.
        target.write_bytes(reference(base, sectorsize, ops[:start]))
        block = None
        if known_block:
            with LogReader(log_path) as reader:
                block = resolve_start(reader, start_entry=start)[1]
        result = replay(log_path, target, start_entry=start, start_block=block, limit=limit)
        end = len(ops) if limit is None else min(len(ops), start + limit)
        assert result.entries == end - start
        assert result.next_index == end
        assert target.read_bytes() == reference(base, sectorsize, ops[:end])


@SETTINGS
@given(data=st.data(), sectorsize=st.sampled_from([512, 4096]))
def test_start_mark_and_end_mark_equal_reference(data: st.DataObject, sectorsize: int) -> None:
    ops = data.draw(ops_strategy(sectorsize))
    marks = [i for i, op in enumerate(ops) if op[0] == "m"]
    base = base_image(sectorsize)
    with workdir() as tmp:
        log_path, target = tmp / "log", tmp / "target.img"
        build_log(log_path, sectorsize, ops)
        start = 0
        start_mark = None
        if marks and data.draw(st.booleans(), label="from a mark"):
            at = data.draw(st.sampled_from(marks), label="start mark")
            start_mark, start = ops[at][1], at + 1  # replay-log starts just after the mark
        later = [i for i in marks if i >= start]
        end_mark = None
        end = len(ops)
        if later and data.draw(st.booleans(), label="to a mark"):
            at = data.draw(st.sampled_from(later), label="end mark")
            end_mark, end = ops[at][1], at + 1  # through the mark
        target.write_bytes(reference(base, sectorsize, ops[:start]))
        result = replay(log_path, target, start_mark=start_mark, end_mark=end_mark)
        assert (result.start_index, result.next_index) == (start, end)
        assert target.read_bytes() == reference(base, sectorsize, ops[:end])


@SETTINGS
@given(data=st.data(), sectorsize=st.sampled_from([512, 4096]))
def test_replay_entries_in_random_steps_equals_reference(data: st.DataObject,
                                                         sectorsize: int) -> None:
    """The crash-state builder's way: one open log and target, many short replays, each
    leaving exactly the image at its end."""
    ops = data.draw(ops_strategy(sectorsize))
    steps = data.draw(st.lists(st.integers(0, 12), min_size=1, max_size=12), label="steps")
    base = base_image(sectorsize)
    with workdir() as tmp:
        log_path, target = tmp / "log", tmp / "target.img"
        build_log(log_path, sectorsize, ops)
        target.write_bytes(base)
        fd = os.open(target, os.O_WRONLY)
        try:
            with LogReader(log_path) as reader:
                index, block = 0, 1
                for step in [*steps, len(ops)]:
                    result = replay_entries(reader, fd, index, block, step)
                    assert result.entries == min(step, len(ops) - index)
                    index, block = result.next_index, result.next_block
                    assert target.read_bytes() == reference(base, sectorsize, ops[:index])
        finally:
            os.close(fd)
        assert index == len(ops)


@SETTINGS
@given(data=st.data(), sectorsize=st.sampled_from([512, 4096]))
def test_every_check_point_sees_exactly_its_prefix(data: st.DataObject,
                                                   sectorsize: int) -> None:
    """`--check N|flush|fua`: at each check the target is the image after that entry, not a
    mixture; the checker reads the target itself."""
    ops = data.draw(ops_strategy(sectorsize))
    check = data.draw(st.sampled_from(["flush", "fua"]) | st.integers(1, 5), label="check")
    base = base_image(sectorsize)
    with workdir() as tmp:
        log_path, target = tmp / "log", tmp / "target.img"
        build_log(log_path, sectorsize, ops)
        target.write_bytes(base)
        seen: list[int] = []

        def checker(entry: Entry) -> str | None:
            seen.append(entry.index)
            if target.read_bytes() != reference(base, sectorsize, ops[: entry.index + 1]):
                return f"image differs from the reference after entry {entry.index}"
            return None

        result = replay(log_path, target, check=check, checker=checker)
        if check == "flush":
            expected = [i for i, op in enumerate(ops) if op[0] == "f"]
        elif check == "fua":
            expected = [i for i, op in enumerate(ops) if op[0] == "w" and op[4]]
        else:
            expected = list(range(check - 1, len(ops), check))
        assert seen == expected
        assert result.checks == len(expected)
        assert target.read_bytes() == reference(base, sectorsize, ops)
