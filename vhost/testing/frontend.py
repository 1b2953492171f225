"""A vhost-user-blk front-end in pure Python: the driver tests and benchmarks use as a guest.

`BlkFrontend(socket_path)` negotiates like QEMU 7.2's vhost-user-blk (hw/virtio/vhost-user.c:
GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER, GET_CONFIG; then on start
SET_FEATURES, SET_MEM_TABLE with the memfd, SET_VRING_NUM/BASE/ADDR/KICK/CALL per queue and
SET_VRING_ENABLE), then submits virtio-blk requests. A request is a chain of *parts* in
descriptor order: `bytes` is a device-readable buffer holding them, `int` a device-writable
buffer of that many bytes (pre-filled with POISON, so an unwritten status byte shows). The
high-level calls (`read`, `write`, `flush`, ...) build the usual chain (header | payload |
status) and run it; `prepare`/`publish`/`kick`/`wait` give exact control of what is in flight;
`submit_raw` places arbitrary descriptors (loops, wild addresses) for hostile tests.
Sectors here are virtio's 512-byte units (`req_sector`).
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from vhost.testing.protocol import (
    CONFIG_HEADER,
    INFLIGHT,
    MEMORY_HEADER,
    MEMORY_REGION,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_ADDR,
    VRING_STATE,
    BackendGone,
    Channel,
    FrontendError,
    ProtocolFeature,
    Request,
    bit,
)
from vhost.testing.virtqueue import (
    ALLOC_ALIGN,
    DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    GuestMemory,
    RawDesc,
    SplitQueue,
)

log = logging.getLogger(__name__)

SECTOR_SIZE: Final = 512                      # virtio-blk's request unit, whatever blk_size is
OUTHDR: Final = struct.Struct("<IIQ")         # type, ioprio, sector
SEGMENT: Final = struct.Struct("<QII")        # sector, num_sectors, flags (discard/write-zeroes)
ID_BYTES: Final = 20                          # VIRTIO_BLK_ID_BYTES
PAGE: Final = 4096
POISON: Final = 0xA5                          # fills device-writable buffers before submission
WRITE_ZEROES_FLAG_UNMAP: Final = 1
# A made-up front-end virtual address for the memory region: libvhost-user translates ring
# addresses (SET_VRING_ADDR) through it, nothing dereferences it.
QVA_BASE: Final = 0x7F00_0000_0000

# The 60-byte virtio-blk config space of QEMU 7.2 (struct virtio_blk_config, packed).
CONFIG: Final = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")


class ReqType:
    """VIRTIO_BLK_T_* (plain ints: hostile tests send values that are not members)."""

    IN: Final = 0
    OUT: Final = 1
    FLUSH: Final = 4
    GET_ID: Final = 8
    GET_LIFETIME: Final = 10
    DISCARD: Final = 11
    WRITE_ZEROES: Final = 13
    SECURE_ERASE: Final = 14


class Status:
    """VIRTIO_BLK_S_*; NOT_WRITTEN is our poison, left when the device wrote no status."""

    OK: Final = 0
    IOERR: Final = 1
    UNSUPP: Final = 2
    NOT_WRITTEN: Final = POISON


class BlkFeature:
    """VIRTIO_BLK_F_* bit numbers."""

    SIZE_MAX: Final = 1
    SEG_MAX: Final = 2
    GEOMETRY: Final = 4
    RO: Final = 5
    BLK_SIZE: Final = 6
    FLUSH: Final = 9
    TOPOLOGY: Final = 10
    CONFIG_WCE: Final = 11
    MQ: Final = 12
    DISCARD: Final = 13
    WRITE_ZEROES: Final = 14


# What we accept when offered (QEMU's vhost-user-blk feature list, minus EVENT_IDX which this
# driver does not implement: without it the backend must notify after every batch).
WANTED_FEATURES: Final = (
    bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | sum(bit(b) for b in (BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.GEOMETRY,
                           BlkFeature.RO, BlkFeature.BLK_SIZE, BlkFeature.FLUSH,
                           BlkFeature.TOPOLOGY, BlkFeature.CONFIG_WCE, BlkFeature.MQ,
                           BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES))
)
WANTED_PROTOCOL_FEATURES: Final = (
    bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
)

Part = bytes | bytearray | int      # bytes: device-readable content; int: device-writable length


@dataclass(frozen=True, slots=True)
class BlkConfig:
    """virtio-blk config space as the backend reported it; `capacity` in 512-byte sectors."""

    capacity: int
    size_max: int
    seg_max: int
    blk_size: int
    wce: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int
    raw: bytes

    @classmethod
    def decode(cls, raw: bytes) -> BlkConfig:
        padded = raw.ljust(CONFIG.size, b"\0")
        (capacity, size_max, seg_max, _cyl, _heads, _sectors, blk_size, _pbe, _ao, _min_io,
         _opt_io, wce, _unused, num_queues, max_discard_sectors, max_discard_seg,
         discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
         write_zeroes_may_unmap) = CONFIG.unpack_from(padded)
        return cls(capacity, size_max, seg_max, blk_size, wce, num_queues, max_discard_sectors,
                   max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
                   max_write_zeroes_seg, write_zeroes_may_unmap, bytes(raw))


@dataclass(eq=False, slots=True)
class BlkRequest:
    """A request placed in a queue; after completion `used_len` and `in_data` are set.

    `in_data` is what the device-writable buffers held at completion, in chain order; its last
    byte is the status (virtio-blk puts the status byte last). `order` counts completions
    across the front-end's life, so tests can check completion order.
    """

    queue: int
    head: int
    slots: list[int]
    allocations: list[int]
    in_buffers: list[tuple[int, int]]
    # For the device-must-not-touch checks: readable buffers (gpa, content) and the unused
    # tails of writable allocations (gpa, length), which hold POISON.
    readable: list[tuple[int, bytes]] = field(default_factory=list)
    tails: list[tuple[int, int]] = field(default_factory=list)
    published: bool = False
    done: bool = False
    used_len: int = 0
    in_data: bytes = b""
    order: int = -1
    violations: list[str] = field(default_factory=list)

    @property
    def status(self) -> int | None:
        return self.in_data[-1] if self.in_data else None

    @property
    def data(self) -> bytes:
        """What the device wrote before the status byte (read payload, GET_ID string)."""
        return self.in_data[:-1]


class CompletionTimeout(FrontendError):
    """Requests still not completed when the wait ended."""

    def __init__(self, pending: list[BlkRequest], timeout_s: float) -> None:
        super().__init__(len(pending), timeout_s)
        self.pending, self.timeout_s = pending, timeout_s

    def __str__(self) -> str:
        heads = [r.head for r in self.pending]
        return f"{len(self.pending)} requests not completed within {self.timeout_s} s: {heads}"


@dataclass(frozen=True, slots=True)
class Segment:
    """One discard/write-zeroes range: `sector` and `num_sectors` in 512-byte units."""

    sector: int
    num_sectors: int
    flags: int = 0

    def encode(self) -> bytes:
        return SEGMENT.pack(self.sector & (2**64 - 1), self.num_sectors & 0xFFFFFFFF,
                            self.flags & 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class Layout:
    """How to cut a request's two byte streams into descriptors.

    The readable stream is header + payload, the writable one is read data + status byte.
    `out_cuts`/`in_cuts` are offsets into each stream where a new descriptor starts; None means
    Linux's layout (header | payload, data | status). `writable_first` puts the writable
    descriptors first (invalid: a hostile layout). `indirect` puts the chain in an indirect table.
    """

    out_cuts: tuple[int, ...] | None = None
    in_cuts: tuple[int, ...] | None = None
    indirect: bool = False
    writable_first: bool = False


DEFAULT_LAYOUT: Final = Layout()


def _buffer_align(nbytes: int) -> int:
    """Where a buffer starts in guest memory: a page for a page or more, as Linux's block
    layer hands them over (the backend's O_DIRECT log writes go straight from them), else the
    allocator's own alignment."""
    return PAGE if nbytes >= PAGE else ALLOC_ALIGN


def _cut(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


def _cut_len(total: int, cuts: Iterable[int]) -> list[int]:
    points = sorted({c for c in cuts if 0 < c < total})
    edges = [0, *points, total]
    return [b - a for a, b in itertools.pairwise(edges)]


def request_parts(req_type: int, req_sector: int = 0, payload: bytes = b"", in_len: int = 0,
                  layout: Layout = DEFAULT_LAYOUT, ioprio: int = 0) -> list[Part]:
    """A virtio-blk request: header (+ payload) readable, then `in_len` + status writable."""
    header = OUTHDR.pack(req_type & 0xFFFFFFFF, ioprio & 0xFFFFFFFF, req_sector & (2**64 - 1))
    out_stream = header + bytes(payload)
    out_cuts = layout.out_cuts if layout.out_cuts is not None else (OUTHDR.size,)
    in_cuts = layout.in_cuts if layout.in_cuts is not None else (in_len,)
    readable: list[Part] = list(_cut(out_stream, out_cuts))
    writable: list[Part] = list(_cut_len(in_len + 1, in_cuts))
    return writable + readable if layout.writable_first else readable + writable


def read_parts(req_sector: int, nbytes: int, layout: Layout = DEFAULT_LAYOUT) -> list[Part]:
    return request_parts(ReqType.IN, req_sector, in_len=nbytes, layout=layout)


def write_parts(req_sector: int, data: bytes, layout: Layout = DEFAULT_LAYOUT) -> list[Part]:
    return request_parts(ReqType.OUT, req_sector, payload=data, layout=layout)


def flush_parts(layout: Layout = DEFAULT_LAYOUT) -> list[Part]:
    return request_parts(ReqType.FLUSH, layout=layout)


def segments_parts(req_type: int, segments: Sequence[Segment],
                   layout: Layout = DEFAULT_LAYOUT) -> list[Part]:
    payload = b"".join(s.encode() for s in segments)
    return request_parts(req_type, 0, payload=payload, layout=layout)


def get_id_parts(nbytes: int = ID_BYTES, layout: Layout = DEFAULT_LAYOUT) -> list[Part]:
    return request_parts(ReqType.GET_ID, in_len=nbytes, layout=layout)


class BlkFrontend:
    """One vhost-user connection acting as a virtio-blk driver; use as a context manager.

    :raise BackendGone: when the backend refuses or drops the connection.
    :raise FrontendError: when it answers the handshake wrongly.
    """

    def __init__(self, socket_path: str | os.PathLike[str], *, queue_size: int = 128,
                 num_queues: int = 1, memory_size: int = 64 << 20, gpa_base: int = 0,
                 features: int = WANTED_FEATURES,
                 protocol_features: int = WANTED_PROTOCOL_FEATURES,
                 timeout_s: float = 10.0, connect_timeout_s: float = 10.0,
                 inflight: bool = False) -> None:
        self.timeout_s = timeout_s
        if inflight:
            # QEMU's vhost-user-blk: the backend's in-flight region, kept across reconnects.
            protocol_features |= bit(ProtocolFeature.INFLIGHT_SHMFD)
        self._want = (features, protocol_features, queue_size, num_queues)
        self._inflight_fd = -1
        self._inflight_region = (0, 0)            # mmap_size, mmap_offset
        self.memory = GuestMemory(memory_size, gpa_base)
        self.queues: list[SplitQueue] = []
        self._kick_fds: list[int] = []
        self._call_fds: list[int] = []
        self._inflight: list[dict[int, BlkRequest]] = []
        self._completions = 0
        self.closed = False
        try:
            self.channel = Channel(socket_path, timeout_s, connect_timeout_s)
        except BaseException:
            self.memory.close()
            raise
        try:
            self._handshake(features, protocol_features, queue_size, num_queues)
        except BaseException:
            self.close(graceful=False)
            raise

    # Handshake ---------------------------------------------------------------------------
    def _handshake(self, want_features: int, want_protocol: int, queue_size: int,
                   num_queues: int, reconnect: bool = False) -> None:
        ch = self.channel
        self.offered_features = ch.call_u64(Request.GET_FEATURES)
        if not self.offered_features & bit(VIRTIO_F_VERSION_1):
            raise FrontendError("backend does not offer VIRTIO_F_VERSION_1")
        self.protocol_features = 0
        if self.offered_features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            self.offered_protocol_features = ch.call_u64(Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = self.offered_protocol_features & want_protocol
            ch.set(Request.SET_PROTOCOL_FEATURES, U64.pack(self.protocol_features))
        self.backend_queues = 1
        if self.has_protocol(ProtocolFeature.MQ):
            self.backend_queues = ch.call_u64(Request.GET_QUEUE_NUM)
        if num_queues > self.backend_queues:
            raise FrontendError(
                f"{num_queues} queues wanted, backend has {self.backend_queues}")
        ch.set(Request.SET_OWNER)
        self.config = self.get_config() if self.has_protocol(ProtocolFeature.CONFIG) else None

        # Start the device (vhost_dev_start): features, memory, rings, then enable.
        self.features = self.offered_features & want_features
        ch.set(Request.SET_FEATURES, U64.pack(self.features))
        self._set_mem_table()
        if self.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            self._set_inflight(num_queues, queue_size)
        for index in range(num_queues):
            self._start_queue(index, queue_size, reconnect)
        if self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            for index in range(num_queues):
                ch.set(Request.SET_VRING_ENABLE, VRING_STATE.pack(index, 1))
        log.debug("connected to %s: features %#x protocol %#x queues %d",
                  ch.socket_path, self.features, self.protocol_features, num_queues)

    def has_protocol(self, feature: int) -> bool:
        return bool(self.protocol_features & bit(feature))

    def has_feature(self, feature: int) -> bool:
        return bool(self.features & bit(feature))

    def _ack(self) -> bool:
        return self.has_protocol(ProtocolFeature.REPLY_ACK)

    def _set_mem_table(self) -> None:
        region = MEMORY_REGION.pack(self.memory.gpa_base, self.memory.size, QVA_BASE, 0)
        payload = MEMORY_HEADER.pack(1, 0) + region
        # QEMU asks for an ack on SET_MEM_TABLE whenever REPLY_ACK is negotiated.
        self.channel.set(Request.SET_MEM_TABLE, payload, [self.memory.fd], ack=self._ack())

    def _qva(self, gpa: int) -> int:
        return gpa - self.memory.gpa_base + QVA_BASE

    def _set_inflight(self, num_queues: int, queue_size: int) -> None:
        """GET_INFLIGHT_FD once (the backend allocates the region), then SET_INFLIGHT_FD with
        it at every (re)connection, as QEMU's vhost-user-blk does."""
        ch = self.channel
        if self._inflight_fd < 0:
            ch.send(Request.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, num_queues, queue_size))
            reply, fds = ch.recv_reply(Request.GET_INFLIGHT_FD)
            if len(reply) != INFLIGHT.size or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise FrontendError(f"GET_INFLIGHT_FD reply: {len(reply)} bytes, "
                                    f"{len(fds)} fds")
            mmap_size, mmap_offset, _, _ = INFLIGHT.unpack(reply)
            self._inflight_fd, self._inflight_region = fds[0], (mmap_size, mmap_offset)
        mmap_size, mmap_offset = self._inflight_region
        ch.set(Request.SET_INFLIGHT_FD,
               INFLIGHT.pack(mmap_size, mmap_offset, num_queues, queue_size),
               [self._inflight_fd])

    def reconnect(self, socket_path: str | os.PathLike[str] | None = None,
                  connect_timeout_s: float = 10.0) -> None:
        """A new connection after the backend went away (a restarted backend), with the same
        guest memory, rings and in-flight region — QEMU's reconnecting chardev. Requests still
        in flight stay pending: a backend with INFLIGHT_SHMFD resubmits them; without it the
        rings restart at the used index, so it takes them from the avail ring again.

        :raise BackendGone: when the backend refuses or drops the connection.
        """
        path = self.channel.socket_path if socket_path is None else socket_path
        self.channel.close()
        for fd in self._kick_fds + self._call_fds:
            os.close(fd)
        self._kick_fds, self._call_fds = [], []
        self.channel = Channel(path, self.timeout_s, connect_timeout_s)
        features, protocol_features, queue_size, num_queues = self._want
        self._handshake(features, protocol_features, queue_size, num_queues, reconnect=True)

    def _start_queue(self, index: int, queue_size: int, reconnect: bool = False) -> None:
        ch = self.channel
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._kick_fds.append(kick)
        self._call_fds.append(call)
        if reconnect:
            # QEMU after a disconnect: the backend's last avail index is lost, so it restarts
            # from the used index (virtio_queue_restore_last_avail_idx).
            queue = self.queues[index]
            base = queue.used_idx()
        else:
            queue = SplitQueue(self.memory, index, queue_size)
            self.queues.append(queue)
            self._inflight.append({})
            base = 0
        ch.set(Request.SET_VRING_NUM, VRING_STATE.pack(index, queue_size))
        ch.set(Request.SET_VRING_BASE, VRING_STATE.pack(index, base))
        ch.set(Request.SET_VRING_ADDR, VRING_ADDR.pack(
            index, 0, self._qva(queue.desc_gpa), self._qva(queue.used_gpa),
            self._qva(queue.avail_gpa), 0))
        ch.set(Request.SET_VRING_KICK, U64.pack(index), [kick])
        ch.set(Request.SET_VRING_CALL, U64.pack(index), [call])

    def get_config(self, size: int = CONFIG.size) -> BlkConfig:
        """GET_CONFIG for the first `size` bytes. :raise FrontendError: if refused."""
        reply = self.channel.call(Request.GET_CONFIG,
                                  CONFIG_HEADER.pack(0, size, 0) + bytes(size))
        if len(reply) != CONFIG_HEADER.size + size:
            raise FrontendError(f"GET_CONFIG reply has {len(reply)} bytes, "
                                f"not {CONFIG_HEADER.size + size} (backend refused)")
        return BlkConfig.decode(reply[CONFIG_HEADER.size:])

    def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG (e.g. `wce` at offset 32), as QEMU sends when the guest writes it."""
        self.channel.set(Request.SET_CONFIG, CONFIG_HEADER.pack(offset, len(data), 0) + data,
                         ack=self._ack())

    @property
    def capacity(self) -> int:
        """Device size in 512-byte sectors (from GET_CONFIG)."""
        if self.config is None:
            raise FrontendError("backend did not negotiate VHOST_USER_PROTOCOL_F_CONFIG")
        return self.config.capacity

    # Teardown ----------------------------------------------------------------------------
    def close(self, graceful: bool = True) -> dict[int, int]:
        """Stop the queues (GET_VRING_BASE, as QEMU does on stop) and disconnect.

        Returns each queue's last avail index as the backend reported it (empty if the
        backend was gone or `graceful` is false).
        """
        bases: dict[int, int] = {}
        if self.closed:
            return bases
        self.closed = True
        if graceful:
            try:
                for index in range(len(self.queues)):
                    reply = self.channel.call(Request.GET_VRING_BASE,
                                              VRING_STATE.pack(index, 0))
                    bases[index] = VRING_STATE.unpack(reply)[1]
            except (FrontendError, OSError, struct.error) as err:
                log.debug("stopping queues: %s", err)
        self.channel.close()
        for fd in self._kick_fds + self._call_fds:
            os.close(fd)
        self._kick_fds, self._call_fds = [], []
        if self._inflight_fd >= 0:
            os.close(self._inflight_fd)
            self._inflight_fd = -1
        self.memory.close()
        return bases

    def __enter__(self) -> BlkFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hung_up(self, wait_s: float = 0.0) -> bool:
        """True once the backend closed the connection (how libvhost-user users drop a
        broken device)."""
        return self.channel.hung_up(wait_s)

    # Placing requests --------------------------------------------------------------------
    def prepare(self, parts: Sequence[Part], *, queue: int = 0,
                indirect: bool = False) -> BlkRequest:
        """Place a request's buffers and descriptors in guest memory, not yet visible.

        Parts keep their order in the chain; `indirect` puts the chain in an indirect table
        (one slot in the ring's table). :raise FrontendError: if memory or slots run out.
        """
        q = self.queues[queue]
        allocations: list[int] = []
        descs: list[RawDesc] = []
        in_buffers: list[tuple[int, int]] = []
        readable: list[tuple[int, bytes]] = []
        tails: list[tuple[int, int]] = []
        try:
            for part in parts:
                if isinstance(part, int):
                    gpa = self.memory.alloc(max(part, 1), align=_buffer_align(part))
                    allocations.append(gpa)
                    # Poison the whole allocation: a device writing past the buffer shows.
                    whole = self.memory.allocated_length(gpa)
                    self.memory.fill(gpa, whole, POISON)
                    descs.append(RawDesc(gpa, part, VRING_DESC_F_WRITE))
                    in_buffers.append((gpa, part))
                    tails.append((gpa + part, whole - part))
                else:
                    gpa = self.memory.alloc(max(len(part), 1), align=_buffer_align(len(part)))
                    allocations.append(gpa)
                    self.memory.write(gpa, part)
                    descs.append(RawDesc(gpa, len(part), 0))
                    readable.append((gpa, bytes(part)))
            if indirect:
                table = self.memory.alloc(DESC.size * max(len(descs), 1), align=16)
                allocations.append(table)
                self.write_table(table, _chain(descs, range(len(descs))))
                slots = q.take_slots(1)
                q.write_desc(slots[0], RawDesc(table, DESC.size * len(descs),
                                               VRING_DESC_F_INDIRECT))
            else:
                slots = q.take_slots(len(descs))
                for slot, desc in zip(slots, _chain(descs, slots), strict=True):
                    q.write_desc(slot, desc)
        except BaseException:
            for gpa in allocations:
                self.memory.free(gpa)
            raise
        request = BlkRequest(queue, slots[0], slots, allocations, in_buffers, readable, tails)
        self._inflight[queue][request.head] = request
        return request

    def write_table(self, gpa: int, descs: Sequence[RawDesc]) -> None:
        """Write descriptors at `gpa` (an indirect table), exactly as given."""
        for i, d in enumerate(descs):
            self.memory.write(gpa + DESC.size * i, DESC.pack(
                d.addr & (2**64 - 1), d.length & 0xFFFFFFFF, d.flags & 0xFFFF, d.next & 0xFFFF))

    def submit_raw(self, table: Mapping[int, RawDesc], head: int, *, queue: int = 0,
                   in_buffers: Sequence[tuple[int, int]] | None = None,
                   allocations: Sequence[int] = (), kick: bool = True) -> BlkRequest:
        """Write descriptors into named slots of the ring's table and publish `head`.

        Nothing is checked: loops, wild addresses and bad flags go out as given. `in_buffers`
        (gpa, length) are read back at completion; by default the in-memory device-writable
        descriptors of `table`. `allocations` are freed at completion.
        """
        q = self.queues[queue]
        q.take_specific_slots(set(table))
        for slot, desc in table.items():
            q.write_desc(slot, desc)
        if in_buffers is None:
            in_buffers = [(d.addr, d.length) for _s, d in sorted(table.items())
                          if d.flags & VRING_DESC_F_WRITE
                          and self.memory.contains(d.addr, d.length)]
        request = BlkRequest(queue, head, sorted(table), list(allocations), list(in_buffers))
        if head in self._inflight[queue]:
            raise FrontendError(f"descriptor {head} already heads a request in flight")
        self._inflight[queue][head] = request
        self.publish([request])
        if kick:
            self.kick(queue)
        return request

    def publish(self, requests: Sequence[BlkRequest]) -> None:
        """Make requests visible in the avail ring, in the order given (no kick)."""
        for r in requests:
            self.queues[r.queue].publish(r.head)
            r.published = True

    def kick(self, queue: int = 0) -> None:
        os.eventfd_write(self._kick_fds[queue], 1)

    # Completions -------------------------------------------------------------------------
    def poll_completions(self) -> list[BlkRequest]:
        """Harvest the used rings now; returns the requests completed, in completion order.

        :raise FrontendError: if the backend completes a descriptor that heads no request.
        """
        finished = []
        for index, q in enumerate(self.queues):
            for head, used_len in q.harvest():
                request = self._inflight[index].pop(head, None)
                if request is None:
                    raise FrontendError(
                        f"queue {index}: backend completed descriptor {head}, not in flight")
                request.used_len = used_len
                request.in_data = b"".join(
                    self.memory.read(gpa, n) for gpa, n in request.in_buffers
                    if self.memory.contains(gpa, n))
                for gpa, content in request.readable:
                    if self.memory.read(gpa, len(content)) != content:
                        request.violations.append(f"device wrote into readable buffer {gpa:#x}")
                for gpa, n in request.tails:
                    if self.memory.read(gpa, n).strip(bytes([POISON])):
                        request.violations.append(f"device wrote past writable buffer {gpa:#x}")
                if used_len > sum(n for _gpa, n in request.in_buffers):
                    request.violations.append(
                        f"used len {used_len} exceeds the writable bytes")
                request.done = True
                request.order = self._completions
                self._completions += 1
                for gpa in request.allocations:
                    self.memory.free(gpa)
                q.release_slots(request.slots)
                finished.append(request)
        return finished

    def wait(self, requests: Sequence[BlkRequest], timeout_s: float | None = None) -> None:
        """Wait on the call eventfds until every request is done.

        :raise CompletionTimeout: when some are still pending at the deadline.
        :raise BackendGone: if the backend closes the connection meanwhile.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        poller = select.poll()
        for fd in self._call_fds:
            poller.register(fd, select.POLLIN)
        poller.register(self.channel.sock.fileno(), select.POLLIN | select.POLLHUP)
        while True:
            self.poll_completions()
            pending = [r for r in requests if not r.done]
            if not pending:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CompletionTimeout(pending, timeout_s)
            for fd, _events in poller.poll(max(1, int(remaining * 1000))):
                if fd in self._call_fds:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                elif self.channel.hung_up():
                    self.poll_completions()     # it may have completed some before leaving
                    raise BackendGone(self.channel.socket_path, "I/O")

    def run(self, batch: Sequence[Sequence[Part]], *, queue: int = 0,
            indirect: bool = False, timeout_s: float | None = None) -> list[BlkRequest]:
        """Place all, publish all, kick once, wait for all: the batch is in flight together."""
        requests = [self.prepare(parts, queue=queue, indirect=indirect) for parts in batch]
        self.publish(requests)
        self.kick(queue)
        self.wait(requests, timeout_s)
        return requests

    def run_one(self, parts: Sequence[Part], *, queue: int = 0, indirect: bool = False,
                timeout_s: float | None = None) -> BlkRequest:
        return self.run([parts], queue=queue, indirect=indirect, timeout_s=timeout_s)[0]

    # virtio-blk, the usual way -----------------------------------------------------------
    def read(self, req_sector: int, nbytes: int, layout: Layout = DEFAULT_LAYOUT) -> BlkRequest:
        """VIRTIO_BLK_T_IN of `nbytes` at `req_sector`; the bytes are in `.data`."""
        return self.run_one(read_parts(req_sector, nbytes, layout), indirect=layout.indirect)

    def write(self, req_sector: int, data: bytes, layout: Layout = DEFAULT_LAYOUT) -> BlkRequest:
        return self.run_one(write_parts(req_sector, data, layout), indirect=layout.indirect)

    def flush(self, layout: Layout = DEFAULT_LAYOUT) -> BlkRequest:
        return self.run_one(flush_parts(layout), indirect=layout.indirect)

    def discard(self, ranges: Sequence[Segment | tuple[int, int]],
                layout: Layout = DEFAULT_LAYOUT) -> BlkRequest:
        segments = [r if isinstance(r, Segment) else Segment(*r) for r in ranges]
        return self.run_one(segments_parts(ReqType.DISCARD, segments, layout),
                            indirect=layout.indirect)

    def write_zeroes(self, ranges: Sequence[Segment | tuple[int, int]], unmap: bool = False,
                     layout: Layout = DEFAULT_LAYOUT) -> BlkRequest:
        flags = WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        segments = [r if isinstance(r, Segment) else Segment(r[0], r[1], flags)
                    for r in ranges]
        return self.run_one(segments_parts(ReqType.WRITE_ZEROES, segments, layout),
                            indirect=layout.indirect)

    def get_id(self, nbytes: int = ID_BYTES, layout: Layout = DEFAULT_LAYOUT) -> BlkRequest:
        """VIRTIO_BLK_T_GET_ID into an `nbytes` buffer; the serial (NUL-padded) is `.data`."""
        return self.run_one(get_id_parts(nbytes, layout), indirect=layout.indirect)

    def in_flight(self, queue: int = 0) -> list[BlkRequest]:
        return list(self._inflight[queue].values())


def _chain(descs: Sequence[RawDesc], slots: Sequence[int]) -> list[RawDesc]:
    """Link descriptors in order: each but the last gets NEXT pointing at the following slot."""
    out = []
    for i, d in enumerate(descs):
        if i + 1 < len(descs):
            out.append(RawDesc(d.addr, d.length, d.flags | VRING_DESC_F_NEXT, slots[i + 1]))
        else:
            out.append(RawDesc(d.addr, d.length, d.flags & ~VRING_DESC_F_NEXT, 0))
    return out

