"""vhost-user through libvhost-user: one connection from QEMU, its watches, its dispatch.

The one importer of the cffi extension `vhost._lvu` (STYLE §5). A `Connection` takes an
accepted socket, hands it to libvhost-user (`vu_init`) and asks its `Watches` (the serve loop)
to call back when the socket or a kick eventfd is readable; it then runs `vu_dispatch` or the
callback libvhost-user gave for that fd. libvhost-user's callbacks come back through the
`@ffi.def_extern` functions below, which find the connection from the handle and hand over to
its `Device` (vhost/blk.py): a queue started or stopped, a queue kicked, a config write.

libvhost-user would `exit(0)` on end-of-file; the glue intercepts request 0 and sets a flag,
which `dispatch()` turns into `disconnected`. An exception inside a callback cannot cross C:
it is remembered and re-raised when the C call that led to it returns.

The glue also holds virtio-blk's config space and parses requests (header, status byte), so
the device's hot path calls `pop`/`fill`/`publish` straight into C. The serve loop waits
through `Connection.wait` (the glue's `lw_wait`): libvhost-user's watches, the kick eventfds,
are served in C as they fire, with the device's plain path lent for the kick's requests, and
only the loop's other fds return to Python.

In-flight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) is always offered: QEMU then keeps
libvhost-user's in-flight region across a backend restart and the restarted backend resubmits
what was popped but never published. With it negotiated the glue publishes one used entry at a
time (libvhost-user's push) and still notifies once per batch. Each popped request has an
identity (queue, head, in-flight counter: `Connection.current()`); when a queue (re)starts, the
connection reports the resubmissions libvhost-user found (`on_queue_resumed`) and accepts
`expect(...)`: resubmissions already done, which the glue completes without the device.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any, Final, Protocol

from logwrites.errors import LogwritesError
from vhost._lvu import ffi, lib

log = logging.getLogger(__name__)

# Re-exported for the device's hot path (attribute lookups at import, not per request).
pop: Final = lib.lw_pop
fill: Final = lib.lw_fill
publish: Final = lib.lw_publish
fallocate: Final = lib.lw_fallocate
start_writeback: Final = lib.lw_start_writeback
buffer: Final = ffi.buffer
new_request: Final = lambda: ffi.new("LwReq *")  # noqa: E731
serve: Final = lib.lw_serve
unpack: Final = ffi.unpack
SERVE_EMPTY: Final = lib.LW_SERVE_EMPTY
SERVE_POPPED: Final = lib.LW_SERVE_POPPED
SERVE_PUBLISH: Final = lib.LW_SERVE_PUBLISH
SERVE_FLUSHED: Final = lib.LW_SERVE_FLUSHED
SERVE_IMAGE_NOT_DURABLE: Final = lib.LW_SERVE_IMAGE_NOT_DURABLE
SERVE_LOG_NOT_DURABLE: Final = lib.LW_SERVE_LOG_NOT_DURABLE
BIG_SIZE_LIMIT: Final = lib.LW_BIG_SIZE_LIMIT
memmove: Final = ffi.memmove


def new_fast() -> Any:
    """The C path's state for plain requests and big writes (LwFast, see _lvu_glue.c);
    freeing it stops its log thread."""
    fast = lib.lw_fast_new()
    if fast == ffi.NULL:
        raise MemoryError("LwFast")
    return ffi.gc(fast, lib.lw_fast_free)


def new_counter() -> Any:
    return ffi.new("unsigned int *")

REQ_OK: Final = lib.LW_REQ_OK
REQ_NO_HEADER: Final = lib.LW_REQ_NO_HEADER
REQ_NO_STATUS: Final = lib.LW_REQ_NO_STATUS
WCE_OFFSET: Final = lib.LW_WCE_OFFSET
CONFIG_SIZE: Final = lib.LW_CONFIG_SIZE
FALLOC_FL_KEEP_SIZE: Final = lib.FALLOC_FL_KEEP_SIZE
FALLOC_FL_PUNCH_HOLE: Final = lib.FALLOC_FL_PUNCH_HOLE
FALLOC_FL_ZERO_RANGE: Final = lib.FALLOC_FL_ZERO_RANGE


class VirtioBlk:
    """virtio-blk's numbers, taken from the standard header the glue compiles against."""

    T_IN: Final = lib.VIRTIO_BLK_T_IN
    T_OUT: Final = lib.VIRTIO_BLK_T_OUT
    T_FLUSH: Final = lib.VIRTIO_BLK_T_FLUSH
    T_GET_ID: Final = lib.VIRTIO_BLK_T_GET_ID
    T_DISCARD: Final = lib.VIRTIO_BLK_T_DISCARD
    T_WRITE_ZEROES: Final = lib.VIRTIO_BLK_T_WRITE_ZEROES
    S_OK: Final = lib.VIRTIO_BLK_S_OK
    S_IOERR: Final = lib.VIRTIO_BLK_S_IOERR
    S_UNSUPP: Final = lib.VIRTIO_BLK_S_UNSUPP
    ID_BYTES: Final = lib.VIRTIO_BLK_ID_BYTES
    WRITE_ZEROES_FLAG_UNMAP: Final = lib.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    F_SIZE_MAX: Final = lib.VIRTIO_BLK_F_SIZE_MAX
    F_SEG_MAX: Final = lib.VIRTIO_BLK_F_SEG_MAX
    F_RO: Final = lib.VIRTIO_BLK_F_RO
    F_BLK_SIZE: Final = lib.VIRTIO_BLK_F_BLK_SIZE
    F_FLUSH: Final = lib.VIRTIO_BLK_F_FLUSH
    F_TOPOLOGY: Final = lib.VIRTIO_BLK_F_TOPOLOGY
    F_CONFIG_WCE: Final = lib.VIRTIO_BLK_F_CONFIG_WCE
    F_MQ: Final = lib.VIRTIO_BLK_F_MQ
    F_DISCARD: Final = lib.VIRTIO_BLK_F_DISCARD
    F_WRITE_ZEROES: Final = lib.VIRTIO_BLK_F_WRITE_ZEROES


