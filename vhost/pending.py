"""The pending journal: the unflushed list, kept in a file so that a killed backend loses none
of it (`logwrites serve --pending-journal`, used by `--resume`), and the identities that let a
restarted backend complete each request exactly once.

In `logwrites` mode a completed write waits in memory until a FLUSH logs it (DESIGN §3.2). A
backend killed meanwhile loses those records, yet the guest saw them complete: a restarted
backend (`--resume`) whose next FLUSH does not log them leaves a log that no longer describes
the image, and a crash state built at that FLUSH would miss writes the guest was promised were
durable. The journal (`LOG.pending`) holds the same records in completion order, written with
one pwrite each (the page cache survives a killed process, so no sync is needed for that; a
host power cut loses the guest as well); right before a batch's completions are published the
header's `published` offset moves past its records, and only records before it are restored (a
record journaled after it was never published: its request comes again). The journal is reset
after every commit that takes the list (a FLUSH, the volatile tail), and names the log's entry
count at that moment (`base`). A reset (and a restart's first journal) is written whole beside
the journal (`LOG.pending.new`) and renamed over it: a kill at any instant leaves either the old
journal, still right about the commit it preceded (see Resuming), or the new one, never an
empty or half-written one (truncating in place and writing again lost every identity of the
batch to a kill in between, and with them their exactly-once completion).

Resuming: if the log has, at or after `base`, a FLUSH entry or a write/discard without FUA
(only the list puts those there: a FLUSH's records or the volatile tail), the list was logged
after the journal's last reset (the backend was killed between the log commit and the reset;
requests are served one at a time, so that commit took all of them): they are not restored.
Otherwise they are handed to the new sink as completed, in order: the next FLUSH logs them.

Exactly once, with in-flight tracking (QEMU's INFLIGHT_SHMFD, see vhost/lvu.py). A request is
*done* once the backend has recorded it: its record is on the journal's list, or in the log (a
FUA write, or a FLUSH of the same batch took it). It is *published* once its used entry is.
Between the two a kill leaves a request that is done but that the front-end resubmits, since
libvhost-user's region still marks it in flight: the window between the `published` offset
write and the publication (the records are restored *and* resubmitted), and a FLUSH or FUA
commit in a batch whose completions were not published yet (the records are in the log *and*
resubmitted). Without more, such a write is logged twice. So every record carries the
identity of its request — queue, descriptor head and libvhost-user's in-flight `counter` (the
pop order, kept in the region across restarts) — and the journal also keeps, after a reset,
the identities of the done requests of the batch being served (kind DONE; a FUA write's DONE
record names its entry, done only if the log counts it). A resumed backend learns from the
journal which identities are done; when a queue restarts, libvhost-user lists the requests it
will resubmit, and those whose identity is done are completed OK by the glue without being
served again (the image holds their data, the list or the log their record).

Why an identity cannot name the wrong request: a head is reused by the guest only after it
was published, so the last journaled request with a given (queue, head) is the only one that
can still be in flight; the counter tells it from an earlier, published request on that head,
because libvhost-user's counter only grows while anything is in flight — it restarts at 0 only
when a queue starts with nothing in flight. That restart is when the queue's *epoch* (in the
journal header) moves on, and an identity matches only within its own epoch. Nothing in flight
at a restart also means nothing done is unpublished, so no match is lost by it.

Tests reach those windows on purpose: `LOGWRITES_PENDING_FAILPOINT=published:N` kills the
backend (SIGKILL, itself) right after the N-th batch's `published` write, `flushed:N` right
after the N-th FLUSH's log commit, before the journal's reset.

What stays: a FLUSH request itself is not journaled; resubmitted, it runs again and may log a
second (empty) FLUSH entry, which changes no crash state's data. Without in-flight tracking
(a front-end that resubmits on its own, like our test front-end) the window above still logs a
write twice (same data, same place, the second copy after the first). Nothing is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from logwrites.errors import LogFormatError
from logwrites.format import Entry
from logwrites.logfile import Buffer, LogReader
from vhost.ordering import FUA, CompletionSink, LogObserver

if TYPE_CHECKING:
    from vhost.lvu import Connection

log = logging.getLogger(__name__)

MAGIC: Final = b"LWPEND02"
MAX_QUEUES: Final = 64
# magic, base (the log's entry count at the reset), published end, the log block where entry
# `base` goes (so a resume reads the log from there, not from its start), each queue's epoch
HEAD: Final = struct.Struct(f"<8sQQQ{MAX_QUEUES}I")
PUBLISHED_AT: Final = 16
EPOCHS_AT: Final = 32
PUBLISHED: Final = struct.Struct("<Q")
EPOCH: Final = struct.Struct("<I")
# sector, nr_sectors, nbytes (payload after it), logged_at (entry index, DONE only), counter,
# flags, kind, epoch, qidx, head (NO_HEAD: no identity)
RECORD: Final = struct.Struct("<QQQQQIIIHH")
LISTED: Final = 0           # on the unflushed list, no payload (discard, write-zeroes)
LISTED_DATA: Final = 1      # on the unflushed list, its payload follows
DONE: Final = 2             # only an identity: in the log at entry `logged_at`
FAILPOINT_ENV: Final = "LOGWRITES_PENDING_FAILPOINT"
NO_HEAD: Final = 0xFFFF
NOT_LOGGED: Final = (1 << 64) - 1
ALWAYS: Final = (1 << 64) - 2   # logged_at of a DONE record carried over a reset: done

# (sector, nr_sectors, flags, payload or None) as the sink's list holds them
Record = tuple[int, int, int, bytes | None]
# (qidx, head, counter, epoch) of the request a record came from
Ident = tuple[int, int, int, int]


def journal_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".pending")


@dataclass
class Journal:
    """What a killed backend left: records to restore (with their requests' identities, or
    None), the identities of done requests (queue, head) -> (counter, epoch), the epochs."""

    records: list[Record] = field(default_factory=list)
    idents: list[Ident | None] = field(default_factory=list)
    done: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    epochs: list[int] = field(default_factory=lambda: [0] * MAX_QUEUES)


def load(path: Path, log_path: Path) -> Journal:
    """What a resumed backend must still log and may see resubmitted (module docstring)."""
    journal = Journal()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return journal
    if len(raw) < HEAD.size or raw[:8] != MAGIC:
        log.warning("%s is no pending journal (or an older format): ignored", path)
        return journal
    _, base, published, base_block, *epochs = HEAD.unpack_from(raw)
    journal.epochs = list(epochs)
    with LogReader(log_path) as reader:
        counted = reader.nr_entries
        try:
            list_logged = _list_logged(reader.entries(base, base_block), base)
        except LogFormatError:
            # Not where the header says (a log rewritten since?): read it from its start.
            list_logged = _list_logged(reader.entries(), base)
    at = HEAD.size
    while at + RECORD.size <= len(raw):
        (sector, nr_sectors, nbytes, logged_at, counter, flags, kind, epoch, qidx,
         head) = RECORD.unpack_from(raw, at)
        start = at
        at += RECORD.size
        if at + nbytes > len(raw):
            break               # torn last record: it never completed to the guest
        ident = None if head == NO_HEAD else (qidx, head, counter, epoch)
        if kind == DONE:
            if ident is not None and (logged_at == ALWAYS or logged_at < counted):
                journal.done[(qidx, head)] = (counter, epoch)
        elif list_logged or start < published:
            if ident is not None:
                journal.done[(qidx, head)] = (counter, epoch)
            if not list_logged:
                journal.records.append((sector, nr_sectors, flags,
                                        raw[at:at + nbytes] if kind == LISTED_DATA else None))
                journal.idents.append(ident)
        at += nbytes
    return journal


def _list_logged(entries: Iterable[Entry], base: int) -> bool:
    """Whether the log has, at or after entry `base`, what only the list puts there."""
    return any(entry.index >= base and not entry.is_mark and (
        (entry.is_flush and not entry.nr_sectors) or not entry.is_fua) for entry in entries)


def _failpoint() -> list[Any] | None:
    """[where, countdown] from LOGWRITES_PENDING_FAILPOINT ("published:N" or "flushed:N")."""
    spec = os.environ.get(FAILPOINT_ENV, "")
    where, _, count = spec.partition(":")
    if where not in ("published", "flushed") or not count.isdigit():
        if spec:
            log.warning("%s=%r: not published:N or flushed:N, ignored", FAILPOINT_ENV, spec)
        return None
    return [where, int(count)]


class JournaledSink:
    """A `logwrites`-mode sink whose unflushed list is also in the pending journal."""

    def __init__(self, inner: CompletionSink, path: Path) -> None:
        self.inner = inner
        self.mode = inner.mode
        self.path = path
        self._new = path.with_name(path.name + ".new")
        self._fd = -1                       # the journal is written first by restore()
        writer = getattr(inner, "writer", None)
        self._sectorsize = writer.sectorsize if writer is not None else 512
        self._end = self._published = 0
        self._epochs = [0] * MAX_QUEUES
        # Done requests a front-end may resubmit: (qidx, head) -> (counter, epoch).
        self._done: dict[tuple[int, int], tuple[int, int]] = {}
        self._batch: list[Ident] = []      # identities recorded since the last batch_end
        self._retractable = (0, 0)           # (journal end, batch length) before the last record
        self._conn: Connection | None = None
        self._dev: Any = None
        self._tracked = 0                   # bit per queue with in-flight tracking
        self.restored = 0
        self.duplicates_expected = 0
        self._failpoint = _failpoint()

    # -- the connection: identities and resubmissions ------------------------------------------

    def attach(self, conn: Connection | None) -> None:
        """Follow `conn`'s requests (their identities) and resubmissions; None when it left."""
        if self._conn is not None:
            self._conn.on_queue_resumed = None
        self._conn = conn
        self._dev = None if conn is None else conn.dev
        self._tracked = 0
        if conn is not None:
            conn.on_queue_resumed = self.queue_resumed

    def queue_resumed(self, qidx: int, resubmits: list[tuple[int, int]]) -> None:
        """Queue `qidx` (re)started; libvhost-user will resubmit `resubmits` (head, counter)
        first. Those already done are handed to the glue; nothing in flight starts an epoch."""
        conn = self._conn
        if conn is None or qidx >= MAX_QUEUES:
            return
        if conn.inflight(qidx):
            self._tracked |= 1 << qidx
        else:
            self._tracked &= ~(1 << qidx)
        epoch = self._epochs[qidx]
        expected = 0
        if not resubmits:
            # libvhost-user's counter restarts at 0: identities of older requests could repeat.
            self._epochs[qidx] = epoch = epoch + 1
            os.pwrite(self._fd, EPOCH.pack(epoch), EPOCHS_AT + EPOCH.size * qidx)
        for head, counter in resubmits:
            if self._done.get((qidx, head)) == (counter, epoch):
                conn.expect(qidx, head, counter)
                expected += 1
        # What was not resubmitted was published: its identity can no longer match.
        keep = {(qidx, head) for head, _ in resubmits}
        self._done = {key: value for key, value in self._done.items()
                      if key[0] != qidx or key in keep}
        self.duplicates_expected += expected
        if resubmits or expected:
            log.info("queue %d: %d requests resubmitted, %d of them already done (completed "
                     "without being served again)", qidx, len(resubmits), expected)

    def _ident(self) -> Ident | None:
        dev = self._dev
        if dev is None:
            return None
        qidx = dev.cur_qidx
        if not self._tracked >> qidx & 1:
            return None
        return (qidx, dev.cur_head, dev.cur_counter, self._epochs[qidx])

    # -- what the device calls: the inner sink's, plus the journal -------------------------------

    def completed(self, sector: int, nr_sectors: int, flags: int,
                  data: Sequence[Buffer] | None) -> None:
        if flags & FUA:
            # Logged at once; done once its entry is counted (the batch's commit).
            logged_at = self.inner.entries
            self.inner.completed(sector, nr_sectors, flags, data)
            ident = self._ident()
            if ident is not None:
                self._batch.append(ident)
                self._end += os.pwrite(self._fd, self._done_record(ident, logged_at),
                                       self._end)
            return
        self.inner.completed(sector, nr_sectors, flags, data)
        self._retractable = (self._end, len(self._batch))
        self._journal(sector, nr_sectors, flags, data, self._ident())

    def retract(self) -> None:
        """The last record's image write failed: out of the log and of the journal (its room
        is reused; the published offset has not passed it yet)."""
        self.inner.retract()
        self._end, batched = self._retractable
        del self._batch[batched:]

    def _journal(self, sector: int, nr_sectors: int, flags: int,
                 data: Sequence[Buffer] | None, ident: Ident | None) -> None:
        if ident is not None:
            self._batch.append(ident)
        self._end += os.pwritev(self._fd, self._record(sector, nr_sectors, flags, data, ident),
                                self._end)

    @staticmethod
    def _record(sector: int, nr_sectors: int, flags: int, data: Sequence[Buffer] | None,
                ident: Ident | None) -> list[Buffer]:
        """A list record: its header, then its payload's buffers."""
        buffers = list(data) if data is not None else []
        nbytes = sum(len(b) for b in buffers)
        kind = LISTED if data is None else LISTED_DATA
        if ident is None:
            head = RECORD.pack(sector, nr_sectors, nbytes, NOT_LOGGED, 0, flags, kind, 0, 0,
                               NO_HEAD)
        else:
            qidx, dhead, counter, epoch = ident
            head = RECORD.pack(sector, nr_sectors, nbytes, NOT_LOGGED, counter, flags, kind,
                               epoch, qidx, dhead)
        return [head, *buffers]

    @staticmethod
    def _done_record(ident: Ident, logged_at: int) -> bytes:
        qidx, head, counter, epoch = ident
        return RECORD.pack(0, 0, 0, logged_at, counter, 0, DONE, epoch, qidx, head)

    def restore(self, journal: Journal) -> None:
        """Hand a killed backend's completed, unlogged records to this one, in order, and
        remember which requests were done (a front-end may resubmit them). Writes this
        backend's first journal (call it with an empty Journal on a fresh start): the killed
        backend's stays whole until this one replaces it in one rename."""
        self._epochs = list(journal.epochs)
        self._done.update(journal.done)
        records: list[Buffer] = []
        for (sector, nr_sectors, flags, payload), ident in zip(journal.records, journal.idents,
                                                                strict=True):
            records += self._record(sector, nr_sectors, flags,
                                    None if payload is None else [payload], ident)
        self._replace(records)      # the header names the log before these records
        for sector, nr_sectors, flags, payload in journal.records:
            self.inner.completed(sector, nr_sectors, flags,
                                 None if payload is None else [payload])
        self._batch.clear()
        self.restored = len(journal.records)
        self.batch_end()

    def batch_end(self) -> None:
        """Right before the batch's completions are published: its records count from now."""
        self.inner.batch_end()
        if self._end != self._published:
            os.pwrite(self._fd, PUBLISHED.pack(self._end), PUBLISHED_AT)
            self._published = self._end
            self._fail("published")
        self._batch.clear()

    def flush_taken(self) -> object:
        return self.inner.flush_taken()

    def flush_durable(self, ticket: object,
                      image_durable: Callable[[], object] | None = None) -> int:
        index = self.inner.flush_durable(ticket, image_durable)
        self._fail("flushed")
        self._reset()
        return index

    def mark(self, name: str) -> int:
        return self.inner.mark(name)

    def guest_gone(self) -> None:
        self.inner.guest_gone()
        self._reset()

    def close(self) -> None:
        self.inner.close()
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        for path in (self.path, self._new):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _reset(self) -> None:
        """The list is in the log: start again, keeping the identities of done requests that
        may not be published yet (this batch's, and restored ones a front-end may resubmit)."""
        self._replace([])

    def _replace(self, records: Sequence[Buffer]) -> None:
        """A new journal: the done identities, then `records` (published), written whole
        beside the old one and renamed over it, so that a kill at any instant leaves one of
        the two whole (module docstring). Its header is computed first: the log as it is
        before any of `records` is handed to the inner sink."""
        done = [self._done_record((qidx, head, counter, epoch), ALWAYS)
                for (qidx, head), (counter, epoch) in self._done.items()]
        # Kept until batch_end: a later reset in the same batch writes them again.
        done += [self._done_record(ident, ALWAYS) for ident in self._batch]
        blob = b"".join(done)
        end = HEAD.size + len(blob) + sum(memoryview(b).nbytes for b in records)
        fd = os.open(self._new, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            at = 0
            for part in (self._head(end) + blob, *records):
                view = memoryview(part).cast("B")
                while view:
                    written = os.pwrite(fd, view, at)
                    at += written
                    view = view[written:]
            os.rename(self._new, self.path)
        except BaseException:
            os.close(fd)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._end = self._published = end

    def _fail(self, where: str) -> None:
        failpoint = self._failpoint
        if failpoint is not None and failpoint[0] == where:
            failpoint[1] -= 1
            if failpoint[1] <= 0:
                log.warning("failpoint %s reached: killing the backend", where)
                os.kill(os.getpid(), signal.SIGKILL)

    def _head(self, published: int) -> bytes:
        inner = self.inner
        return HEAD.pack(MAGIC, inner.entries, published,
                         inner.log_bytes // self._sectorsize, *self._epochs)

    @property
    def observer(self) -> LogObserver | None:
        return self.inner.observer      # type: ignore[attr-defined,no-any-return]

    @observer.setter
    def observer(self, value: LogObserver | None) -> None:
        self.inner.observer = value     # type: ignore[attr-defined]

    @property
    def keeps_log(self) -> bool:
        return self.inner.keeps_log

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
