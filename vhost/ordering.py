"""The log-writes filter: what goes into the log, and when (DESIGN.md §3).

It knows no virtqueues. The device tells it that a request *completed* (its data is in the image
and its used-ring entry is about to be published), that a FLUSH was *taken* from the ring, that a
taken flush is *durable* (the image was synced), that a mark was asked for, that the guest went
away, and that the backend stops. Each mode is a sink chosen once (STYLE §7):

- `LogWritesSink` applies dm-log-writes' rules: completed writes, discards and write-zeroes
  form the *unflushed list* in completion order; a flush taken from the ring carries the list
  as it is at that instant, and when the flush is durable those records, then one FLUSH entry,
  are counted. Writes flagged FUA (the guest runs its cache write-through) are logged at once,
  ahead of the unflushed list, as are marks. When the guest goes away the list becomes the
  *volatile tail*: counted with no FLUSH after it. The list lives in the log file itself,
  written at completion straight from the guest's buffers and left uncounted (a killed
  backend loses it exactly as dm-log-writes loses its in-memory list): the guest may reuse its
  buffers once the request completes, so this is the one moment the data can be taken without
  a copy, and a flush then costs one FLUSH entry and a sync.
- `ImmediateSink` logs every record at completion, like QEMU's blklogwrites driver.
- `PassthroughSink` logs nothing: the baseline for overhead.

Sectors here count `sectorsize` units (log entry units); the device converts virtio's 512-byte
`req_sector` before calling in. The `data` handed to `completed` may be views of guest memory
that the guest reuses once the request completes: every sink is done with them when
`completed` returns (re-reading the image at flush time would be wrong when a later write
touched the same sectors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Protocol

from logwrites.format import (
    END_MARK,
    EntryFlag,
    encode_entry_header,
    encode_mark_header,
    validate_mark_name,
)
from logwrites.logfile import Buffer, LogWriter, zero_payload

FLUSH: Final = int(EntryFlag.FLUSH)
FUA: Final = int(EntryFlag.FUA)
DISCARD: Final = int(EntryFlag.DISCARD)
MARK: Final = int(EntryFlag.MARK)


class LogObserver(Protocol):
    """Told about every entry the filter logs (the control socket's event stream, stop points).

    `entry` is called when an entry is appended; `flush` once a FLUSH entry is durable, with
    the number of FLUSH entries logged so far (1 for the first); `mark` once a mark is durable.
    """

    def entry(self, index: int, flags: int) -> None: ...

    def flush(self, index: int, count: int) -> None: ...

    def mark(self, index: int, name: str) -> None: ...


class CompletionSink(Protocol):
    """What the device calls; the three modes implement it.

    `completed(sector, nr_sectors, flags, data)`: `flags` is 0 for a write (data = its payload,
    exactly `nr_sectors` blocks), DISCARD for a discard (data None), 0 with data None for a
    write-zeroes; FUA added when the guest's write cache is off (logged at once). `retract()`
    takes back the last `completed` record without FUA, before anything else is logged: the
    device logs a big write while the image write runs, and that one may fail.
    `flush_durable(ticket, image_durable)`: `image_durable()` returns once the image is
    durable (the device syncs it while the sink syncs the log) and raises if it is not; the
    flush's entries are counted only after it returned.
    """

    mode: str
    keeps_log: bool             # False: nothing to overlap with the image's I/O

    def completed(self, sector: int, nr_sectors: int, flags: int,
                  data: Sequence[Buffer] | None) -> None: ...

    def batch_end(self) -> None: ...

    def flush_taken(self) -> object: ...

    def flush_durable(self, ticket: object,
                      image_durable: Callable[[], object] | None = None) -> int: ...

    def retract(self) -> None: ...

    def mark(self, name: str) -> int: ...

    def guest_gone(self) -> None: ...

    def close(self) -> None: ...

    @property
    def unflushed(self) -> int: ...

    @property
    def entries(self) -> int: ...

    @property
    def log_bytes(self) -> int: ...

    @property
    def flushes(self) -> int: ...


class NoLogError(ValueError):
    """A mark was asked of a backend that keeps no log (passthrough mode)."""


class _LoggingSink:
    """What the two logging modes share: the writer, marks, observers, commits, the end."""

    mode = "logwrites"
    keeps_log = True

    def __init__(self, writer: LogWriter) -> None:
        self.writer = writer
        self.observer: LogObserver | None = None
        self._dirty = False         # entries appended since the last commit that need one
        self._flushes = 0

    @property
    def entries(self) -> int:
        return self.writer.next_index

    @property
    def log_bytes(self) -> int:
        return self.writer.bytes_used

    @property
    def flushes(self) -> int:
        return self._flushes

    @property
    def unflushed(self) -> int:
        return 0

    def _write_record(self, sector: int, nr_sectors: int, flags: int,
                      data: Sequence[Buffer] | None) -> int:
        """Append one record (write, discard or write-zeroes) to the file; its index."""
        writer = self.writer
        if flags & DISCARD:
            return writer.append_discard(sector, nr_sectors, flags & ~DISCARD)
        if data is None:
            return writer.append_zeroes(sector, nr_sectors, flags)
        return writer.append_write(sector, nr_sectors, data, flags)

    def _append(self, sector: int, nr_sectors: int, flags: int,
                data: Sequence[Buffer] | None) -> int:
        index = self._write_record(sector, nr_sectors, flags, data)
        if self.observer is not None:
            self.observer.entry(index, flags)
        return index

    def _append_flush(self, image_durable: Callable[[], object] | None) -> int:
        """Append one FLUSH entry and commit once the image is durable too; the count's own
        sync is deferred to the next commit (see LogWriter.commit: still DESIGN §3.7)."""
        writer = self.writer
        block = writer.next_block
        index = writer.append_flush()
        try:
            writer.commit(sync_count=False, before_count=image_durable)
        except BaseException:
            writer.retract(index, block)        # the image was not made durable: no FLUSH
            raise
        if self.observer is not None:
            self.observer.entry(index, FLUSH)
        self._dirty = False
        self._flushes += 1
        if self.observer is not None:
            self.observer.flush(index, self._flushes)
        return index

    def batch_end(self) -> None:
        """Commit FUA entries appended during the batch, before its completions are published."""
        if self._dirty:
            self.writer.commit(sync_count=False)
            self._dirty = False

    def _pending_records(self) -> None:
        """Append what still waits for a flush (nothing, unless the mode parks records)."""

    def mark(self, name: str) -> int:
        """Log a mark at once (after everything logged, ahead of the unflushed list) and make
        it durable; returns its entry index.

        :raise ValueError: for a name that cannot be a mark.
        """
        validate_mark_name(name, self.writer.sectorsize)
        index = self.writer.append_mark(name)
        if self.observer is not None:
            self.observer.entry(index, MARK)
        self.writer.commit()
        self._dirty = False
        if self.observer is not None:
            self.observer.mark(index, name)
        return index

    def guest_gone(self) -> None:
        """The volatile tail: what waits for a flush is appended with no FLUSH after it."""
        self._pending_records()
        self.writer.commit()
        self._dirty = False

    def close(self) -> None:
        """A clean stop: the volatile tail, then the `dm-log-writes-end` mark, durable."""
        self.guest_gone()
        self.mark(END_MARK)


class LogWritesSink(_LoggingSink):
    """dm-log-writes' ordering (DESIGN.md §3 rules 1-8).

    A completed record goes into the log file at once, straight from the guest's buffers, but
    is not counted: it is *staged*, and the staged records are the unflushed list, in
    completion order, in the file. A durable flush appends its FLUSH entry after the records it
    carries and counts them; a mark or a FUA write is inserted ahead of the staged records
    (they move up by one entry, see LogWriter.insert), as is a FLUSH that carries only the
    first of them. Nothing is parked in memory, and no payload is copied in Python.
    """

    mode = "logwrites"

    def __init__(self, writer: LogWriter) -> None:
        super().__init__(writer)
        self._staged: list[tuple[int, int]] = []   # (flags, blocks in the log), in order
        self._staged_blocks = 0
        self._taken = 0             # records ever staged; a flush ticket is this count
        self._done = 0              # records ever handed to a flush or the volatile tail

    @property
    def unflushed(self) -> int:
        return len(self._staged)

    @property
    def entries(self) -> int:
        return self.writer.next_index - len(self._staged)

    def _first_staged(self) -> tuple[int, int]:
        """(index, block) of the first staged record (where entries ahead of them go)."""
        writer = self.writer
        return (writer.next_index - len(self._staged), writer.next_block - self._staged_blocks)

    def completed(self, sector: int, nr_sectors: int, flags: int,
                  data: Sequence[Buffer] | None) -> None:
        writer = self.writer
        if flags & FUA:
            # Rule 3: durable on completion, so logged now, ahead of the unflushed list.
            if self._staged:
                index, block = self._first_staged()
                header = encode_entry_header(sector, nr_sectors, flags, writer.sectorsize)
                payload = (zero_payload(nr_sectors * writer.sectorsize) if data is None
                           else data)
                writer.insert(index, block, header, payload, nr_sectors)
                if self.observer is not None:
                    self.observer.entry(index, flags)
            else:
                self._append(sector, nr_sectors, flags, data)
            self._dirty = True
            return
        # Rule 1: in completion order; written now, from the guest's buffers, which the guest
        # may reuse as soon as the request completes. Counted by the flush that carries it.
        before = writer.next_block
        self._write_record(sector, nr_sectors, flags, data)
        blocks = writer.next_block - before
        self._staged.append((flags, blocks))
        self._staged_blocks += blocks
        self._taken += 1

    def staged_by_device(self, blocks: Sequence[int], next_block: int) -> None:
        """Plain writes the device logged itself (vhost/blk.py's C path): records with flags
        0, of `blocks` log blocks each, in completion order, in the file up to `next_block`;
        staged as `completed` stages them."""
        self.writer.appended(len(blocks), next_block)
        self._staged.extend([(0, b) for b in blocks])
        self._staged_blocks += sum(blocks)
        self._taken += len(blocks)

    def flushed_by_device(self, next_block: int) -> None:
        """The device logged a FLUSH itself (vhost/blk.py's C path, only while no observer
        listens), carrying every staged record: its entry ends at `next_block`, and every
        entry is counted."""
        writer = self.writer
        first = self._first_staged()[0]
        writer.appended(1, next_block)
        writer.counted(writer.next_index)
        self._dirty = False
        self._log_staged(len(self._staged), first)
        self._flushes += 1

    def retract(self) -> None:
        """The last record's request failed on the image after all: out of the list, and its
        room in the file is reused."""
        _flags, blocks = self._staged.pop()
        self._staged_blocks -= blocks
        self._taken -= 1
        writer = self.writer
        writer.retract(writer.next_index - 1, writer.next_block - blocks)

    def batch_end(self) -> None:
        """Commit FUA entries of the batch (not the staged records behind them) before its
        completions are published."""
        if self._dirty:
            self.writer.commit(sync_count=False, count=self._first_staged()[0])
            self._dirty = False

    def flush_taken(self) -> object:
        """Rule 2: the records completed so far belong to this flush; later ones do not."""
        return self._taken

    def _log_staged(self, count: int, first: int) -> None:
        """The first `count` staged records (from entry `first`) are in the log for good: tell
        the observer, forget them."""
        carried, self._staged = self._staged[:count], self._staged[count:]
        self._staged_blocks -= sum(blocks for _, blocks in carried)
        self._done += count
        if self.observer is not None:
            for n, (flags, _) in enumerate(carried):
                self.observer.entry(first + n, flags)

    def flush_durable(self, ticket: object,
                      image_durable: Callable[[], object] | None = None) -> int:
        """The flush's records, then its FLUSH entry, are counted once they and the image are
        durable (the log is synced while the device syncs the image).

        Returns the FLUSH entry's index; the device completes the FLUSH request after this.
        """
        assert isinstance(ticket, int)
        writer = self.writer
        carried = min(max(ticket - self._done, 0), len(self._staged))
        first, block = self._first_staged()
        if carried == len(self._staged):
            flush_block = writer.next_block
            index = writer.append_flush()
            try:
                writer.commit(sync_count=False, count=index + 1, before_count=image_durable)
            except BaseException:
                writer.retract(index, flush_block)  # no FLUSH entry for a failed flush
                raise
        else:
            # Records that completed after the flush was taken wait for the next one (seed
            # example): the FLUSH entry goes between them and the ones it carries, once the
            # image is durable (an inserted entry cannot be taken back).
            if image_durable is not None:
                image_durable()
            block += sum(blocks for _, blocks in self._staged[:carried])
            header = encode_entry_header(0, 0, FLUSH, writer.sectorsize)
            index = writer.insert(first + carried, block, header, (), 0)
            writer.commit(sync_count=False, count=index + 1)
        self._dirty = False
        self._log_staged(carried, first)
        self._flushes += 1
        if self.observer is not None:
            self.observer.entry(index, FLUSH)
            self.observer.flush(index, self._flushes)
        return index

    def mark(self, name: str) -> int:
        """Log a mark ahead of the unflushed list and make it durable; returns its index.

        :raise ValueError: for a name that cannot be a mark.
        """
        validate_mark_name(name, self.writer.sectorsize)
        index, block = self._first_staged()
        self.writer.insert(index, block, encode_mark_header(name, self.writer.sectorsize),
                           (), 0)
        if self.observer is not None:
            self.observer.entry(index, MARK)
        self.writer.commit(count=index + 1)
        self._dirty = False
        if self.observer is not None:
            self.observer.mark(index, name)
        return index

    def _pending_records(self) -> None:
        self._log_staged(len(self._staged), self._first_staged()[0])


class ImmediateSink(_LoggingSink):
    """Every record logged when it completes, as QEMU's blklogwrites driver does; the guest's
    buffers go straight to the log (nothing is parked, so nothing is copied)."""

    mode = "immediate"

    def __init__(self, writer: LogWriter) -> None:
        super().__init__(writer)
        self._last = (0, 0)         # (index, block) of the last record, for retract()

    def completed(self, sector: int, nr_sectors: int, flags: int,
                  data: Sequence[Buffer] | None) -> None:
        self._last = (self.writer.next_index, self.writer.next_block)
        self._append(sector, nr_sectors, flags, data)
        if flags & FUA:
            self._dirty = True

    def retract(self) -> None:
        self.writer.retract(*self._last)

    def flush_taken(self) -> object:
        return None

    def flush_durable(self, ticket: object,
                      image_durable: Callable[[], object] | None = None) -> int:
        return self._append_flush(image_durable)


class PassthroughSink:
    """No log at all: the baseline against which the logging modes' cost is measured."""

    mode = "passthrough"
    keeps_log = False
    observer: LogObserver | None = None
    unflushed = 0
    entries = 0
    log_bytes = 0

    def __init__(self) -> None:
        self._flushes = 0

    @property
    def flushes(self) -> int:
        return self._flushes

    def completed(self, sector: int, nr_sectors: int, flags: int,
                  data: Sequence[Buffer] | None) -> None:
        pass

    def flushed_by_device(self, next_block: int) -> None:
        """The device synced the image for a FLUSH itself (vhost/blk.py's C path)."""
        self._flushes += 1

    def batch_end(self) -> None:
        pass

    def flush_taken(self) -> object:
        return None

    def flush_durable(self, ticket: object,
                      image_durable: Callable[[], object] | None = None) -> int:
        if image_durable is not None:
            image_durable()
        self._flushes += 1
        return -1

    def retract(self) -> None:
        pass

    def mark(self, name: str) -> int:
        raise NoLogError("passthrough mode keeps no log: marks need --mode logwrites or "
                         "immediate")

    def guest_gone(self) -> None:
        pass

    def close(self) -> None:
        pass


MODES: Final = ("logwrites", "immediate", "passthrough")


def make_sink(mode: str, writer: LogWriter | None) -> CompletionSink:
    """The sink for `mode` (one of MODES); the logging modes need a writer."""
    if mode == "passthrough":
        return PassthroughSink()
    if writer is None:
        raise ValueError(f"mode {mode} needs a log writer")
    if mode == "logwrites":
        return LogWritesSink(writer)
    if mode == "immediate":
        return ImmediateSink(writer)
    raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
