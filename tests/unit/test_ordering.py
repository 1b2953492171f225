"""The log-writes filter with synthetic completions (DESIGN.md §3): what is logged, in what
order, and when the log is durable."""

from __future__ import annotations

from pathlib import Path

import pytest

from logwrites.format import END_MARK, EntryFlag
from logwrites.logfile import LogFullError, LogReader, LogWriter
from vhost.ordering import (
    DISCARD,
    FUA,
    ImmediateSink,
    LogWritesSink,
    NoLogError,
    PassthroughSink,
    make_sink,
)

SECTORSIZE = 512


def payload(byte: int, nr_sectors: int = 1, sectorsize: int = SECTORSIZE) -> bytes:
    return bytes([byte]) * (nr_sectors * sectorsize)


def summary(path: Path) -> list[tuple]:
    """Counted entries as (kind, sector, nr_sectors, first payload byte or mark name)."""
    out: list[tuple] = []
    with LogReader(path) as reader:
        for e in reader.entries():
            if e.is_mark:
                out.append(("mark", e.mark))
            elif e.is_discard:
                out.append(("discard", e.sector, e.nr_sectors))
            elif e.is_flush and not e.nr_sectors:
                out.append(("flush",))
            else:
                data = reader.read_payload(e)
                assert data == data[:1] * len(data)
                out.append(("fua" if e.is_fua else "w", e.sector, e.nr_sectors, data[0]))
    return out


def counted(path: Path) -> int:
    with LogReader(path) as reader:
        return reader.nr_entries


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "log"


@pytest.fixture
def sink(log_path: Path) -> LogWritesSink:
    return LogWritesSink(LogWriter.create(log_path, SECTORSIZE))


def test_seed_example_late_completion_waits_for_the_next_flush(sink: LogWritesSink,
                                                               log_path: Path) -> None:
    # W1, W2, W3 submitted; C3, C2; FLUSH taken; C1; the flush completes.
    sink.completed(30, 1, 0, [payload(3)])
    sink.completed(20, 1, 0, [payload(2)])
    ticket = sink.flush_taken()
    sink.completed(10, 1, 0, [payload(1)])
    flush_index = sink.flush_durable(ticket)
    assert flush_index == 2
    assert summary(log_path) == [("w", 30, 1, 3), ("w", 20, 1, 2), ("flush",)]
    assert sink.unflushed == 1                       # W1 waits for the next flush
    sink.flush_durable(sink.flush_taken())
    assert summary(log_path)[3:] == [("w", 10, 1, 1), ("flush",)]
    assert sink.flushes == 2


def test_nothing_is_counted_before_a_flush(sink: LogWritesSink, log_path: Path) -> None:
    sink.completed(0, 2, 0, [payload(7, 2)])
    sink.batch_end()
    assert counted(log_path) == 0 and sink.entries == 0 and sink.unflushed == 1
    sink.flush_durable(sink.flush_taken())
    assert counted(log_path) == 2


def test_payload_is_logged_before_the_guest_reuses_its_buffer(sink: LogWritesSink,
                                                              log_path: Path) -> None:
    guest_buffer = bytearray(payload(5, 2))
    view = memoryview(guest_buffer)
    sink.completed(4, 2, 0, [view[:512], view[512:]])
    guest_buffer[:] = payload(9, 2)                  # the guest reuses its buffer
    sink.flush_durable(sink.flush_taken())
    assert summary(log_path) == [("w", 4, 2, 5), ("flush",)]


def test_write_through_writes_go_first_with_fua(sink: LogWritesSink, log_path: Path) -> None:
    sink.completed(1, 1, 0, [payload(1)])            # cached write, waits for a flush
    sink.completed(2, 1, FUA, [payload(2)])          # write-through: logged at once
    sink.batch_end()
    assert summary(log_path) == [("fua", 2, 1, 2)]
    assert counted(log_path) == 1                    # durable before the batch is published
    sink.flush_durable(sink.flush_taken())
    assert summary(log_path) == [("fua", 2, 1, 2), ("w", 1, 1, 1), ("flush",)]


def test_discards_and_zeroes_keep_their_order_with_writes(sink: LogWritesSink,
                                                         log_path: Path) -> None:
    sink.completed(8, 4, 0, [payload(1, 4)])
    sink.completed(8, 4, DISCARD, None)
    sink.completed(10, 2, 0, None)                   # write-zeroes
    sink.completed(9, 1, 0, [payload(2)])
    sink.flush_durable(sink.flush_taken())
    assert summary(log_path) == [("w", 8, 4, 1), ("discard", 8, 4), ("w", 10, 2, 0),
                                 ("w", 9, 1, 2), ("flush",)]