PROTOCOL_F_MQ: Final = lib.VHOST_USER_PROTOCOL_F_MQ
PROTOCOL_F_CONFIG: Final = lib.VHOST_USER_PROTOCOL_F_CONFIG
PROTOCOL_F_INFLIGHT_SHMFD: Final = lib.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD

# Ready fds one `Connection.wait` returns at most (the glue takes 16 events per epoll_wait).
READY_MAX: Final = 16

# (qidx, head, counter) of a popped request: what libvhost-user's in-flight region knows it by.
Identity = tuple[int, int, int]


class Watches(Protocol):
    """The event loop: call `callback(fd)` whenever `fd` is readable, until unwatched."""

    def watch(self, fd: int, callback: Callable[[int], None]) -> None: ...

    def unwatch(self, fd: int) -> None: ...


class Device(Protocol):
    """What a connection tells the device (vhost/blk.py implements it)."""

    def queue_started(self, qidx: int, started: bool) -> None: ...

    def kick(self, qidx: int, got: int = -1, filled: int = 0) -> None:
        """Serve queue `qidx`; `got` and `filled`: where the C path left the kick it began
        (`Connection.wait`), or -1 and 0."""

    def lend_plain_path(self) -> tuple[Any, Any] | None:
        """The plain path's state and request (LwFast *, LwReq *), in sync, for kicks served
        in C during `Connection.wait`; None to serve them all through `kick`."""

    def take_back_plain_path(self) -> None:
        """After `Connection.wait`: take over what C served meanwhile."""

    def set_config(self, offset: int, data: bytes) -> bool: ...


class VhostUserError(LogwritesError):
    """libvhost-user gave up on the connection (its panic callback)."""


_failures: list[BaseException] = []


