"""The virtio-blk device: validates each request, moves data between guest memory and the
image, and tells the log-writes filter (vhost/ordering.py) what completed.

Requests are served one at a time in the order they are popped, in batches: every request of a
batch is validated before anything is touched (header, sizes, direction, alignment to
`sectorsize`, range; else IOERR or UNSUPP, and nothing is logged), its data goes between guest
memory and the image through `preadv`/`pwritev` on buffers over the guest's pages (no copies in
Python), and its used entry is filled; at the end of the batch FUA entries are committed and the
used entries are published with one notification. A batch ends early after a request that
took long (a big transfer, a FLUSH), so the guest is not kept waiting for the rest. A FLUSH
makes the image and the log durable (the filter counts the records it carries and a FLUSH
entry once both are), before it completes; the image's writeback is started first, so the two
syncs overlap. For big writes the image's side runs on one worker thread while the log's side
runs meanwhile: the two copies of a MiB overlap instead of adding up; in `logwrites` mode
several big writes are in flight at once (vhost/pipeline.py), completed in pop order, and
anything else is served only once they all completed.

Plain requests are served in C (`lw_serve` in vhost/_lvu_glue.c), the rest of the batch loop
staying here: reads, writes that need nothing but the image and, in `logwrites` mode, one
record appended into the log's zeroed room (as LogWriter appends it, uncounted), and FLUSHes
while no observer listens to the log (the same steps as `_flush` below). C pops and serves them
until the ring is empty, the batch must be published, or it pops a request it leaves to Python
(any other kind, a refusal, a failed write, a big or FUA write, an entry that would cross the
room's end): that one is served here from the start, as if C had never seen it. A FLUSH whose
sync failed comes back with its errno and is answered here as `_flush` answers it (it is not
synced again: a second fdatasync could succeed where the first lost the error). After each
call the entries C appended (staged records, and FLUSHes that carried every record before
them) are taken into the sink, in order. Measured with the test front-end, a logged 4 KiB
write cost 33 us of backend CPU in Python and 23 us this way; `LOGWRITES_PLAIN_IN_C=0` serves
everything in Python (tests/system/test_plain_path.py checks that both leave the same log,
image and answers).

While the serve loop waits (vhost/server.py, `lvu.Connection.wait`), the C path is lent to the
glue (`lend_plain_path`, in sync with the state here): a kick whose requests are all plain is
then served and published in C without Python waking at all, which at queue depth 1 is every
request. Whatever C hands back (a request for Python, a failed FLUSH) comes to `kick` with the
batch as it stands, and the wait returns; what C appended meanwhile is taken into the sink
(`take_back_plain_path`) before any other Python code runs.

Every record reaches the log file when its request completes (in `logwrites` mode uncounted
until a FLUSH carries it), so when the log cannot take an entry (LogFullError: its filesystem
is full or `--log-size` is reached) the request that needed it has not completed yet:

- `on_log_full="fail"` (default): that request fails with IOERR — the write (its data already
  on the image) or the FLUSH whose entry did not fit. The data image then holds writes the log
  does not describe, so nothing may pretend otherwise (issue 6): from then on the device is
  *log-full*: every write, discard, write-zeroes and FLUSH gets IOERR without touching the image
  or the log (reads still work), `log_full` says why and `unlogged` counts the completed writes
  that are on the image but not in the log. Big writes already in flight behind it
  (vhost/pipeline.py) reached the image too: they fail as well and count as unlogged. The
  log stays valid up to its last counted entry, which describes the image as it was at the
  last FLUSH that succeeded. Only a new backend (a fresh log on the image as it is) makes the
  pair consistent again.
- `on_log_full="pause"`: the request is held, uncompleted: `on_log_full` tells the control
  socket (event `{"event": "log-full"}`), and the device serves only the control socket until
  a `resume` (after the user made room) logs it again from the guest's buffers, which are
  still the device's; a full log again pauses again. Nothing is lost or reordered: no other
  request is taken meanwhile.

An I/O error on the data image (read, write, sync) completes the request with IOERR and logs
nothing; a FLUSH whose image sync failed counts nothing: its records wait for a FLUSH that
succeeds (the image was not made durable, so no FLUSH entry may claim it was).

Sectors: virtio requests count 512-byte units (`req_sector`); log entries count `sectorsize`
units. Both are converted here, in one place, through byte offsets.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from logwrites.errors import LogwritesError
from logwrites.format import FLUSH, encode_entry_header, encode_super
from logwrites.logfile import DIRECT_MIN, LogFullError, LogWriter
from vhost import lvu, pipeline
from vhost.lvu import VirtioBlk as V
from vhost.ordering import DISCARD, FUA, CompletionSink, LogWritesSink, PassthroughSink
from vhost.pipeline import BigWritePipeline

log = logging.getLogger(__name__)

REQ_SECTOR: Final = 512                 # virtio-blk's unit, whatever blk_size is
SEGMENT: Final = struct.Struct("<QII")  # discard/write-zeroes: sector, num_sectors, flags
SEG_MAX: Final = 126                    # data segments per request (queue size 128 - 2)
SIZE_MAX: Final = 1 << 20               # bytes per segment
MAX_DISCARD_SEG: Final = 32
MAX_RANGE_SECTORS: Final = 1 << 22      # per discard/write-zeroes segment, 512-byte units (2 GiB)
# Writes of at least this many bytes are logged while the worker writes the image (below it,
# handing over to the worker costs more than the write).
PARALLEL_MIN: Final = 64 << 10
# A request that kept the device this long (a big transfer, a FLUSH) is published at once,
# so that the guest refills its queue while the next one is served: with fio's 1 MiB writes
# at queue depth 4, holding completions to the end of the batch left the disks idle between
# batches (logged: 753 -> 1259 IOPS; passthrough 1467 -> 2458).
PUBLISH_AFTER_BYTES: Final = 64 << 10
BATCH: Final = 64                       # publish at least this often (libvhost-user panics
                                        # if more than the ring's size are popped unpublished;
                                        # the C path's LW_FAST_BATCH is the same)
_ZEROS: Final = bytes(1 << 20)

# Request counters, by kind (status reports them).
C_IN, C_OUT, C_FLUSH, C_GET_ID, C_DISCARD, C_WRITE_ZEROES, C_UNSUPP, C_ERROR = range(8)
COUNTER_NAMES: Final = ("in", "out", "flush", "get_id", "discard", "write_zeroes",
                        "unsupported", "failed")

_IOERR: Final = (V.S_IOERR, 1)
_UNSUPP: Final = (V.S_UNSUPP, 1)
_OK: Final = (V.S_OK, 1)
# What the C path returns for a FLUSH whose sync failed (answered in Python).
_FLUSH_FAILED: Final = (lvu.SERVE_IMAGE_NOT_DURABLE, lvu.SERVE_LOG_NOT_DURABLE)


class _ImageNotDurable(Exception):
    """The image sync of a FLUSH failed (its OSError is the cause)."""


def _bit(n: int) -> int:
    return 1 << n


class BlkDevice:
    """One virtio-blk disk over an image file or block device, feeding one completion sink.

    :param image_fd: open read-write (read-only with `readonly`) on the image.
    :param size: the image size in bytes (the capacity is rounded down to `sectorsize`).
    """

    __slots__ = (
        "_bytes_read", "_bytes_written", "_fast", "_fast_sink", "_fast_writer", "_fd", "_filled",
        "_fua", "_id", "_io", "_pipe", "_req", "_writeback_unsupported", "_wrote_through", "conn",
        "counts", "held", "image_error", "log_full", "log_full_events", "num_queues", "on_log_full",
        "pause_until_resumed", "readonly", "sectorsize", "sink", "size", "started", "unlogged",
        "wce",
    )

    def __init__(self, image_fd: int, size: int, sink: CompletionSink, *, sectorsize: int = 512,
                 readonly: bool = False, writethrough: bool = False, num_queues: int = 1,
                 serial: str = "logwrites", on_log_full: str = "fail") -> None:
        if sectorsize not in (512, 4096):
            raise ValueError(f"sector size {sectorsize}: 512 or 4096")
        raw_id = serial.encode()
        if len(raw_id) > V.ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {V.ID_BYTES} bytes")
        self._fd = image_fd
        # One worker for the image's side of big writes, so the log's side runs meanwhile
        # (both calls release the GIL); created on first need.
        self._io: ThreadPoolExecutor | None = None
        self._writeback_unsupported = False
        self.size = size - size % sectorsize
        self.sink = sink
        self.sectorsize = sectorsize
        self.readonly = readonly
        self.num_queues = num_queues
        self._id = raw_id.ljust(V.ID_BYTES, b"\0")
        self.wce = 0 if writethrough else 1
        self._fua = FUA if writethrough else 0
        self._wrote_through = False
        self._req = lvu.new_request()
        self._pipe = (BigWritePipeline(sink, self._worker)
                      if type(sink) is LogWritesSink else None)
        self.conn: lvu.Connection | None = None
        self.started = [False] * num_queues
        self.held = False
        self.counts = [0] * len(COUNTER_NAMES)    # of the requests served in Python
        self._bytes_read = 0
        self._bytes_written = 0
        self._fast_sink: LogWritesSink | PassthroughSink | None = None
        self._fast_writer: LogWriter | None = None
        self._fast = self._plain_path(sink)
        self._filled = lvu.new_counter()
        if on_log_full not in ("fail", "pause"):
            raise ValueError(f"on_log_full {on_log_full!r}: fail or pause")
        self.on_log_full = on_log_full
        self.log_full: str | None = None     # why the log took no more entries (fail mode)
        self.image_error: str | None = None  # the first image read or write that failed
        self.unlogged = 0                    # completed writes on the image, not in the log
        self.log_full_events = 0
        # Set by the serve loop: called with the reason, returns once the user sent `resume`
        # (True) or the backend is stopping (False). Without it, pause behaves as fail.
        self.pause_until_resumed: Callable[[str], bool] | None = None

    def _plain_path(self, sink: CompletionSink) -> Any:
        """The C path's state (LwFast) for plain reads, writes and FLUSHes; None where every
        request is served in Python: the `immediate` mode, the pending journal (which follows
        each request in Python), or LOGWRITES_PLAIN_IN_C=0."""
        if os.environ.get("LOGWRITES_PLAIN_IN_C", "1") == "0":
            return None
        if type(sink) is LogWritesSink:
            self._fast_sink, writer = sink, sink.writer
        elif type(sink) is PassthroughSink:
            self._fast_sink, writer = sink, None
        else:
            return None
        self._fast_writer = writer
        fast = lvu.new_fast()
        fast.image_fd = self._fd
        fast.size = self.size
        fast.sectorsize = self.sectorsize
        fast.entry_max = DIRECT_MIN
        # Logged writes of this size or more go through the big writes' pipeline (C's, or
        # vhost/pipeline.py's where C hands one back).
        fast.write_max = PARALLEL_MIN if writer is not None else 1 << 63
        fast.log_fd = writer.fileno() if writer is not None else -1
        if writer is not None:
            fast.log_direct_fd = writer.direct_fileno()
            if writer.max_bytes is not None:
                fast.log_limit = writer.max_bytes
        fast.start_writeback = True
        ss = self.sectorsize
        lvu.memmove(fast.flush_header, encode_entry_header(0, 0, FLUSH, ss), ss)
        lvu.memmove(fast.super_block, encode_super(0, ss), ss)
        return fast

    # -- vhost-user side ---------------------------------------------------------------------

    @property
    def features(self) -> int:
        features = sum(_bit(b) for b in (V.F_SIZE_MAX, V.F_SEG_MAX, V.F_BLK_SIZE, V.F_FLUSH,
                                         V.F_CONFIG_WCE, V.F_MQ, V.F_DISCARD,
                                         V.F_WRITE_ZEROES))
        return features | (_bit(V.F_RO) if self.readonly else 0)

    @property
    def protocol_features(self) -> int:
        return _bit(lvu.PROTOCOL_F_MQ) | _bit(lvu.PROTOCOL_F_CONFIG)

    def attach(self, conn: lvu.Connection) -> None:
        """A new connection: fill in the config space it will read."""
        self.conn = conn
        self.started = [False] * self.num_queues
        ss = self.sectorsize
        max_range = MAX_RANGE_SECTORS - MAX_RANGE_SECTORS % (ss // REQ_SECTOR)
        conn.set_blk_config(capacity=self.size // REQ_SECTOR, size_max=SIZE_MAX,
                            seg_max=SEG_MAX, blk_size=ss, wce=self.wce,
                            num_queues=self.num_queues, max_discard_sectors=max_range,
                            max_discard_seg=MAX_DISCARD_SEG,
                            discard_sector_alignment=ss // REQ_SECTOR,
                            max_write_zeroes_sectors=max_range,
                            max_write_zeroes_seg=MAX_DISCARD_SEG, write_zeroes_may_unmap=1)

    def detach(self) -> None:
        """The connection is gone: what is unflushed becomes the volatile tail (§3.6)."""
        self.conn = None
        self.started = [False] * self.num_queues
        self._volatile_tail()

    def queue_started(self, qidx: int, started: bool) -> None:
        if 0 <= qidx < self.num_queues:
            was_running = any(self.started)
            self.started[qidx] = started
            if was_running and not any(self.started):
                # The driver stopped the device (reset, reboot, VM paused): as for a crash,
                # the records still waiting for a flush are the volatile tail.
                self._volatile_tail()

    def _volatile_tail(self) -> None:
        pending = self.sink.unflushed
        try:
            self.sink.guest_gone()
        except LogFullError as err:
            self._full(err, pending)

    def _full(self, err: LogwritesError | OSError, unlogged: int) -> None:
        """The log took no more entries: fail every later write (see the module docstring)."""
        self.unlogged += unlogged
        self.log_full_events += 1
        if self.log_full is None:
            self.log_full = f"log full: {err}"
            log.error("%s; %d completed writes are on the image but not in the log; refusing "
                      "writes and flushes from now on", self.log_full, self.unlogged)

    def set_config(self, offset: int, data: bytes) -> bool:
        """The guest writes `wce` (its cache_type); nothing else in the config is writable."""
        if offset != lvu.WCE_OFFSET or len(data) != 1 or data[0] > 1:
            return False
        self.set_write_cache(bool(data[0]))
        return True

    def set_write_cache(self, enabled: bool) -> None:
        """Write-back (flushes decide what is durable) or write-through (every write is FUA)."""
        self.wce = int(enabled)
        self._fua = 0 if enabled else FUA
        if self.conn is not None:
            self.conn.set_wce(self.wce)
        log.info("guest write cache %s", "on (write back)" if enabled else
                 "off (write through)")

    def hold(self) -> None:
        """Stop popping requests (a stop point was reached); `release` goes on."""
        self.held = True

    def release(self) -> None:
        self.held = False
        for qidx, started in enumerate(self.started):
            if started and not self.held:
                self.kick(qidx)

    # -- the hot path --------------------------------------------------------------------------

    def kick(self, qidx: int, got: int = -1, n: int = 0) -> None:
        """Serve queue `qidx` until it is empty (or a stop point holds it). `got` and `n`: the
        C path began this kick itself (`lend_plain_path`) and left it here, with what
        `lvu.serve` returned and the batch's fill count."""
        conn = self.conn
        assert conn is not None or got < 0
        if got < 0 and (self.held or conn is None or not conn.open):
            return
        dev, req, pop, fill, handle = conn.dev, self._req, lvu.pop, lvu.fill, self._handle
        pipe = self._pipe if self.on_log_full == "fail" else None
        fast = self._fast
        if fast is not None and (fast.staged or fast.big_failed):
            self._take_over()
        while True:
            if fast is not None and not pipe:
                # Plain requests are served in C until one is not (it is popped into `req` and
                # served below, from the start) or the batch must be published.
                if got < 0:
                    got, n = self._serve_plain(dev, qidx, req, n)
                served, got = got, -1
                if served == lvu.SERVE_EMPTY:
                    break
                if served != lvu.SERVE_POPPED:
                    if served in _FLUSH_FAILED:
                        n = self._plain_flush_failed(served, dev, qidx, req, n)
                    self._end_batch(dev, qidx, n)
                    n = 0
                    if self.held:
                        return
                    continue
            elif not pop(dev, qidx, req):
                if not pipe:
                    break
                # The ring is empty for now: complete the oldest big write, then look again
                # (the guest refills while the others are still in flight).
                self._complete_big(dev, qidx)
                continue
            big = self._big_write(req) if pipe is not None else None
            if big is not None:
                if n:
                    self._end_batch(dev, qidx, n)
                    n = 0
                req = self._req = pipe.start(req, self._fd, *big)  # type: ignore[union-attr]
                if len(pipe) == pipeline.DEPTH:
                    self._complete_big(dev, qidx)
                continue
            while pipe:                 # anything else is served alone, in pop order
                self._complete_big(dev, qidx)
            status, used_len = handle(req)
            fill(dev, qidx, req, status, used_len, n)
            n += 1
            if (n == BATCH or self.held or req.len >= PUBLISH_AFTER_BYTES
                    or req.type == V.T_FLUSH):
                self._end_batch(dev, qidx, n)
                n = 0
                if self.held:
                    return
        self._end_batch(dev, qidx, n)

    def _serve_plain(self, dev: object, qidx: int, req: object, n: int) -> tuple[int, int]:
        """`lvu.serve` on the batch of `n` filled entries: what it returned, and the fill count
        after it."""
        fast, filled = self._fast, self._filled
        self._sync_plain_path()
        filled[0] = n
        got = lvu.serve(dev, qidx, req, fast, filled)
        if fast.staged or fast.big_failed:
            self._take_over()
        return got, filled[0]

    def lend_plain_path(self) -> tuple[Any, Any] | None:
        """The C path's state and request, for kicks served wholly in C while the serve loop
        waits (`lvu.Connection.wait`); None when every kick must come here: no C path, a stop
        point holds the queues, or the connection is gone."""
        fast, conn = self._fast, self.conn
        if fast is None or self.held or conn is None or not conn.open:
            return None
        self._sync_plain_path()
        return fast, self._req

    def take_back_plain_path(self) -> None:
        """What C appended while lent (records, FLUSHes) joins the sink, before anything else
        looks at it."""
        fast = self._fast
        if fast.staged or fast.big_failed:
            self._take_over()

    def _sync_plain_path(self) -> None:
        """Tell the C path what Python may have changed since it last ran: whether writes may
        go there, and where the log's next entry and room are."""
        fast: Any = self._fast
        serving = not self.readonly and self.log_full is None
        fast.writes = serving and not self._fua
        fast.big_writes = self._pipe is not None and self.on_log_full == "fail"
        # An observer hears of every FLUSH entry (stop points, event subscribers): in Python.
        fast.flushes = serving and self.sink.observer is None
        writer = self._fast_writer
        if writer is not None:
            fast.next_block = writer.next_block
            fast.next_index = writer.next_index
            fast.room_end = writer.room_end

    def _plain_flush_failed(self, got: int, dev: object, qidx: int, req: object, n: int
                            ) -> int:
        """Answer a FLUSH whose sync failed in the C path (`got`: which one); the batch's fill
        count after it."""
        fast: Any = self._fast
        if got == lvu.SERVE_IMAGE_NOT_DURABLE:
            self.counts[C_FLUSH] += 1
            status, used_len = self._image_not_durable(OSError(fast.error,
                                                               os.strerror(fast.error)))
            lvu.fill(dev, qidx, req, status, used_len, n)
            return n + 1
        assert got == lvu.SERVE_LOG_NOT_DURABLE
        # As LogWriter.commit raises it in Python.
        writer = self._fast_writer
        assert writer is not None
        raise writer.sync_failed(fast.error)

    def _take_over(self) -> None:
        """What the C path did since Python last looked: the entries it appended, then the
        big writes it could not log."""
        fast: Any = self._fast
        if fast.staged:
            self._take_staged()
        if fast.big_failed:
            self._big_writes_unlogged()

    def _big_writes_unlogged(self) -> None:
        """The log could not take a big write's record in C: that write and those in flight
        behind it completed IOERR, on the image but not in the log (as vhost/pipeline.py's
        fail). A full log makes the device log-full; any other error is raised, as LogWriter
        raises it in Python."""
        fast: Any = self._fast
        writer = self._fast_writer
        assert writer is not None
        failed, unlogged = fast.big_failed, fast.big_unlogged
        fast.big_failed = 0
        fast.big_unlogged = 0
        problem = (writer.size_limit_reached() if failed == lvu.BIG_SIZE_LIMIT
                   else writer.write_failed(failed))
        if not isinstance(problem, LogFullError):
            raise problem
        self._full(problem, unlogged + self.sink.unflushed)

    def _take_staged(self) -> None:
        """What the C path appended since Python last looked joins the sink, in order: runs of
        staged records, and the FLUSHes that carried every record before them (a 0)."""
        fast: Any = self._fast
        sink, writer = self._fast_sink, self._fast_writer
        assert sink is not None
        appended = lvu.unpack(fast.blocks, fast.staged)
        fast.staged = 0
        if writer is None:                      # passthrough: only FLUSHes
            for _ in appended:
                sink.flushed_by_device(0)
            return
        assert isinstance(sink, LogWritesSink)
        start = 0
        if 0 in appended:
            block = writer.next_block
            for i, blocks in enumerate(appended):
                if blocks == 0:
                    if i > start:
                        block += sum(appended[start:i])
                        sink.staged_by_device(appended[start:i], block)
                    block += 1
                    sink.flushed_by_device(block)
                    start = i + 1
        if start < len(appended):
            sink.staged_by_device(appended[start:], fast.next_block)

    def _big_write(self, req: object) -> tuple[list, int, int, int, int] | None:
        """(buffers, offset, bytes, sector, sectors) of a valid big write for the pipeline;
        None for anything else, which `_handle` serves (and refuses, if it must)."""
        nbytes = req.len  # type: ignore[attr-defined]
        if (req.type != V.T_OUT or nbytes < PARALLEL_MIN  # type: ignore[attr-defined]
                or req.problem or self._fua):  # type: ignore[attr-defined]
            return None
        offset = req.sector * REQ_SECTOR  # type: ignore[attr-defined]
        if self._write_refused(offset, nbytes):
            return None
        self.counts[C_OUT] += 1
        ss = self.sectorsize
        return self._buffers(req), offset, nbytes, offset // ss, nbytes // ss

    def _complete_big(self, dev: object, qidx: int) -> None:
        """Complete the pipeline's oldest big write and publish it at once."""
        pipe = self._pipe
        assert pipe is not None
        req, nbytes, problem = pipe.finish_oldest()
        if problem is None:
            self._bytes_written += nbytes
            status = _OK
        else:
            self.counts[C_ERROR] += 1
            status = _IOERR
            if isinstance(problem, LogFullError) and self.log_full is None:
                # On the image, not in the log (as for a write served here): the device is
                # log-full from now on, and the records still waiting can never count.
                self._full(problem, 1 + self.sink.unflushed)
            elif isinstance(problem, LogFullError):
                self.unlogged += 1
            else:  # its image write failed (the pipeline logged why)
                self._image_failed(str(problem), None)
        lvu.fill(dev, qidx, req, status[0], status[1], 0)
        lvu.publish(dev, qidx, 1)
        pipe.recycle(req)

    def _end_batch(self, dev: object, qidx: int, n: int) -> None:
        if self._wrote_through:
            # Write-through: durable on completion, the image as well as the log.
            os.fdatasync(self._fd)
            self._wrote_through = False
        self.sink.batch_end()
        lvu.publish(dev, qidx, n)

    def _handle(self, req: object) -> tuple[int, int]:
        kind = req.type  # type: ignore[attr-defined]
        if req.problem:  # type: ignore[attr-defined]
            self.counts[C_ERROR] += 1
            return (V.S_IOERR, 0 if req.problem == lvu.REQ_NO_STATUS else 1)  # type: ignore
        if kind == V.T_IN:
            return self._read(req)
        if kind == V.T_OUT:
            return self._write(req)
        if kind == V.T_FLUSH:
            return self._flush()
        if kind == V.T_DISCARD or kind == V.T_WRITE_ZEROES:
            return self._ranges(req, kind == V.T_DISCARD)
        if kind == V.T_GET_ID:
            return self._get_id(req)
        self.counts[C_UNSUPP] += 1
        return _UNSUPP

    def _buffers(self, req: object) -> list:
        iov, buffer = req.iov, lvu.buffer  # type: ignore[attr-defined]
        return [buffer(iov[i].iov_base, iov[i].iov_len)
                for i in range(req.niov)]  # type: ignore[attr-defined]

    def _outside(self, offset: int, nbytes: int) -> bool:
        """Not whole sectors inside the device."""
        ss = self.sectorsize
        return bool(offset % ss or nbytes % ss or offset + nbytes > self.size)

    def _write_refused(self, offset: int, nbytes: int) -> bool:
        """A write that must fail without touching the image or the log."""
        return self.readonly or self._outside(offset, nbytes) or self.log_full is not None

    def _read(self, req: object) -> tuple[int, int]:
        nbytes = req.len  # type: ignore[attr-defined]
        offset = req.sector * REQ_SECTOR  # type: ignore[attr-defined]
        if self._outside(offset, nbytes):
            self.counts[C_ERROR] += 1
            return _IOERR
        self.counts[C_IN] += 1
        if nbytes:
            try:
                got = os.preadv(self._fd, self._buffers(req), offset)
            except OSError as err:
                got = self._image_failed(f"read of {nbytes} bytes at byte {offset}", err)
            if got != nbytes:
                if got >= 0:
                    self._image_failed(f"read of {nbytes} bytes at byte {offset}",
                                       f"short read ({got} bytes)")
                self.counts[C_ERROR] += 1
                return _IOERR
            self._bytes_read += nbytes
        return (V.S_OK, nbytes + 1)

    def _write(self, req: object) -> tuple[int, int]:
        nbytes = req.len  # type: ignore[attr-defined]
        offset = req.sector * REQ_SECTOR  # type: ignore[attr-defined]
        if self._write_refused(offset, nbytes):
            self.counts[C_ERROR] += 1
            return _IOERR
        self.counts[C_OUT] += 1
        if not nbytes:
            return _OK                  # nothing written, nothing to log
        buffers = self._buffers(req)
        if nbytes >= PARALLEL_MIN and not self._fua and self.sink.keeps_log:
            return self._write_big(buffers, offset, nbytes)
        try:
            written = os.pwritev(self._fd, buffers, offset)
        except OSError as err:
            written = self._image_failed(f"write of {nbytes} bytes at byte {offset}", err)
        if written != nbytes:
            self._short_write(written, nbytes, offset)
            self.counts[C_ERROR] += 1
            return _IOERR
        self._bytes_written += nbytes
        ss = self.sectorsize
        if not self._record(offset // ss, nbytes // ss, self._fua, buffers):
            self.counts[C_ERROR] += 1
            return _IOERR
        if self._fua:
            self._wrote_through = True
        return _OK

    def _worker(self) -> ThreadPoolExecutor:
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lw-image")
        return self._io

    def _write_big(self, buffers: list, offset: int, nbytes: int) -> tuple[int, int]:
        """A big write: the image is written by the worker while the record is logged (for a
        MiB, each side is a copy or a device write of about a millisecond); a request whose
        image write failed is taken back out of the log."""
        ss = self.sectorsize
        image_write = self._worker().submit(os.pwritev, self._fd, buffers, offset)
        logged = False
        try:
            logged = self._record(offset // ss, nbytes // ss, 0, buffers)
        finally:
            try:
                written = image_write.result()
            except OSError as err:
                written = self._image_failed(f"write of {nbytes} bytes at byte {offset}", err)
        if written != nbytes:
            self._short_write(written, nbytes, offset)
            if logged:
                self.sink.retract()
            self.counts[C_ERROR] += 1
            return _IOERR
        if not logged:
            self.counts[C_ERROR] += 1
            return _IOERR
        self._bytes_written += nbytes
        return _OK

    def _flush(self) -> tuple[int, int]:
        self.counts[C_FLUSH] += 1
        if self.readonly:
            return _OK
        if self.log_full is not None:
            self.counts[C_ERROR] += 1
            return _IOERR
        sink = self.sink
        ticket = sink.flush_taken()
        if sink.keeps_log:
            # The image's pages start for the disk now; the sink syncs the log meanwhile and
            # counts the flush's entries only once image_durable() returned. (A worker thread
            # syncing the image cost ~60 us more CPU per FLUSH in hand-overs than it saved.)
            self._start_writeback()

        def image_durable() -> None:
            try:
                os.fdatasync(self._fd)
            except OSError as err:
                raise _ImageNotDurable(err) from err

        try:
            while True:
                try:
                    sink.flush_durable(ticket, image_durable)
                    return _OK
                except LogFullError as err:
                    if self._held_for_room(err, "FLUSH"):
                        continue        # the user made room: the same FLUSH again
                    self._full(err, sink.unflushed)
                    self.counts[C_ERROR] += 1
                    return _IOERR
        except _ImageNotDurable as err:
            assert isinstance(err.__cause__, OSError)
            return self._image_not_durable(err.__cause__)

    def _image_not_durable(self, err: OSError) -> tuple[int, int]:
        """A FLUSH whose image sync failed: the records it carried must not be counted as
        flushed; they wait for a FLUSH that succeeds."""
        log.warning("image sync for a FLUSH: %s (%d records not flushed)", err,
                    self.sink.unflushed)
        self._image_failed("sync for a FLUSH", err, logged=True)
        self.counts[C_ERROR] += 1
        return _IOERR

    def _image_failed(self, what: str, why: OSError | str | None, logged: bool = False) -> int:
        """An image read, write or sync failed: the guest gets an I/O error (DESIGN §3.8),
        which is all its tools can say, so the first reason stays for `status` (a recording
        whose disk filled up must say so). Returns -1, a failed transfer's byte count."""
        text = what if why is None else f"{what}: {getattr(why, 'strerror', None) or why}"
        if why is not None and not logged:
            log.warning("image %s", text)
        if self.image_error is None:
            self.image_error = f"image {text}"
        return -1

    def _short_write(self, written: int, nbytes: int, offset: int) -> None:
        if written >= 0:    # no error raised: the image's filesystem ran out of room part-way
            self._image_failed(f"write of {nbytes} bytes at byte {offset}",
                               f"no room left on its filesystem ({written} bytes written)")

    def _start_writeback(self) -> None:
        """Best effort: where sync_file_range cannot start it (a block device on some
        kernels, a filesystem without it), fdatasync does all the work later."""
        if self._writeback_unsupported:
            return
        if lvu.start_writeback(self._fd) < 0:
            self._writeback_unsupported = True

    def _record(self, sector: int, nr_sectors: int, flags: int,
                data: list | None) -> bool:
        """Tell the sink a request completed on the image; False if the log could not take it
        (the device is log-full from then on)."""
        while True:
            try:
                self.sink.completed(sector, nr_sectors, flags, data)
                return True
            except LogFullError as err:
                if self._held_for_room(err, "write"):
                    continue        # the guest's buffers are still ours: log them again
                # On the image, not in the log: the guest must not believe it logged, and
                # the records waiting for a flush can never be counted now.
                self._full(err, 1 + self.sink.unflushed)
                return False

    def _held_for_room(self, err: LogFullError, what: str) -> bool:
        """With `on_log_full="pause"`: hold the request (uncompleted) until the user made room
        and sent `resume`; True to retry it, False to fail it (or in fail mode)."""
        pause = self.pause_until_resumed
        if self.on_log_full != "pause" or pause is None:
            return False
        self.log_full_events += 1
        log.warning("log full: %s; %s held until resume", err, what)
        return pause(str(err))

    def _get_id(self, req: object) -> tuple[int, int]:
        self.counts[C_GET_ID] += 1
        left = memoryview(self._id)
        done = 0
        for buf in self._buffers(req):
            take = min(len(buf), len(left))
            buf[:take] = left[:take]
            left = left[take:]
            done += take
            if not left:
                break
        return (V.S_OK, done + 1)

    def _ranges(self, req: object, discard: bool) -> tuple[int, int]:
        """DISCARD or WRITE_ZEROES: every segment is checked before any is applied."""
        nbytes = req.len  # type: ignore[attr-defined]
        count = nbytes // SEGMENT.size
        if self.readonly or not count or nbytes % SEGMENT.size or self.log_full is not None:
            self.counts[C_ERROR] += 1
            return _IOERR
        if count > MAX_DISCARD_SEG:
            self.counts[C_UNSUPP] += 1
            return _UNSUPP
        raw = b"".join(self._buffers(req))
        allowed = 0 if discard else V.WRITE_ZEROES_FLAG_UNMAP
        ss = self.sectorsize
        ranges = []
        for req_sector, num_sectors, flags in SEGMENT.iter_unpack(raw):
            if flags & ~allowed:
                self.counts[C_UNSUPP] += 1
                return _UNSUPP
            offset, length = req_sector * REQ_SECTOR, num_sectors * REQ_SECTOR
            if num_sectors > MAX_RANGE_SECTORS or self._outside(offset, length):
                self.counts[C_ERROR] += 1
                return _IOERR
            if length:
                ranges.append((offset, length, flags))
        self.counts[C_DISCARD if discard else C_WRITE_ZEROES] += 1
        for offset, length, flags in ranges:
            try:
                if discard:
                    self._punch(offset, length)
                else:
                    self._zero(offset, length, bool(flags & V.WRITE_ZEROES_FLAG_UNMAP))
            except OSError as err:
                self._image_failed(f"{'discard' if discard else 'write-zeroes'} of {length} "
                                   f"bytes at byte {offset}", err)
                self.counts[C_ERROR] += 1
                return _IOERR
            flags = DISCARD if discard else self._fua
            if not self._record(offset // ss, length // ss, flags, None):
                self.counts[C_ERROR] += 1
                return _IOERR
            if flags & FUA:
                self._wrote_through = True
        return _OK

    def _punch(self, offset: int, length: int) -> None:
        # A discarded range reads back as zeros afterwards (a hole), as a replay leaves it.
        rc = lvu.fallocate(self._fd, lvu.FALLOC_FL_PUNCH_HOLE | lvu.FALLOC_FL_KEEP_SIZE,
                           offset, length)
        if rc == -errno.EOPNOTSUPP:
            self._write_zeros(offset, length)
        elif rc:
            raise OSError(-rc, os.strerror(-rc))

    def _zero(self, offset: int, length: int, unmap: bool) -> None:
        if unmap:
            self._punch(offset, length)
            return
        rc = lvu.fallocate(self._fd, lvu.FALLOC_FL_ZERO_RANGE | lvu.FALLOC_FL_KEEP_SIZE,
                           offset, length)
        if rc == -errno.EOPNOTSUPP:
            self._punch(offset, length)
        elif rc:
            raise OSError(-rc, os.strerror(-rc))

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = memoryview(_ZEROS)
        end = offset + length
        while offset < end:
            take = min(end - offset, len(zeros))
            offset += os.pwrite(self._fd, zeros[:take], offset)

    # -- reporting -----------------------------------------------------------------------------

    def requests(self) -> dict[str, int]:
        counts = list(self.counts)
        if self._fast is not None:
            counts[C_IN] += self._fast.reads
            counts[C_OUT] += self._fast.writes_done
            counts[C_FLUSH] += self._fast.flushes_done
            counts[C_ERROR] += self._fast.errors
        return dict(zip(COUNTER_NAMES, counts, strict=True))

    @property
    def served_in_c(self) -> int:
        """Requests the C path served (plain reads and writes)."""
        fast = self._fast
        return 0 if fast is None else fast.reads + fast.writes_done + fast.flushes_done

    @property
    def big_writes_in_c(self) -> int:
        """Big writes C's pipeline logged and completed OK (each counts in `served_in_c` too,
        from its image write on)."""
        return 0 if self._fast is None else self._fast.big_done

    @property
    def kicks_in_c(self) -> int:
        """Kicks served wholly in C while the serve loop waited, Python asleep."""
        return 0 if self._fast is None else self._fast.kicks

    @property
    def bytes_read(self) -> int:
        return self._bytes_read + (self._fast.bytes_read if self._fast is not None else 0)

    @property
    def bytes_written(self) -> int:
        return self._bytes_written + (self._fast.bytes_written if self._fast is not None
                                      else 0)
