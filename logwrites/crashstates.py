"""Crash states of a log: which ones exist, in what order to build them, and their stable ids.

A crash state is "the base image plus some of the log" (DESIGN.md §4). Three kinds:

- prefix ``p:E`` — every entry up to and including entry E, for each E that is a FLUSH, FUA or
  MARK entry, and the end of the log (the dm-log-writes/replay-log model);
- reordered ``r:E:-i,-j`` — every entry up to E except the records i, j, ... which all belong to
  the flush epoch that E closes (E is the epoch's closing FLUSH/FUA entry, or the log's last
  entry for the volatile tail): within an epoch the device may persist any subset of records;
- torn ``t:I:K`` — every entry before I, then only the first K sectors (sectorsize units) of the
  multi-sector write I. A device tears a write only between its atomic write units (a
  physical block, commonly 4 KiB on a disk that takes 512-byte sectors): K falls on a unit
  boundary, and a write inside one unit is not torn. The unit defaults to one sector.

An *epoch* is the run of records (writes and discards) between two *durability points*: entries
carrying FLUSH or FUA. A durability point is never dropped: it is durable when it completes
(DESIGN.md §3.2-3.3). The ids name entries by their index in the log, so the same log always
yields the same ids and `logwrites replay LOG TARGET --state ID` rebuilds exactly that state.

This module is pure: entries in, states out. Building (statebuild) and checking (check) live
elsewhere.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from logwrites.errors import UsageError
from logwrites.format import Entry, EntryFlag
from logwrites.logfile import LogReader

log = logging.getLogger(__name__)

KINDS: Final = ("prefix", "reorder", "torn")
SETUP_MARK: Final = "mkfs"
DEFAULT_MAX_STATES: Final = 32  # per epoch, for reordered and for torn states

_ID_RE: Final = re.compile(
    r"^(?:p:(?P<p>\d+)|r:(?P<r>\d+):(?P<drop>-\d+(?:,-\d+)*)|t:(?P<t>\d+):(?P<k>\d+))$"
)


@dataclass(frozen=True, slots=True)
class Epoch:
    """Records between two durability points.

    `opens` is the index of the durability point before the records (-1: the base image);
    `closes` the index of the one after them (None: the volatile tail, never flushed).
    `records` are the write and discard entries in between, in log order.
    """

    number: int
    opens: int
    closes: int | None
    records: tuple[int, ...]


@dataclass(slots=True)
class LogMap:
    """What enumeration needs to know of a log: its entries (headers only) and their epochs."""

    sectorsize: int
    entries: list[Entry]
    epochs: list[Epoch] = field(default_factory=list)
    # epoch number of each entry (a durability point belongs to the epoch it closes)
    _epoch_of: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def from_entries(cls, entries: Iterable[Entry], sectorsize: int) -> LogMap:
        logmap = cls(sectorsize, list(entries))
        opens, records = -1, []
        for entry in logmap.entries:
            logmap._epoch_of.append(len(logmap.epochs))
            if entry.is_flush or entry.is_fua:
                logmap.epochs.append(Epoch(len(logmap.epochs), opens, entry.index,
                                           tuple(records)))
                opens, records = entry.index, []
            elif entry.nr_sectors > 0:
                records.append(entry.index)
        # The volatile tail: records after the last durability point that no flush covered
        # (DESIGN.md §3.6); an empty tail is still an epoch so every entry has one.
        logmap.epochs.append(Epoch(len(logmap.epochs), opens, None, tuple(records)))
        return logmap

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> LogMap:
        """Scan a log file's headers (payloads are not read).

        :raise LogFormatError: naming the entry where the log breaks.
        """
        with LogReader(path) as reader:
            return cls.from_entries(reader.entries(), reader.sectorsize)

    @property
    def last_index(self) -> int:
        return len(self.entries) - 1

    def epoch_of(self, entry_index: int) -> Epoch:
        return self.epochs[self._epoch_of[entry_index]]

    def checkpoint_before(self, entry_index: int) -> int:
        """The last durability point at or before `entry_index` (-1: the base image)."""
        epoch = self.epoch_of(entry_index)
        return entry_index if epoch.closes == entry_index else epoch.opens

    def mark_index(self, name: str) -> int | None:
        """The first entry holding the mark `name`, or None."""
        for entry in self.entries:
            if entry.is_mark and entry.mark == name:
                return entry.index
        return None

    def marks_around(self, entry_index: int) -> tuple[Entry | None, Entry | None]:
        """The nearest mark before and the nearest mark after `entry_index`."""
        before = next((e for e in reversed(self.entries[:entry_index]) if e.is_mark), None)
        after = next((e for e in self.entries[entry_index + 1:] if e.is_mark), None)
        return before, after


@dataclass(frozen=True, slots=True)
class CrashState:
    """One crash state: apply entries `<= end` except `dropped`, then `torn` if any.

    `checkpoint` is the durability point the state is built from (every entry up to it is
    applied whole, -1 being the base image): building starts from a copy of the image at that
    point and applies only entries after it.
    """

    id: str
    kind: str
    end: int
    checkpoint: int
    epoch: int
    dropped: tuple[int, ...] = ()
    torn: tuple[int, int] | None = None  # (entry index, sectors kept)

    @property
    def entry(self) -> int:
        """The entry the state is "at" for reports: its end, or the torn write."""
        return self.torn[0] if self.torn else self.end

    def local_entries(self) -> range:
        """Entries after the checkpoint that building applies (minus `dropped`)."""
        return range(self.checkpoint + 1, self.end + 1)


def prefix_id(end: int) -> str:
    return f"p:{end}"


def reorder_id(end: int, dropped: Iterable[int]) -> str:
    return f"r:{end}:" + ",".join(f"-{i}" for i in sorted(dropped))


def torn_id(index: int, sectors: int) -> str:
    return f"t:{index}:{sectors}"


def _droppable(logmap: LogMap, epoch: Epoch, start: int) -> list[int]:
    return [i for i in epoch.records if i > start]


def state_from_id(logmap: LogMap, state_id: str) -> CrashState:
    """Parse a printed id and check that it names a state of this log.

    :raise UsageError: for text that is not an id, or an id this log cannot have (entries out
        of range, dropped records outside the epoch that `end` closes, a torn entry that is not
        a multi-sector write).
    """
    m = _ID_RE.match(state_id.strip())
    if m is None:
        raise UsageError(f"{state_id!r} is not a crash state id (p:E, r:E:-i,-j or t:I:K)")
    last = logmap.last_index
    if m["p"] is not None:
        end = int(m["p"])
        if end > last:
            raise UsageError(f"state {state_id}: the log has entries 0..{last}")
        return CrashState(prefix_id(end), "prefix", end, logmap.checkpoint_before(end),
                          logmap.epoch_of(end).number)
    if m["r"] is not None:
        end = int(m["r"])
        dropped = tuple(sorted({int(x[1:]) for x in m["drop"].split(",")}))
        if end > last:
            raise UsageError(f"state {state_id}: the log has entries 0..{last}")
        epoch = logmap.epoch_of(end)
        if epoch.closes is None and end != last:
            raise UsageError(f"state {state_id}: entry {end} closes no epoch (a reordered "
                             f"state ends at a FLUSH/FUA entry or at the log's end)")
        if epoch.closes is not None and epoch.closes != end:
            raise UsageError(f"state {state_id}: entry {end} is not a FLUSH/FUA entry")
        records = set(epoch.records)
        stray = [i for i in dropped if i not in records]
        if stray:
            raise UsageError(f"state {state_id}: entries {stray} are not records of epoch "
                             f"{epoch.number} (entries {epoch.opens + 1}..{end})")
        return CrashState(reorder_id(end, dropped), "reorder", end, epoch.opens, epoch.number,
                          dropped=dropped)
    index, sectors = int(m["t"]), int(m["k"])
    if index > last:
        raise UsageError(f"state {state_id}: the log has entries 0..{last}")
    entry = logmap.entries[index]
    if not entry.is_write or entry.is_flush or entry.is_fua:
        raise UsageError(f"state {state_id}: entry {index} is not a write record")
    if not 0 < sectors < entry.nr_sectors:
        raise UsageError(f"state {state_id}: entry {index} has {entry.nr_sectors} sectors; "
                         f"a torn write keeps 1..{entry.nr_sectors - 1}")
    epoch = logmap.epoch_of(index)
    return CrashState(torn_id(index, sectors), "torn", index - 1, epoch.opens, epoch.number,
                      torn=(index, sectors))


def start_index(logmap: LogMap, *, from_start: bool = False, start_mark: str | None = None) -> int:
    """Where states begin: the mark `start_mark` (default `mkfs`), or -1 for the whole log.

    :raise UsageError: if a mark was asked for by name and the log does not have it.
    """
    if from_start:
        return -1
    name = start_mark or SETUP_MARK
    index = logmap.mark_index(name)
    if index is None:
        if start_mark is not None:
            raise UsageError(f"the log has no mark {start_mark!r}")
        log.info("the log has no %r mark: crash states start at its first entry", SETUP_MARK)
        return -1
    return index


class _Covering:
    """Whether a record's sectors are all rewritten by later kept records of its epoch.

    Dropping such a record gives the same image as keeping it, so a dropped set is reduced to
    its *canonical* form (without them) and duplicates are enumerated once.
    """

    def __init__(self, logmap: LogMap, records: Sequence[int]) -> None:
        self.extent = {i: (logmap.entries[i].sector,
                           logmap.entries[i].sector + logmap.entries[i].nr_sectors)
                       for i in records}
        self.records = list(records)

    def canonical(self, dropped: Iterable[int]) -> tuple[int, ...]:
        drop = set(dropped)
        keep_after: list[tuple[int, int]] = []  # extents of kept records after the current one
        result = []
        for i in reversed(self.records):
            start, end = self.extent[i]
            if i in drop:
                if not _covered(start, end, keep_after):
                    result.append(i)
            else:
                keep_after.append((start, end))
        return tuple(sorted(result))


def _covered(start: int, end: int, extents: list[tuple[int, int]]) -> bool:
    pos = start
    for s, e in sorted(x for x in extents if x[1] > start and x[0] < end):
        if s > pos:
            return False
        pos = max(pos, e)
        if pos >= end:
            return True
    return pos >= end


def _reorder_sets(records: list[int], budget: int, rng: random.Random) -> Iterable[tuple[int, ...]]:
    """Dropped sets for one epoch: every non-empty subset if they fit in `budget`, else the
    targeted ones (each single record, each in-epoch prefix) then seeded random subsets."""
    n = len(records)
    if n == 0 or budget <= 0:
        return
    if n < 31 and (1 << n) - 1 <= budget:
        for size in range(1, n + 1):
            yield from itertools.combinations(records, size)
        return
    targeted = [(i,) for i in records]
    targeted += [tuple(records[k:]) for k in range(n - 1)]  # crash after the k-th record
    if len(targeted) > budget:
        targeted = rng.sample(targeted, budget)
    yield from targeted
    for _ in range(budget * 4):  # bounded: random sets may repeat or be non-canonical
        picked = tuple(i for i in records if rng.random() < 0.5)
        if picked:
            yield picked


def check_kinds(kinds: Iterable[str]) -> None:
    """:raise UsageError: for a name that is not one of KINDS."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise UsageError(f"unknown state kinds {sorted(unknown)} (known: {', '.join(KINDS)})")