def _remember_failure(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    # An exception must not vanish inside C: keep it for the caller of the C function.
    _failures.append(exc.with_traceback(tb))


def _raise_remembered() -> None:
    if _failures:
        first = _failures[0]
        _failures.clear()
        raise first


class Connection:
    """One vhost-user connection, from `vu_init` to `vu_deinit`.

    `dev` is the glue's `LwDev *` (the device passes it to `pop`/`fill`/`publish`).
    """

    def __init__(self, sock: socket.socket, device: Device, watches: Watches, *,
                 max_queues: int, features: int, protocol_features: int,
                 inflight: bool = True) -> None:
        self.device = device
        self.watches = watches
        self.disconnected = False
        self.panic: str | None = None
        # Told, before a (re)started queue's first pop, which requests libvhost-user will
        # resubmit on it: (qidx, [(head, counter), ...] in pop order).
        self.on_queue_resumed: Callable[[int, list[tuple[int, int]]], None] | None = None
        if inflight:
            protocol_features |= 1 << PROTOCOL_F_INFLIGHT_SHMFD
        self._ready = ffi.new("int[]", READY_MAX)
        self._handle = ffi.new_handle(self)      # kept alive as long as C may call back
        self._watch: dict[int, tuple[Any, Any]] = {}
        self.dev = lib.lw_new(self._handle)
        if self.dev == ffi.NULL:
            raise MemoryError("lw_new")
        self.dev.features = features
        self.dev.protocol_features = protocol_features
        self._vudev = ffi.cast("VuDev *", self.dev)
        self.fd = sock.detach()                  # libvhost-user closes it in vu_deinit
        if not lib.lw_init(self.dev, max_queues, self.fd):
            lib.lw_free(self.dev)
            self.dev = ffi.NULL
            raise VhostUserError("vu_init failed")
        watches.watch(self.fd, self._readable)

    @property
    def open(self) -> bool:
        return self.dev != ffi.NULL

    def _readable(self, fd: int) -> None:
        ok = lib.vu_dispatch(self._vudev)
        if not ok or self.dev.disconnected or self.dev.dev.broken:
            self.disconnected = True
        _raise_remembered()

    def wait(self, epfd: int) -> list[int]:
        """Block on the serve loop's epoll set `epfd` until an fd other than libvhost-user's
        is readable, serving kicks meanwhile (in C, with the device's plain path lent): the
        fds for the loop's callbacks; [] when Python ran in between (look again) or a signal
        came."""
        device = self.device
        lent = device.lend_plain_path()
        fast, req = lent if lent is not None else (ffi.NULL, ffi.NULL)
        ready = self._ready
        n = lib.lw_wait(self.dev, epfd, ready, READY_MAX, fast, req)
        if lent is not None:
            device.take_back_plain_path()
        # A panic in a kick (the one way a kick breaks the connection) already set
        # `disconnected` through lw_py_panic.
        _raise_remembered()
        if n < 0:
            raise OSError(-n, f"epoll_wait: {os.strerror(-n)}")
        return ffi.unpack(ready, n) if n else []

    def _fire(self, fd: int) -> None:
        cb, data = self._watch[fd]
        lib.lw_call_watch(self.dev, cb, lib.VU_WATCH_IN, data)
        _raise_remembered()

    def queue_started(self, qidx: int) -> bool:
        return self.open and bool(lib.lw_queue_started(self.dev, qidx))

    def inflight(self, qidx: int) -> bool:
        """Whether queue `qidx` runs with in-flight tracking (negotiated, region mapped)."""
        return self.open and bool(lib.lw_inflight(self.dev, qidx))

    def current(self) -> Identity:
        """The identity of the request popped last (the one the device is serving)."""
        dev = self.dev
        return (dev.cur_qidx, dev.cur_head, dev.cur_counter)

    def expect(self, qidx: int, head: int, counter: int) -> None:
        """A resubmission of (qidx, head, counter) is already done: complete it OK, unseen by
        the device (see vhost/pending.py)."""
        if not lib.lw_expect(self.dev, qidx, head, counter):
            raise MemoryError("lw_expect")

    @property
    def resubmitted(self) -> int:
        """Resubmitted requests popped so far on this connection."""
        return int(self.dev.resubmitted) if self.open else 0

    @property
    def duplicates(self) -> int:
        """Of those, how many were already done and completed without the device."""
        return int(self.dev.duplicates) if self.open else 0

    def _queue_resumed(self, qidx: int, count: int) -> None:
        if self.on_queue_resumed is None:
            return
        head, counter = ffi.new("uint16_t *"), ffi.new("uint64_t *")
        found = []
        for i in range(count):
            lib.lw_resubmit(self.dev, qidx, i, head, counter)
            found.append((head[0], counter[0]))
        self.on_queue_resumed(qidx, found)

    def set_blk_config(self, *, capacity: int, size_max: int, seg_max: int, blk_size: int,
                       wce: int, num_queues: int, max_discard_sectors: int,
                       max_discard_seg: int, discard_sector_alignment: int,
                       max_write_zeroes_sectors: int, max_write_zeroes_seg: int,
                       write_zeroes_may_unmap: int) -> None:
        """virtio-blk's config space as GET_CONFIG returns it (`capacity` in 512-byte units)."""
        lib.lw_set_blk_config(self.dev, capacity, size_max, seg_max, blk_size, wce,
                              num_queues, max_discard_sectors, max_discard_seg,
                              discard_sector_alignment, max_write_zeroes_sectors,
                              max_write_zeroes_seg, write_zeroes_may_unmap)

    def set_wce(self, wce: int) -> None:
        lib.lw_set_wce(self.dev, wce)

    def close(self) -> None:
        """`vu_deinit`: unmaps guest memory, closes the socket and the queues' eventfds."""
        if self.dev == ffi.NULL:
            return
        self.watches.unwatch(self.fd)
        lib.vu_deinit(self._vudev)
        for fd in list(self._watch):
            self._remove_watch(fd)
        lib.lw_free(self.dev)
        self.dev = ffi.NULL
        _raise_remembered()

    # -- libvhost-user's callbacks (through the def_extern functions below) ------------------

    def _set_watch(self, fd: int, cb: Any, data: Any) -> None:
        # set_watch may replace the watch of an fd it already watches.
        if fd in self._watch:
            self.watches.unwatch(fd)
        self._watch[fd] = (cb, data)
        self.watches.watch(fd, self._fire)

    def _remove_watch(self, fd: int) -> None:
        if self._watch.pop(fd, None) is not None:
            self.watches.unwatch(fd)


@ffi.def_extern(onerror=_remember_failure)
def lw_py_panic(owner: Any, err: Any) -> None:
    conn: Connection = ffi.from_handle(owner)
    conn.panic = ffi.string(err).decode(errors="replace")
    conn.disconnected = True
    log.error("vhost-user: %s", conn.panic)


@ffi.def_extern(onerror=_remember_failure)
def lw_py_set_watch(owner: Any, fd: int, condition: int, cb: Any, data: Any) -> None:
    ffi.from_handle(owner)._set_watch(fd, cb, data)


@ffi.def_extern(onerror=_remember_failure)
def lw_py_remove_watch(owner: Any, fd: int) -> None:
    ffi.from_handle(owner)._remove_watch(fd)


@ffi.def_extern(onerror=_remember_failure)
def lw_py_queue_started(owner: Any, qidx: int, started: bool) -> None:
    ffi.from_handle(owner).device.queue_started(qidx, started)


@ffi.def_extern(onerror=_remember_failure)
def lw_py_kick(owner: Any, qidx: int) -> None:
    ffi.from_handle(owner).device.kick(qidx)


@ffi.def_extern(onerror=_remember_failure)
def lw_py_kick_from(owner: Any, qidx: int, got: int, filled: int) -> None:
    ffi.from_handle(owner).device.kick(qidx, got, filled)


@ffi.def_extern(onerror=_remember_failure)
def lw_py_queue_resumed(owner: Any, qidx: int, resubmits: int) -> None:
    ffi.from_handle(owner)._queue_resumed(qidx, resubmits)


@ffi.def_extern(onerror=_remember_failure)
def lw_py_set_config(owner: Any, data: Any, offset: int, size: int, flags: int) -> int:
    accepted = ffi.from_handle(owner).device.set_config(offset, bytes(ffi.buffer(data, size)))
    return 0 if accepted else -1