def test_mark_goes_ahead_of_the_unflushed_list(sink: LogWritesSink, log_path: Path) -> None:
    sink.completed(1, 1, 0, [payload(1)])
    sink.flush_durable(sink.flush_taken())
    sink.completed(2, 1, 0, [payload(2)])
    index = sink.mark("after-first")
    assert index == 2 and counted(log_path) == 3     # durable when mark() returns
    sink.flush_durable(sink.flush_taken())
    assert summary(log_path) == [("w", 1, 1, 1), ("flush",), ("mark", "after-first"),
                                 ("w", 2, 1, 2), ("flush",)]


def test_records_reach_the_file_at_completion_but_only_a_flush_counts_them(
        sink: LogWritesSink, log_path: Path) -> None:
    sink.completed(1, 8, 0, [payload(1, 8)])
    sink.completed(9, 2, DISCARD, None)
    assert log_path.stat().st_size == 512 + (512 + 8 * 512) + 512
    assert counted(log_path) == 0 and sink.entries == 0 and sink.unflushed == 2
    # A backend killed now leaves a valid, empty log; a resumed writer drops the records
    # exactly as dm-log-writes loses its in-memory unflushed list.
    resumed = LogWriter.resume(log_path)
    assert (resumed.next_index, resumed.next_block) == (0, 1)
    resumed.close()


def test_mark_ahead_of_megabytes_of_records_moves_them_intact(sink: LogWritesSink,
                                                             log_path: Path) -> None:
    big = 3 * 1024                                   # 1.5 MiB records: the move is chunked
    for n in range(3):
        sink.completed(n * big, big, 0, [payload(n + 1, big)])
    assert sink.mark("ahead") == 0 and counted(log_path) == 1
    sink.completed(10 * big, 1, FUA, [payload(9)])   # write-through, also ahead of the list
    sink.batch_end()
    assert counted(log_path) == 2
    sink.flush_durable(sink.flush_taken())
    assert summary(log_path) == [("mark", "ahead"), ("fua", 10 * big, 1, 9),
                                 *[("w", n * big, big, n + 1) for n in range(3)], ("flush",)]


def test_a_mark_that_does_not_fit_moves_nothing(log_path: Path) -> None:
    # Room for the super block and one record, not for an entry more.
    writer = LogWriter.create(log_path, SECTORSIZE, max_bytes=512 + (512 + 2 * 512))
    sink = LogWritesSink(writer)
    sink.completed(4, 2, 0, [payload(4, 2)])
    with pytest.raises(LogFullError):
        sink.mark("no-room")
    assert sink.unflushed == 1 and counted(log_path) == 0
    writer.max_bytes = None                          # the user made room
    sink.flush_durable(sink.flush_taken())
    assert summary(log_path) == [("w", 4, 2, 4), ("flush",)]


def image_sync_failed() -> None:
    raise OSError(5, "Input/output error")


@pytest.mark.parametrize("mode", ["logwrites", "immediate"])
def test_a_flush_whose_image_sync_failed_counts_nothing(log_path: Path, mode: str) -> None:
    sink = make_sink(mode, LogWriter.create(log_path, SECTORSIZE))
    sink.completed(1, 1, 0, [payload(1)])
    with pytest.raises(OSError):
        sink.flush_durable(sink.flush_taken(), image_sync_failed)
    assert counted(log_path) == 0 and sink.flushes == 0
    sink.completed(2, 1, 0, [payload(2)])
    assert sink.flush_durable(sink.flush_taken(), lambda: None) == 2
    assert summary(log_path) == [("w", 1, 1, 1), ("w", 2, 1, 2), ("flush",)]


@pytest.mark.parametrize("mode", ["logwrites", "immediate"])
def test_retract_takes_the_last_record_back(log_path: Path, mode: str) -> None:
    sink = make_sink(mode, LogWriter.create(log_path, SECTORSIZE))
    sink.completed(1, 1, 0, [payload(1)])
    sink.completed(2, 4, 0, [payload(2, 4)])         # its image write failed after all
    sink.retract()
    sink.completed(3, 1, 0, [payload(3)])            # takes the room of the retracted one
    sink.flush_durable(sink.flush_taken())
    assert summary(log_path) == [("w", 1, 1, 1), ("w", 3, 1, 3), ("flush",)]
    assert sink.log_bytes == 512 + 2 * 1024 + 512


def test_only_uncounted_entries_move(log_path: Path) -> None:
    writer = LogWriter.create(log_path, SECTORSIZE)
    writer.append_flush()
    writer.commit()
    with pytest.raises(ValueError):
        writer.insert(0, 1, bytes(SECTORSIZE), (), 0)
    with pytest.raises(ValueError):
        writer.commit(count=0)
    writer.close()