def enumerate_states(
    logmap: LogMap,
    kinds: Iterable[str] = ("prefix", "reorder"),
    *,
    start: int = -1,
    max_states: int = DEFAULT_MAX_STATES,
    seed: int = 0,
    atomic_sectors: int = 1,
) -> list[CrashState]:
    """Every crash state of the asked kinds that ends after entry `start`, in build order
    (by checkpoint, then by end entry), each once.

    `max_states` bounds the reordered states of one epoch and, separately, its torn states.
    Torn writes tear only at multiples of `atomic_sectors` on the device (`tear_points`).
    The same log, kinds, start, budget, seed and unit always give the same list.
    """
    kinds = set(kinds)
    check_kinds(kinds)
    states: dict[str, CrashState] = {}
    last = logmap.last_index
    if last < 0:
        return []
    if "prefix" in kinds:
        points = [e.index for e in logmap.entries
                  if (e.is_flush or e.is_fua or e.is_mark) and e.index >= start]
        if last >= start and (not points or points[-1] != last):
            points.append(last)
        for end in points:
            sid = prefix_id(end)
            states[sid] = CrashState(sid, "prefix", end, logmap.checkpoint_before(end),
                                     logmap.epoch_of(end).number)
    for epoch in logmap.epochs:
        records = _droppable(logmap, epoch, start)
        if not records:
            continue
        end = epoch.closes if epoch.closes is not None else last
        if "reorder" in kinds:
            rng = random.Random(f"{seed}:reorder:{end}")
            covering = _Covering(logmap, epoch.records)
            found: list[CrashState] = []
            for dropped in _reorder_sets(records, max_states, rng):
                canon = covering.canonical(dropped)
                if not canon:
                    continue
                sid = reorder_id(end, canon)
                if sid not in states:
                    states[sid] = CrashState(sid, "reorder", end, epoch.opens, epoch.number,
                                             dropped=canon)
                    found.append(states[sid])
                    if len(found) >= max_states:
                        break
        if "torn" in kinds:
            torn: list[tuple[int, int]] = []
            for i in records:
                entry = logmap.entries[i]
                if entry.is_write:
                    torn += [(i, k) for k in tear_points(entry, atomic_sectors)]
            if len(torn) > max_states:
                torn = sorted(random.Random(f"{seed}:torn:{end}").sample(torn, max_states))
            for i, k in torn:
                sid = torn_id(i, k)
                states[sid] = CrashState(sid, "torn", i - 1, epoch.opens, epoch.number,
                                         torn=(i, k))
    return sorted(states.values(), key=lambda s: (s.checkpoint, s.end, s.kind, s.dropped,
                                                  s.torn or (0, 0)))


