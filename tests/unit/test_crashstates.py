"""Crash-state enumeration and ids on synthetic logs (logwrites.crashstates)."""

from __future__ import annotations

import pytest

from logwrites.crashstates import (
    LogMap,
    atomic_sectors_of,
    enumerate_states,
    start_index,
    state_from_id,
    tear_points,
)
from logwrites.errors import UsageError

# entries:      0 mark mkfs, 1 w, 2 w, 3 flush, 4 w(2 sectors), 5 w, 6 d, 7 flush, 8 mark a,
#               9 w, 10 fua, 11 w  (11 is the volatile tail)
OPS = [("m", "mkfs"), ("w", 0, 1, 1), ("w", 1, 1, 2), ("f",),
       ("w", 2, 2, 3), ("w", 8, 1, 4), ("d", 20, 4), ("f",), ("m", "a"),
       ("w", 9, 1, 5), ("fua", 10, 1, 6), ("w", 11, 1, 7)]


@pytest.fixture
def logmap(make_log) -> LogMap:
    return LogMap.read(make_log(OPS))


def ids(states) -> list[str]:
    return [s.id for s in states]


def test_epochs_split_at_flush_and_fua(logmap: LogMap) -> None:
    shape = [(e.opens, e.closes, e.records) for e in logmap.epochs]
    assert shape == [(-1, 3, (1, 2)), (3, 7, (4, 5, 6)), (7, 10, (9,)), (10, None, (11,))]
    assert logmap.epoch_of(5).number == 1
    assert logmap.checkpoint_before(7) == 7
    assert logmap.checkpoint_before(8) == 7


def test_prefix_states_are_flush_fua_mark_and_end(logmap: LogMap) -> None:
    states = enumerate_states(logmap, ["prefix"])
    assert ids(states) == ["p:0", "p:3", "p:7", "p:8", "p:10", "p:11"]
    assert [s.checkpoint for s in states] == [-1, 3, 7, 7, 10, 10]


def test_reorder_states_are_every_subset_of_small_epochs(logmap: LogMap) -> None:
    states = enumerate_states(logmap, ["reorder"])
    by_end: dict[int, list[str]] = {}
    for s in states:
        by_end.setdefault(s.end, []).append(s.id)
    assert sorted(by_end[3]) == ["r:3:-1", "r:3:-1,-2", "r:3:-2"]
    assert len(by_end[7]) == 7  # 2^3 - 1 subsets of records 4, 5, 6
    assert by_end[10] == ["r:10:-9"]
    assert by_end[11] == ["r:11:-11"]  # the volatile tail ends at the log's last entry
    assert all(s.checkpoint == logmap.epoch_of(s.end).opens for s in states)


def test_start_mark_excludes_earlier_states(make_log) -> None:
    logmap = LogMap.read(make_log([("w", 0, 1, 1), ("f",), ("m", "mkfs"), ("w", 1, 1, 2),
                                   ("f",)]))
    start = start_index(logmap)
    assert start == 2
    # build order: by checkpoint (p:4 is its own checkpoint, r:4 starts from entry 1)
    assert ids(enumerate_states(logmap, ["prefix", "reorder"], start=start)) == [
        "p:2", "r:4:-3", "p:4"]
    wide = enumerate_states(logmap, ["prefix", "reorder"], start=start_index(logmap,
                                                                             from_start=True))
    assert "r:1:-0" in ids(wide) and "p:1" in ids(wide)
    with pytest.raises(UsageError, match="no mark 'nope'"):
        start_index(logmap, start_mark="nope")


def test_overwritten_records_are_not_enumerated_twice(make_log) -> None:
    # Record 1 is fully rewritten by record 2: dropping 1 alone changes nothing.
    logmap = LogMap.read(make_log([("m", "mkfs"), ("w", 0, 2, 1), ("w", 0, 2, 2), ("f",)]))
    assert sorted(ids(enumerate_states(logmap, ["reorder"]))) == ["r:3:-1,-2", "r:3:-2"]


def test_large_epochs_are_sampled_reproducibly_with_targeted_states(make_log) -> None:
    ops = [("m", "mkfs")] + [("w", i, 1, i % 250 + 1) for i in range(20)] + [("f",)]
    logmap = LogMap.read(make_log(ops))
    a = enumerate_states(logmap, ["reorder"], max_states=50, seed=7)
    b = enumerate_states(logmap, ["reorder"], max_states=50, seed=7)
    c = enumerate_states(logmap, ["reorder"], max_states=50, seed=8)
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert len(a) == 50
    singles = {s.dropped for s in a if len(s.dropped) == 1}
    assert singles == {(i,) for i in range(1, 21)}  # each single record dropped
    assert (11, *range(12, 21)) in {s.dropped for s in a}  # an in-epoch prefix


def test_torn_states_keep_part_of_multi_sector_writes(logmap: LogMap) -> None:
    torn = enumerate_states(logmap, ["torn"])
    assert ids(torn) == ["t:4:1"]
    assert torn[0].end == 3 and torn[0].torn == (4, 1)


def test_an_atomic_unit_tears_only_at_its_boundaries(make_log) -> None:
    # 512-byte sectors, 4 KiB unit (8 sectors): entry 1 fits one unit, entry 2 spans three
    # aligned units, entry 3 starts mid-unit and crosses one boundary.
    ops = [("m", "mkfs"), ("w", 0, 8, 1), ("w", 16, 24, 2), ("w", 44, 8, 3), ("f",)]
    logmap = LogMap.read(make_log(ops))
    entries = logmap.entries
    assert tear_points(entries[1], 8) == []
    assert tear_points(entries[2], 8) == [8, 16]
    assert tear_points(entries[3], 8) == [4]
    assert tear_points(entries[2]) == [1, 12, 23]       # one sector: first, middle, last
    assert ids(enumerate_states(logmap, ["torn"], atomic_sectors=8)) == [
        "t:2:8", "t:2:16", "t:3:4"]
    assert len(enumerate_states(logmap, ["torn"])) == 3 + 3 + 3
    assert atomic_sectors_of(logmap, None) == 1 and atomic_sectors_of(logmap, 4096) == 8
    with pytest.raises(UsageError, match="multiple of the log's sector size, 512"):
        atomic_sectors_of(logmap, 256)
    big = LogMap.read(make_log([("m", "mkfs"), ("w", 0, 2, 1)], sectorsize=4096, name="4k.log"))
    with pytest.raises(UsageError, match="sector size, 4096"):
        atomic_sectors_of(big, 2048)


def test_ids_round_trip(logmap: LogMap) -> None:
    for state in enumerate_states(logmap, ["prefix", "reorder", "torn"]):
        assert state_from_id(logmap, state.id) == state


@pytest.mark.parametrize("bad, why", [
    ("x:1", "not a crash state id"),
    ("p:99", "entries 0..11"),
    ("r:5:-4", "not a FLUSH/FUA entry"),
    ("r:7:-2", "not records of epoch 1"),
    ("r:7:-7", "not records of epoch 1"),
    ("t:5:1", "keeps 1..0"),
    ("t:3:1", "not a write record"),
])
def test_bad_ids_say_why(logmap: LogMap, bad: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        state_from_id(logmap, bad)


def test_unknown_kind_is_a_usage_error(logmap: LogMap) -> None:
    with pytest.raises(UsageError, match="unknown state kinds"):
        enumerate_states(logmap, ["prefix", "sideways"])
