"""Big writes in flight together, in `logwrites` mode: the disks never wait for the guest.

The same pipeline runs in C (vhost/_lvu_glue.c, "Big writes in flight"), which serves big
writes by default; this one serves them where C does not: `LOGWRITES_PLAIN_IN_C=0`, or a write
C handed back (its image write failed, C's table of appended entries is full).

Served one at a time, a logged 1 MiB write is its image copy and its O_DIRECT log append side
by side, then a gap before the next one starts: waiting for the image copy to finish,
completing, publishing, popping the next request (measured under fio's 1 MiB writes at queue
depth 4: ~0.9 ms of log write, then ~0.23 ms with the log's disk idle). Here up to `DEPTH` big
writes are in flight at once, each in three stages on three threads:

- the device's thread pops and validates it, and hands it on;
- the image worker writes it to the image (in pop order);
- the log thread, once its image write succeeded, hands it to the sink (in pop order, which
  is therefore the completion order the log records), straight from the guest's buffers;

and the device's thread completes each in pop order once its record is in the log. The
guest's buffers stay untouched until then (the request is not completed before its record is
written), and a record is logged only after its image write succeeded, so no record is ever
taken back. Rule 1 of DESIGN §3 is unchanged: the records are uncounted until a FLUSH, and
the device drains the pipeline before it serves anything else (a FLUSH, a FUA write, a mark
between two kicks), so the sink is only ever called from one thread at a time.

Only for the plain `logwrites` sink with `on_log_full="fail"`: the pending journal follows
each request from pop to completion one at a time, `immediate` mode tells observers about each
entry as it is logged (that code expects the device's thread), and pausing a request on a full
log needs the device's thread to wait for `resume`.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

from logwrites.logfile import LogFullError
from vhost import lvu
from vhost.ordering import LogWritesSink

log = logging.getLogger(__name__)

DEPTH: Final = 8          # big writes in flight (fio's 1 MiB job keeps 4 queued)


class _Unlogged(Exception):
    """A request's image write failed (or was short): the request fails, nothing is logged."""


class BigWritePipeline:
    """The in-flight big writes of one device, oldest first."""

    __slots__ = ("_broken", "_image", "_inflight", "_log", "_sink", "_spare")

    def __init__(self, sink: LogWritesSink,
                 image_worker: Callable[[], ThreadPoolExecutor]) -> None:
        self._sink = sink
        self._image = image_worker
        self._log: ThreadPoolExecutor | None = None
        self._inflight: deque[tuple[object, int, Future[None]]] = deque()
        self._spare: list[object] = []
        # Set by the log thread when the log could not take a record: every later record
        # would leave a hole in completion order, so none is logged (the device is log-full).
        self._broken: LogFullError | None = None

    def __len__(self) -> int:
        return len(self._inflight)

    def start(self, req: object, fd: int, buffers: list, offset: int, nbytes: int,
              sector: int, nr_sectors: int) -> object:
        """Put a validated big write in flight; returns a fresh request for the next pop (the
        given one belongs to the pipeline until `finish_oldest` completes it)."""
        image = self._image().submit(os.pwritev, fd, buffers, offset)
        if self._log is None:
            self._log = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lw-log")
        logged = self._log.submit(self._log_after_image, image, offset, nbytes, sector,
                                  nr_sectors, buffers)
        self._inflight.append((req, nbytes, logged))
        return self._spare.pop() if self._spare else lvu.new_request()

    def _log_after_image(self, image: Future[int], offset: int, nbytes: int, sector: int,
                         nr_sectors: int, buffers: list) -> None:
        """On the log thread: the record, once its data is on the image."""
        try:
            written = image.result()
        except OSError as err:
            raise _Unlogged(f"write of {nbytes} bytes at byte {offset}: "
                            f"{err.strerror or err}") from err
        if written != nbytes:
            raise _Unlogged(f"write of {nbytes} bytes at byte {offset}: no room left on its "
                            f"filesystem ({written} bytes written)")
        if self._broken is not None:
            raise self._broken
        try:
            self._sink.completed(sector, nr_sectors, 0, buffers)
        except LogFullError as err:
            self._broken = err
            raise

    def finish_oldest(self) -> tuple[object, int, BaseException | None]:
        """Wait for the oldest big write: (its request, bytes, None or why it failed)."""
        req, nbytes, logged = self._inflight.popleft()
        try:
            logged.result()
            problem: BaseException | None = None
        except _Unlogged as err:
            log.warning("image %s", err)
            problem = err
        except LogFullError as err:
            problem = err
        return req, nbytes, problem

    def recycle(self, req: object) -> None:
        """A completed request's struct, for a later pop."""
        self._spare.append(req)
