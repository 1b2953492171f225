"""The log-writes filter: what goes into the log, and when (DESIGN.md §3).

It knows no virtqueues. The device tells it that a request *completed* (its data is in the image
and its used-ring entry is about to be published), that a FLUSH was *taken* from the ring, that a
taken flush is *durable* (the image was synced), that a mark was asked for, that the guest went
away, and that the backend stops. Each mode is a sink chosen once (STYLE §7):

- `LogWritesSink` applies dm-log-writes' rules: completed writes, discards and write-zeroes wait
  on the *unflushed list* in completion order; a flush taken from the ring detaches the list as
  it is at that instant, and when the flush is durable those records, then one FLUSH entry, are
  appended and committed. Writes flagged FUA (the guest runs its cache write-through) are logged
  at once, ahead of the unflushed list, as are marks. When the guest goes away the list becomes
  the *volatile tail*: appended with no FLUSH after it.
- `ImmediateSink` logs every record at completion, like QEMU's blklogwrites driver.
- `PassthroughSink` logs nothing: the baseline for overhead.

Sectors here count `sectorsize` units (log entry units); the device converts virtio's 512-byte
`req_sector` before calling in. The `data` handed to `completed` may be views of guest memory
that the guest reuses once the request completes: a record parked on the unflushed list holds a
copy of the data *as written* (re-reading the image at flush time would be wrong when a later
write touched the same sectors).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Final, Protocol

from logwrites.format import END_MARK, EntryFlag, validate_mark_name
from logwrites.logfile import Buffer, LogWriter, Spilled

FLUSH: Final = int(EntryFlag.FLUSH)
FUA: Final = int(EntryFlag.FUA)
DISCARD: Final = int(EntryFlag.DISCARD)
MARK: Final = int(EntryFlag.MARK)
# Parked payloads beyond this many bytes go to an unlinked spill file next to the log instead
# of process memory (a guest may write gigabytes without a flush; dm-log-writes.c keeps them
# all in kernel pages). The flush copies them into the log in the kernel.
PARK_IN_MEMORY: Final = 32 << 20


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
    write-zeroes; FUA added when the guest's write cache is off (logged at once).
    """

    mode: str

    def completed(self, sector: int, nr_sectors: int, flags: int,
                  data: Sequence[Buffer] | None) -> None: ...

    def batch_end(self) -> None: ...

    def flush_taken(self) -> object: ...

    def flush_durable(self, ticket: object) -> int: ...

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

    def _append(self, sector: int, nr_sectors: int, flags: int,
                data: Sequence[Buffer] | None) -> int:
        writer = self.writer
        if flags & DISCARD:
            index = writer.append_discard(sector, nr_sectors, flags & ~DISCARD)
        elif data is None:
            index = writer.append_zeroes(sector, nr_sectors, flags)
        else:
            index = writer.append_write(sector, nr_sectors, data, flags)
        if self.observer is not None:
            self.observer.entry(index, flags)
        return index

    def _append_flush(self, records: list[tuple[int, int, int, bytes | None]] | None = None
                      ) -> int:
        """Append `records` and one FLUSH entry (one pwritev for all), commit; the count's own
        sync is deferred to the next commit (see LogWriter.commit: still DESIGN §3.7)."""
        records = records or []
        first = self.writer.append_batch(records, flush=True)
        index = first + len(records)
        if self.observer is not None:
            for n, record in enumerate(records):
                self.observer.entry(first + n, record[2])
            self.observer.entry(index, FLUSH)
        self.writer.commit(sync_count=False)
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
    """dm-log-writes' ordering (DESIGN.md §3 rules 1-8)."""

    mode = "logwrites"

    def __init__(self, writer: LogWriter) -> None:
        super().__init__(writer)
        # (sector, nr_sectors, flags, payload or None), in completion order.
        self._records: list[tuple[int, int, int, bytes | Spilled | None]] = []
        self._in_memory = 0         # payload bytes parked in memory
        self._spill_fd = -1         # the spill file, opened on first need
        self._spill_end = 0         # bytes used in it

    @property
    def unflushed(self) -> int:
        return len(self._records)

    def completed(self, sector: int, nr_sectors: int, flags: int,
                  data: Sequence[Buffer] | None) -> None:
        if flags & FUA:
            # Rule 3: durable on completion, so logged now, ahead of the unflushed list.
            self._append(sector, nr_sectors, flags, data)
            self._dirty = True
        else:
            # Rule 1: parked in completion order; the payload is copied, since the guest may
            # reuse its buffer as soon as the request completes.
            self._records.append((sector, nr_sectors, flags,
                                  None if data is None else self._park(data)))

    def _park(self, data: Sequence[Buffer]) -> bytes | Spilled:
        """A copy of `data`: in memory up to PARK_IN_MEMORY, in the spill file beyond."""
        nbytes = sum(map(len, data))
        if self._in_memory + nbytes <= PARK_IN_MEMORY:
            self._in_memory += nbytes
            return b"".join(data)
        if self._spill_fd < 0:
            # Unlinked from the start (O_TMPFILE): nothing to clean up after a kill. Next to a
            # log file (same filesystem: copy_file_range can share blocks); a log on a block
            # device spills to TMPDIR instead of /dev.
            log = self.writer.path
            where = None if log.is_block_device() else log.parent
            spill = tempfile.TemporaryFile(dir=where, prefix=".lw-spill-")
            self._spill_fd = os.dup(spill.fileno())
            spill.close()
        at = self._spill_end
        try:
            written = os.pwritev(self._spill_fd, data, at)
        except OSError:
            written = -1
        if written != nbytes:
            # The request already completed in the image: never fail it here; keep the
            # copy in memory instead (the spill's filesystem is full).
            self._spill_end += max(written, 0)
            return b"".join(data)
        self._spill_end += nbytes
        return Spilled(self._spill_fd, at)

    def _parked_logged(self) -> None:
        """The records parked so far are in the log: reuse the memory and spill budgets."""
        if self._records:
            return
        self._in_memory = 0
        if self._spill_end:
            # Dropping the pages before writeback means a spill normally never reaches disk.
            os.ftruncate(self._spill_fd, 0)
            self._spill_end = 0

    def flush_taken(self) -> object:
        """Rule 2: the records completed so far belong to this flush; later ones do not."""
        detached, self._records = self._records, []
        return detached

    def flush_durable(self, ticket: object) -> int:
        """The image is durable: append the flush's records and a FLUSH entry, commit.

        Returns the FLUSH entry's index; the device completes the FLUSH request after this.
        """
        assert isinstance(ticket, list)
        index = self._append_flush(ticket)
        self._parked_logged()
        return index

    def _pending_records(self) -> None:
        records, self._records = self._records, []
        if records:
            first = self.writer.append_batch(records, flush=False)
            if self.observer is not None:
                for n, record in enumerate(records):
                    self.observer.entry(first + n, record[2])
        self._parked_logged()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._spill_fd >= 0:
                os.close(self._spill_fd)
                self._spill_fd = -1


class ImmediateSink(_LoggingSink):
    """Every record logged when it completes, as QEMU's blklogwrites driver does; the guest's
    buffers go straight to the log (nothing is parked, so nothing is copied)."""

    mode = "immediate"

    def completed(self, sector: int, nr_sectors: int, flags: int,
                  data: Sequence[Buffer] | None) -> None:
        self._append(sector, nr_sectors, flags, data)
        if flags & FUA:
            self._dirty = True

    def flush_taken(self) -> object:
        return None

    def flush_durable(self, ticket: object) -> int:
        return self._append_flush()


class PassthroughSink:
    """No log at all: the baseline against which the logging modes' cost is measured."""

    mode = "passthrough"
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

    def batch_end(self) -> None:
        pass

    def flush_taken(self) -> object:
        return None

    def flush_durable(self, ticket: object) -> int:
        self._flushes += 1
        return -1

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