@pytest.mark.parametrize("name", ["", "two words", "tab\tname", "x" * 480])
def test_bad_mark_names_are_refused_and_log_nothing(sink: LogWritesSink, log_path: Path,
                                                    name: str) -> None:
    with pytest.raises(ValueError):
        sink.mark(name)
    assert sink.entries == 0 and counted(log_path) == 0


def test_volatile_tail_then_end_mark(sink: LogWritesSink, log_path: Path) -> None:
    sink.completed(1, 1, 0, [payload(1)])
    sink.flush_durable(sink.flush_taken())
    sink.completed(2, 1, 0, [payload(2)])
    sink.completed(3, 1, DISCARD, None)
    sink.guest_gone()
    # The tail is counted (durable) with no FLUSH after it.
    assert summary(log_path) == [("w", 1, 1, 1), ("flush",), ("w", 2, 1, 2), ("discard", 3, 1)]
    assert counted(log_path) == 4 and sink.unflushed == 0
    sink.completed(4, 1, 0, [payload(4)])            # a new guest connects and writes
    sink.close()
    assert summary(log_path)[4:] == [("w", 4, 1, 4), ("mark", END_MARK)]


def test_two_flushes_in_flight_carry_disjoint_records(sink: LogWritesSink,
                                                      log_path: Path) -> None:
    sink.completed(1, 1, 0, [payload(1)])
    first = sink.flush_taken()
    sink.completed(2, 1, 0, [payload(2)])
    second = sink.flush_taken()
    sink.flush_durable(first)
    sink.flush_durable(second)
    assert summary(log_path) == [("w", 1, 1, 1), ("flush",), ("w", 2, 1, 2), ("flush",)]


def test_sector_size_4096_counts_entries_in_4096_units(tmp_path: Path) -> None:
    path = tmp_path / "log4k"
    sink = LogWritesSink(LogWriter.create(path, 4096))
    sink.completed(3, 2, 0, [payload(6, 2, 4096)])
    sink.flush_durable(sink.flush_taken())
    with LogReader(path) as reader:
        entries = list(reader.entries())
        assert reader.sectorsize == 4096
        assert (entries[0].sector, entries[0].nr_sectors) == (3, 2)
        assert reader.read_payload(entries[0]) == payload(6, 2, 4096)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def entry(self, index: int, flags: int) -> None:
        self.events.append(("entry", index, EntryFlag(flags)))

    def flush(self, index: int, count: int) -> None:
        self.events.append(("flush", index, count))

    def mark(self, index: int, name: str) -> None:
        self.events.append(("mark", index, name))


def test_observer_sees_entries_flushes_and_marks(sink: LogWritesSink) -> None:
    recorder = Recorder()
    sink.observer = recorder
    sink.completed(1, 1, 0, [payload(1)])
    assert recorder.events == []                     # parked records are not entries yet
    sink.flush_durable(sink.flush_taken())
    sink.mark("m1")
    assert recorder.events == [("entry", 0, EntryFlag(0)), ("entry", 1, EntryFlag.FLUSH),
                               ("flush", 1, 1), ("entry", 2, EntryFlag.MARK),
                               ("mark", 2, "m1")]


def test_immediate_mode_logs_at_completion(log_path: Path) -> None:
    sink = ImmediateSink(LogWriter.create(log_path, SECTORSIZE))
    sink.completed(30, 1, 0, [payload(3)])
    sink.completed(20, 1, 0, [payload(2)])
    ticket = sink.flush_taken()
    sink.completed(10, 1, 0, [payload(1)])
    sink.flush_durable(ticket)
    # Like blklogwrites: completion order, the flush after everything completed before it.
    assert summary(log_path) == [("w", 30, 1, 3), ("w", 20, 1, 2), ("w", 10, 1, 1),
                                 ("flush",)]
    sink.close()
    assert summary(log_path)[-1] == ("mark", END_MARK)


def test_passthrough_logs_nothing_and_refuses_marks() -> None:
    sink = PassthroughSink()
    sink.completed(1, 1, 0, [payload(1)])
    sink.flush_durable(sink.flush_taken())
    assert sink.entries == 0 and sink.flushes == 1
    with pytest.raises(NoLogError):
        sink.mark("m")


def test_make_sink_chooses_once(log_path: Path) -> None:
    writer = LogWriter.create(log_path, SECTORSIZE)
    assert isinstance(make_sink("logwrites", writer), LogWritesSink)
    assert isinstance(make_sink("immediate", writer), ImmediateSink)
    assert isinstance(make_sink("passthrough", None), PassthroughSink)
    with pytest.raises(ValueError):
        make_sink("sometimes", writer)
