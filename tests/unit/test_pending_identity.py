"""The pending journal's identities (vhost/pending.py): which requests a resumed backend treats
as done when libvhost-user resubmits them — the windows a kill can hit, and the epoch that
keeps a restarted in-flight counter from naming an older request."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from logwrites.logfile import LogReader, LogWriter
from vhost import pending
from vhost.ordering import FUA, make_sink

SS = 512


class FakeConnection:
    """What JournaledSink reads of a vhost-user connection: the popped request's identity,
    whether the queue tracks in-flight requests, and the resubmissions it is told are done."""

    def __init__(self) -> None:
        self.dev = SimpleNamespace(cur_qidx=0, cur_head=0, cur_counter=0)
        self.expected: list[tuple[int, int, int]] = []
        self.on_queue_resumed = None

    def inflight(self, qidx: int) -> bool:
        return True

    def expect(self, qidx: int, head: int, counter: int) -> None:
        self.expected.append((qidx, head, counter))

    def pop(self, head: int, counter: int, qidx: int = 0) -> None:
        self.dev.cur_qidx, self.dev.cur_head, self.dev.cur_counter = qidx, head, counter


def backend(log: Path, journal: pending.Journal | None = None
            ) -> tuple[pending.JournaledSink, FakeConnection]:
    """A (re)started backend on `log`: a journaled sink, restored, with a connection."""
    writer = LogWriter.resume(log) if journal is not None else LogWriter.create(log, SS)
    sink = pending.JournaledSink(make_sink("logwrites", writer), pending.journal_path(log))
    sink.restore(journal if journal is not None else pending.Journal())
    conn = FakeConnection()
    sink.attach(conn)  # type: ignore[arg-type]
    return sink, conn


def write(sink: pending.JournaledSink, conn: FakeConnection, head: int, counter: int,
          sector: int, fill: int, flags: int = 0) -> None:
    conn.pop(head, counter)
    sink.completed(sector, 8, flags, [memoryview(bytes([fill]) * 8 * SS)])


def killed(log: Path) -> pending.Journal:
    """What a backend restarted after a SIGKILL loads (the page cache has every write)."""
    return pending.load(pending.journal_path(log), log)


def logged_writes(log: Path) -> list[int]:
    with LogReader(log) as reader:
        return [e.sector for e in reader.entries() if e.nr_sectors and not e.is_discard]


def test_killed_between_published_and_publication_is_done_when_resubmitted(
        tmp_path: Path) -> None:
    log = tmp_path / "log"
    sink, conn = backend(log)
    sink.queue_resumed(0, [])
    write(sink, conn, head=3, counter=0, sector=0, fill=1)
    write(sink, conn, head=4, counter=1, sector=8, fill=2)
    sink.batch_end()            # published offset moved; the kill comes before publication
    journal = killed(log)
    assert [r[0] for r in journal.records] == [0, 8]
    assert journal.done == {(0, 3): (0, 1), (0, 4): (1, 1)}
    sink2, conn2 = backend(log, journal)
    # libvhost-user resubmits both (head 3 then 4) and one it never completed (head 5).
    sink2.queue_resumed(0, [(3, 0), (4, 1), (5, 2)])
    assert conn2.expected == [(0, 3, 0), (0, 4, 1)]
    write(sink2, conn2, head=5, counter=2, sector=16, fill=3)
    sink2.batch_end()
    ticket = sink2.flush_taken()
    sink2.flush_durable(ticket)
    sink2.close()
    assert logged_writes(log) == [0, 8, 16]      # each once


def test_records_after_published_come_again_and_are_not_done(tmp_path: Path) -> None:
    log = tmp_path / "log"
    sink, conn = backend(log)
    sink.queue_resumed(0, [])
    write(sink, conn, head=1, counter=0, sector=0, fill=1)
    sink.batch_end()
    write(sink, conn, head=2, counter=1, sector=8, fill=2)   # killed before its batch_end
    journal = killed(log)
    assert [r[0] for r in journal.records] == [0]
    assert (0, 2) not in journal.done
    sink2, conn2 = backend(log, journal)
    sink2.queue_resumed(0, [(2, 1)])
    assert conn2.expected == []                  # served again, journaled, logged once


def test_flush_of_an_unpublished_batch_leaves_its_writes_done(tmp_path: Path) -> None:
    log = tmp_path / "log"
    sink, conn = backend(log)
    sink.queue_resumed(0, [])
    write(sink, conn, head=1, counter=0, sector=0, fill=1)
    sink.batch_end()                             # published
    write(sink, conn, head=2, counter=1, sector=8, fill=2)
    ticket = sink.flush_taken()                  # a FLUSH in the same batch as head 2
    sink.inner.flush_durable(ticket)             # killed after the log commit, before reset
    journal = killed(log)
    assert journal.records == []                 # the list is in the log
    assert journal.done[(0, 2)] == (1, 1)
    sink2, conn2 = backend(log, journal)
    sink2.queue_resumed(0, [(2, 1), (7, 2)])     # head 2 and the FLUSH (head 7)
    assert conn2.expected == [(0, 2, 1)]
    assert logged_writes(log) == [0, 8]


def test_a_reset_keeps_the_batch_identities(tmp_path: Path) -> None:
    log = tmp_path / "log"
    sink, conn = backend(log)
    sink.queue_resumed(0, [])
    write(sink, conn, head=2, counter=0, sector=8, fill=2)
    sink.flush_durable(sink.flush_taken())       # journal reset mid-batch
    write(sink, conn, head=3, counter=1, sector=16, fill=3)
    sink.batch_end()                             # killed before publication
    journal = killed(log)
    assert [r[0] for r in journal.records] == [16]
    assert journal.done == {(0, 2): (0, 1), (0, 3): (1, 1)}


def test_fua_write_is_done_only_once_its_entry_counts(tmp_path: Path) -> None:
    log = tmp_path / "log"
    sink, conn = backend(log)
    sink.queue_resumed(0, [])
    write(sink, conn, head=1, counter=0, sector=0, fill=1, flags=FUA)
    assert (0, 1) not in killed(log).done        # appended, not counted yet
    sink.batch_end()                             # committed, then killed
    assert killed(log).done == {(0, 1): (0, 1)}


def test_a_restarted_counter_does_not_match_an_older_request(tmp_path: Path) -> None:
    log = tmp_path / "log"
    sink, conn = backend(log)
    sink.queue_resumed(0, [])
    write(sink, conn, head=3, counter=0, sector=0, fill=1)
    sink.batch_end()                             # killed before publication
    sink2, conn2 = backend(log, killed(log))
    sink2.queue_resumed(0, [(3, 0)])             # resubmitted and done: completed unseen
    assert conn2.expected == [(0, 3, 0)]
    # That backend dies with nothing in flight; the next starts a new epoch, its counter at 0.
    sink3, conn3 = backend(log, killed(log))
    sink3.queue_resumed(0, [])
    write(sink3, conn3, head=3, counter=0, sector=64, fill=9)   # same head, same counter
    journal = killed(log)                        # killed before its batch_end
    sink4, conn4 = backend(log, journal)
    sink4.queue_resumed(0, [(3, 0)])             # a different request than the first
    assert conn4.expected == []
    assert journal.epochs[0] == 2


class Killed(BaseException):
    """A SIGKILL at that instant: nothing after it runs."""


@pytest.mark.parametrize("at", ["pwrite", "rename"])
def test_a_kill_during_the_reset_leaves_a_whole_journal(tmp_path: Path, at: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "log"
    sink, conn = backend(log)
    sink.queue_resumed(0, [])
    write(sink, conn, head=1, counter=0, sector=0, fill=1)
    sink.batch_end()                             # published
    write(sink, conn, head=2, counter=1, sector=8, fill=2)
    write(sink, conn, head=3, counter=2, sector=16, fill=3)

    def kill(*args: object) -> None:
        raise Killed

    # The FLUSH is in the log; the kill comes at the reset's first `at` (the journal's only:
    # the log writer's own calls are not the journal's).
    monkeypatch.setattr(pending, "os", SimpleNamespace(**{**vars(os), at: kill}))
    with pytest.raises(Killed):
        sink.flush_durable(sink.flush_taken())
    monkeypatch.undo()
    journal = killed(log)
    assert journal.records == []                 # the list is in the log
    assert journal.done == {(0, 1): (0, 1), (0, 2): (1, 1), (0, 3): (2, 1)}
    sink2, conn2 = backend(log, journal)
    sink2.queue_resumed(0, [(2, 1), (3, 2), (7, 3)])     # heads 2, 3 and the FLUSH (7)
    assert conn2.expected == [(0, 2, 1), (0, 3, 2)]
    sink2.close()
    assert logged_writes(log) == [0, 8, 16]      # each once
    assert not pending.journal_path(log).exists()
