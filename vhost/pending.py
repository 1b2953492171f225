"""The pending journal: the unflushed list, kept in a file so that a killed backend loses none
of it (`logwrites serve --pending-journal`, used by `--resume`).

In `logwrites` mode a completed write waits in memory until a FLUSH logs it (DESIGN §3.2). A
backend killed meanwhile loses those records, yet the guest saw them complete: a restarted
backend (`--resume`) whose next FLUSH does not log them leaves a log that no longer describes
the image, and a crash state built at that FLUSH would miss writes the guest was promised were
durable. The journal (`LOG.pending`) holds the same records in completion order, written with
one pwrite each (the page cache survives a killed process, so no sync is needed for that; a
host power cut loses the guest as well); right before a batch's completions are published the
header's `published` offset moves past its records, and only records before it are restored
(a record journaled but never published is not restored: the front-end resubmits that request).
The one window left is between that header write and the publication: a backend killed there
has its batch restored *and* resubmitted, so a write may be logged twice (same data, same
place; the resubmitted copy comes after the restored one, as on the image). Nothing is lost.
The journal is reset after every commit that takes the list (a FLUSH, the volatile tail), and
names the log's entry count at that moment (`base`).

Resuming: if the log has, at or after `base`, a FLUSH entry or a write/discard without FUA
(only the list puts those there: a FLUSH's records or the volatile tail), the list was logged
after the journal's last reset (the backend was killed between the log commit and the reset;
requests are served one at a time, so that commit took all of them): they are dropped.
Otherwise they are handed to the new sink as completed, in order: the next FLUSH logs them,
exactly once.

Only what completed is journaled; requests in flight at the kill were never completed, and the
front-end resubmits them (INFLIGHT_SHMFD) or the guest never saw them finish.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from logwrites.logfile import Buffer, LogReader
from vhost.ordering import FUA, CompletionSink, LogObserver

log = logging.getLogger(__name__)

MAGIC: Final = b"LWPEND01"
HEAD: Final = struct.Struct("<8sQQ")   # magic, base (the log's entry count), published end
PUBLISHED: Final = struct.Struct("<Q")
RECORD: Final = struct.Struct("<QQIIQ")        # sector, nr_sectors, flags, has_data, nbytes


def journal_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".pending")


def load(path: Path, log_path: Path) -> list[tuple[int, int, int, bytes | None]]:
    """The records a resumed backend must still log (see the module docstring)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    if len(raw) < HEAD.size or raw[:8] != MAGIC:
        log.warning("%s is no pending journal: ignored", path)
        return []
    _, base, published = HEAD.unpack_from(raw)
    raw = raw[:published]
    with LogReader(log_path) as reader:
        for entry in reader.entries():
            if entry.index >= base and not entry.is_mark and (
                    (entry.is_flush and not entry.nr_sectors) or not entry.is_fua):
                return []       # the list was logged after the last reset
    records: list[tuple[int, int, int, bytes | None]] = []
    at = HEAD.size
    while at + RECORD.size <= len(raw):
        sector, nr_sectors, flags, has_data, nbytes = RECORD.unpack_from(raw, at)
        at += RECORD.size
        if at + nbytes > len(raw):
            break               # torn last record: it never completed to the guest
        records.append((sector, nr_sectors, flags, raw[at:at + nbytes] if has_data else None))
        at += nbytes
    return records


class JournaledSink:
    """A `logwrites`-mode sink whose unflushed list is also in the pending journal."""

    def __init__(self, inner: CompletionSink, path: Path) -> None:
        self.inner = inner
        self.mode = inner.mode
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._end = self._published = 0
        self._reset()

    # What the device calls: the inner sink's, plus the journal.

    def completed(self, sector: int, nr_sectors: int, flags: int,
                  data: Sequence[Buffer] | None) -> None:
        self.inner.completed(sector, nr_sectors, flags, data)
        if flags & FUA:
            return              # logged and committed at once: nothing pending
        buffers = list(data) if data is not None else []
        nbytes = sum(len(b) for b in buffers)
        head = RECORD.pack(sector, nr_sectors, flags, int(data is not None), nbytes)
        self._end += os.pwritev(self._fd, [head, *buffers], self._end)

    def restore(self, records: list[tuple[int, int, int, bytes | None]]) -> None:
        """Hand a killed backend's completed, unlogged records to this one, in order."""
        for sector, nr_sectors, flags, payload in records:
            self.completed(sector, nr_sectors, flags, None if payload is None else [payload])
        self.batch_end()

    def batch_end(self) -> None:
        """Right before the batch's completions are published: its records count from now."""
        self.inner.batch_end()
        if self._end != self._published:
            os.pwrite(self._fd, PUBLISHED.pack(self._end), 16)
            self._published = self._end

    def flush_taken(self) -> object:
        return self.inner.flush_taken()

    def flush_durable(self, ticket: object) -> int:
        index = self.inner.flush_durable(ticket)
        self._reset()
        return index

    def mark(self, name: str) -> int:
        return self.inner.mark(name)

    def guest_gone(self) -> None:
        self.inner.guest_gone()
        self._reset()

    def close(self) -> None:
        self.inner.close()
        os.close(self._fd)
        self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _reset(self) -> None:
        os.ftruncate(self._fd, 0)
        self._end = os.pwrite(self._fd, HEAD.pack(MAGIC, self.inner.entries, HEAD.size), 0)
        self._published = self._end

    @property
    def observer(self) -> LogObserver | None:
        return self.inner.observer      # type: ignore[attr-defined,no-any-return]

    @observer.setter
    def observer(self, value: LogObserver | None) -> None:
        self.inner.observer = value     # type: ignore[attr-defined]

    @property
    def unflushed(self) -> int:
        return self.inner.unflushed

    @property
    def entries(self) -> int:
        return self.inner.entries

    @property
    def log_bytes(self) -> int:
        return self.inner.log_bytes

    @property
    def flushes(self) -> int:
        return self.inner.flushes