def tear_points(entry: Entry, atomic_sectors: int = 1) -> list[int]:
    """How many sectors of write `entry` a torn state keeps: the first, middle and last
    boundary of an atomic write unit inside it (none for a write within one unit)."""
    n = entry.nr_sectors
    first = atomic_sectors - entry.sector % atomic_sectors
    boundaries = range(first, n, atomic_sectors)
    if not boundaries:
        return []
    middle = min(boundaries, key=lambda k: (abs(k - n // 2), k))
    return sorted({boundaries[0], middle, boundaries[-1]})


def atomic_sectors_of(logmap: LogMap, atomic_unit: int | None) -> int:
    """`atomic_unit` bytes in the log's sectors (1 when None).

    :raise UsageError: for a unit that is not a whole number of the log's sectors.
    """
    if atomic_unit is None:
        return 1
    if atomic_unit < logmap.sectorsize or atomic_unit % logmap.sectorsize:
        raise UsageError(f"--atomic-unit {atomic_unit}: must be a multiple of the log's "
                         f"sector size, {logmap.sectorsize} bytes")
    return atomic_unit // logmap.sectorsize


def describe_record(logmap: LogMap, index: int) -> dict[str, object]:
    """What a report says about one record: where it is, its epoch, the marks around it."""
    entry = logmap.entries[index]
    epoch = logmap.epoch_of(index)
    before, after = logmap.marks_around(index)
    return {
        "entry": index,
        "sector": entry.sector,
        "nr_sectors": entry.nr_sectors,
        "byte_offset": entry.sector * logmap.sectorsize,
        "discard": bool(entry.flags & EntryFlag.DISCARD),
        "epoch": epoch.number,
        "epoch_entries": [epoch.opens + 1, epoch.closes if epoch.closes is not None
                          else logmap.last_index],
        "mark_before": before.mark if before else None,
        "mark_after": after.mark if after else None,
    }


__all__ = [
    "KINDS",
    "SETUP_MARK",
    "CrashState",
    "Epoch",
    "LogMap",
    "describe_record",
    "enumerate_states",
    "start_index",
    "state_from_id",
]
