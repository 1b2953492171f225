"""vhost-user messages on a unix socket, from the front-end's (QEMU's) side.

Message layout and numbers follow QEMU's docs/interop/vhost-user.rst and hw/virtio/vhost-user.c
(7.2): a 12-byte header (request, flags, size), then `size` payload bytes; file descriptors ride
along as SCM_RIGHTS on the same sendmsg. Replies carry the reply flag and echo the request.
This module knows nothing of virtio-blk or virtqueues.
"""

from __future__ import annotations

import array
import enum
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from typing import Final

from logwrites.errors import LogwritesError

log = logging.getLogger(__name__)

HEADER: Final = struct.Struct("<III")          # request, flags, size
U64: Final = struct.Struct("<Q")
VRING_STATE: Final = struct.Struct("<II")      # index, num
# index, flags, desc_user_addr, used_user_addr, avail_user_addr, log_guest_addr
VRING_ADDR: Final = struct.Struct("<IIQQQQ")
MEMORY_HEADER: Final = struct.Struct("<II")    # nregions, padding
# guest_phys_addr, memory_size, userspace_addr, mmap_offset
MEMORY_REGION: Final = struct.Struct("<QQQQ")
CONFIG_HEADER: Final = struct.Struct("<III")   # offset, size, flags
INFLIGHT: Final = struct.Struct("<QQHH4x")     # mmap_size, mmap_offset, num_queues, queue_size

VERSION: Final = 0x1
REPLY_FLAG: Final = 0x4
NEED_REPLY_FLAG: Final = 0x8
VRING_IDX_MASK: Final = 0xFF
VRING_NOFD: Final = 0x100                      # "no file descriptor": polling mode
MAX_REGIONS: Final = 8                         # VHOST_MEMORY_BASELINE_NREGIONS
MAX_PAYLOAD: Final = 4096                      # generous; the largest fixed payload is 264


class Request(enum.IntEnum):
    """Front-end requests (VhostUserRequest)."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of VHOST_USER_PROTOCOL_F_*."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15


# Feature bits that are not virtio-blk's own.
VHOST_USER_F_PROTOCOL_FEATURES: Final = 30
VIRTIO_F_VERSION_1: Final = 32
VIRTIO_RING_F_INDIRECT_DESC: Final = 28
VIRTIO_RING_F_EVENT_IDX: Final = 29


def bit(n: int) -> int:
    return 1 << n


class FrontendError(LogwritesError):
    """The backend did something a front-end cannot accept (bad reply, timeout, hang-up)."""


class BackendGone(FrontendError):
    """The backend closed the connection (or never accepted it)."""

    def __init__(self, socket_path: str, during: str) -> None:
        super().__init__(socket_path, during)
        self.socket_path, self.during = socket_path, during

    def __str__(self) -> str:
        return f"vhost-user backend at {self.socket_path} hung up during {self.during}"


class Channel:
    """One connection to a backend's vhost-user socket; every wait is bounded by `timeout_s`."""

    def __init__(self, socket_path: str | os.PathLike[str], timeout_s: float = 10.0,
                 connect_timeout_s: float = 10.0) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout_s = timeout_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        deadline = time.monotonic() + connect_timeout_s
        # The backend may still be creating its socket: retry until the deadline, as QEMU's
        # reconnecting chardev does.
        while True:
            try:
                self.sock.connect(self.socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                if time.monotonic() >= deadline:
                    self.sock.close()
                    raise BackendGone(self.socket_path, "connect") from err
                time.sleep(0.02)
        self.sock.settimeout(timeout_s)

    def close(self) -> None:
        self.sock.close()

    def hung_up(self, wait_s: float = 0.0) -> bool:
        """True once the backend has closed its end (EOF or error pending on the socket)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        events = poller.poll(int(wait_s * 1000))
        if not events:
            return False
        if events[0][1] & (select.POLLHUP | select.POLLERR):
            return True
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             need_reply: bool = False, size: int | None = None) -> None:
        """Send one message. `size` overrides the header's size field (for hostile tests)."""
        flags = VERSION | (NEED_REPLY_FLAG if need_reply else 0)
        header = HEADER.pack(request, flags, len(payload) if size is None else size)
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            sent = self.sock.sendmsg([header + payload], ancillary)
            if sent < len(header) + len(payload):
                self.sock.sendall((header + payload)[sent:])
        except (BrokenPipeError, ConnectionResetError) as err:
            raise BackendGone(self.socket_path, _name(request)) from err
        except TimeoutError as err:
            raise FrontendError(f"sending {_name(request)} timed out") from err

    def _recv_exact(self, nbytes: int, during: str) -> bytes:
        chunks, got = [], 0
        while got < nbytes:
            try:
                chunk = self.sock.recv(nbytes - got)
            except TimeoutError as err:
                raise FrontendError(
                    f"no reply to {during} within {self.timeout_s} s") from err
            except ConnectionResetError as err:
                raise BackendGone(self.socket_path, during) from err
            if not chunk:
                raise BackendGone(self.socket_path, during)
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def recv_reply(self, request: int) -> tuple[bytes, list[int]]:
        """Read the reply to `request`: its payload and any file descriptors it carried."""
        during = _name(request)
        fds: list[int] = []
        try:
            header, ancdata, _flags, _addr = self.sock.recvmsg(
                HEADER.size, socket.CMSG_SPACE(MAX_REGIONS * 4))
        except TimeoutError as err:
            raise FrontendError(f"no reply to {during} within {self.timeout_s} s") from err
        except ConnectionResetError as err:
            raise BackendGone(self.socket_path, during) from err
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
        if not header:
            raise BackendGone(self.socket_path, during)
        if len(header) < HEADER.size:
            header += self._recv_exact(HEADER.size - len(header), during)
        reply_request, flags, size = HEADER.unpack(header)
        if reply_request != request or not flags & REPLY_FLAG:
            raise FrontendError(
                f"expected a reply to {during}, got request {reply_request} flags {flags:#x}")
        if size > MAX_PAYLOAD:
            raise FrontendError(f"reply to {during} claims {size} payload bytes")
        payload = self._recv_exact(size, during) if size else b""
        return payload, fds

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send a request that always has a reply (GET_*) and return the reply's payload."""
        self.send(request, payload, fds)
        reply, extra_fds = self.recv_reply(request)
        for fd in extra_fds:                 # none expected; never leak them
            os.close(fd)
        return reply

    def call_u64(self, request: int, payload: bytes = b"") -> int:
        reply = self.call(request, payload)
        if len(reply) != U64.size:
            raise FrontendError(f"reply to {_name(request)} has {len(reply)} bytes, not 8")
        return U64.unpack(reply)[0]

    def set(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
            ack: bool = False) -> None:
        """Send a request without a reply; with `ack` (REPLY_ACK negotiated) wait for its ack.

        :raise FrontendError: if the backend acks with a non-zero value (it refused).
        """
        self.send(request, payload, fds, need_reply=ack)
        if ack:
            reply, extra_fds = self.recv_reply(request)
            for fd in extra_fds:
                os.close(fd)
            if len(reply) != U64.size or U64.unpack(reply)[0] != 0:
                raise FrontendError(f"backend refused {_name(request)}: ack {reply.hex()}")


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"
