"""The serve loop: one thread, one epoll set over the listening socket, the vhost-user
connection, the kick eventfds libvhost-user asks us to watch, the control socket and its
clients, and a wake-up fd for SIGINT/SIGTERM/SIGHUP.

`Server.serve()` listens on the vhost-user socket, accepts one front-end (QEMU) at a time, and
when it goes away logs the volatile tail and listens again (or returns, with `once`). A stop
signal ends it cleanly: the connection is closed, the volatile tail and the `dm-log-writes-end`
mark are logged and the log is durable. It reports through the `on_ready` callback it is handed
(the command prints); it never prints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import selectors
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Final

from logwrites.errors import LogwritesError
from logwrites.logfile import LogFullError
from logwrites.storagepaths import file_kind
from vhost.blk import BlkDevice
from vhost.control import ControlServer
from vhost.lvu import Connection
from vhost.ordering import CompletionSink

log = logging.getLogger(__name__)


class EventLoop:
    """Readable-fd callbacks over epoll. A callback may watch or unwatch any fd, itself too.

    `select.epoll` directly: at queue depth 1 every request is one wake-up, and `selectors`
    spends a few microseconds of Python on each (keys, maps, tuples) for nothing we use.
    While a front-end is connected the wait itself is in C (`Connection.wait`): the kick
    eventfds are served there, and only the other fds come back here.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[int], None]] = {}

    def watch(self, fd: int, callback: Callable[[int], None]) -> None:
        if fd in self._callbacks:
            try:
                self._epoll.modify(fd, select.EPOLLIN)
            except FileNotFoundError:
                # Closed without unwatch: epoll forgot it, and the number is a new file's.
                self._epoll.register(fd, select.EPOLLIN)
        else:
            self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def unwatch(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def run_once(self, timeout: float | None,
                 wait: Callable[[int], list[int]] | None = None) -> None:
        """Call back every readable fd once. `wait` (with no timeout): waits on the epoll set
        instead of `poll` (`Connection.wait`, which serves kicks in C) and returns the ready
        fds."""
        callbacks = self._callbacks
        if wait is not None and timeout is None:
            ready = [(fd, callbacks.get(fd)) for fd in wait(self._epoll.fileno())]
        else:
            ready = [(fd, callbacks.get(fd))
                     for fd, _ in self._epoll.poll(-1 if timeout is None else timeout)]
        for fd, callback in ready:
            # An earlier callback of this round may have unwatched or replaced this fd.
            if callback is not None and callbacks.get(fd) is callback:
                callback(fd)

    def callbacks(self) -> dict[int, Callable[[int], None]]:
        """The callback of every watched fd, now."""
        return dict(self._callbacks)

    def close(self) -> None:
        self._epoll.close()


class SocketPathError(LogwritesError):
    """A socket cannot be bound at `path`: something we may not replace is there."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(path, problem)
        self.path, self.problem = path, problem

    def __str__(self) -> str:
        return f"socket {self.path}: {self.problem}"


def _socket_bound(path: Path) -> bool:
    """Whether a live socket is bound at the socket file `path` (False: stale, its owner gone).

    A datagram connect asks the kernel without queueing a connection: ECONNREFUSED when no
    socket is bound to the file, EPROTOTYPE when a stream socket is. A stream connect would be
    accepted by a live backend as a front-end, and end one serving `--once`.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as err:
        if err.errno == errno.EPROTOTYPE:
            return True
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        probe.close()
    return True             # a datagram socket: someone else's, in use all the same


def socket_path_problem(path: Path) -> str | None:
    """Why no socket may be bound at `path`, or None: nothing is there, or a stale socket file
    (left by a killed backend) that `listen_unix` replaces. Replacing a live backend's socket
    would cut it off from every later front-end, and anything else there is someone's file."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return f"{file_kind(st.st_mode)}, not a socket"
    if _socket_bound(path):
        return "a backend already listens there"
    return None


# How long `listen_unix` waits for another process's probe, unlink and bind in one directory
# (microseconds, normally): past it, a process holding the lock for no such reason is named.
DIR_LOCK_WAIT_S: Final = 10.0


@contextlib.contextmanager
def _directory_locked(path: Path) -> Iterator[None]:
    """An exclusive flock on the directory of `path`, held by the block.

    `listen_unix` holds it around probe, unlink and bind: two backends starting at once on one
    stale socket both found it stale, and the second's unlink removed the first's live socket,
    which then served no front-end. A lock on the directory leaves no file behind, and goes
    with its process. A directory we may not open for reading (mode 0300, say) goes unlocked,
    as before.

    :raise SocketPathError: another process held the lock for `DIR_LOCK_WAIT_S`.
    """
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        fd = -1                     # bind names whatever is wrong with the directory
    if fd < 0:
        yield
        return
    try:
        _lock_within(fd, path)
        yield
    finally:
        os.close(fd)                # and with it the lock


def _lock_within(fd: int, path: Path) -> None:
    """flock(LOCK_EX) on `fd`, waiting at most DIR_LOCK_WAIT_S (flock itself waits forever)."""
    deadline = time.monotonic() + DIR_LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise SocketPathError(path, f"its directory stayed locked (flock) by another "
                                            f"process for {DIR_LOCK_WAIT_S:g} s") from None
            time.sleep(0.001)


def listen_unix(path: Path, mode: int | None = None) -> socket.socket:
    """A listening Unix socket at `path`; a stale socket file there is replaced.

    :raise SocketPathError: when something else is at `path` (see `socket_path_problem`).
    """
    with _directory_locked(path):
        return _replace_and_listen(path, mode)


def unlisten_unix(sock: socket.socket, path: Path) -> None:
    """Close `listen_unix`'s `sock` and remove its file at `path`, under the directory's lock:
    unlocked, a backend starting in between found the closed socket stale, bound its own in
    its place, and then lost it to this unlink."""
    with _directory_locked(path):
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _replace_and_listen(path: Path, mode: int | None) -> socket.socket:
    """`listen_unix`'s probe, unlink and bind, under the directory's lock."""
    problem = socket_path_problem(path)
    if problem is not None:
        raise SocketPathError(path, problem)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o077) if mode is not None else None
        try:
            sock.bind(str(path))
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Server:
    """Serves `device` on `socket_path`; `control_path` (or None) is the control socket."""

    def __init__(self, device: BlkDevice, sink: CompletionSink, socket_path: Path,
                 control_path: Path | None, *, once: bool = False,
                 socket_mode: int = 0o600) -> None:
        self.device = device
        self.sink = sink
        self.socket_path = socket_path
        self.control_path = control_path
        self.once = once
        self.socket_mode = socket_mode
        self.loop = EventLoop()
        self.conn: Connection | None = None
        self.connections = 0
        self.started_at = 0.0
        self._stop_signal: int | None = None
        self._listener: socket.socket | None = None
        self.control: ControlServer | None = None
        self._wake: socket.socket | None = None
        self._resumed = False
        device.pause_until_resumed = self._pause_until_resumed

    # -- life cycle ----------------------------------------------------------------------------

    def serve(self, on_ready: Callable[[], None] = lambda: None) -> None:
        """Run until a stop signal (or, with `once`, until the first front-end leaves)."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        # SIGHUP too (a closed terminal), unless it is ignored (nohup): each ends the log
        # cleanly, rather than in the middle of whatever the loop was doing.
        stops = (signal.SIGINT, signal.SIGTERM) + (
            (signal.SIGHUP,) if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN else ())
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in stops}
        self.started_at = time.monotonic()
        clean = False
        try:
            self._wake = wake_r
            self.loop.watch(wake_r.fileno(), lambda fd: self._drain(wake_r))
            self._listener = listen_unix(self.socket_path, self.socket_mode)
            self.loop.watch(self._listener.fileno(), self._accept)
            if self.control_path is not None:
                self.control = ControlServer(self.control_path, self.loop, self,
                                             self.socket_mode)
            on_ready()
            while self._stop_signal is None:
                conn = self.conn
                self.loop.run_once(None, conn.wait if conn is not None and conn.open else None)
                conn = self.conn
                if conn is not None and conn.disconnected:
                    self._disconnected()
                    if self.once:
                        break
            clean = True
        finally:
            self._shutdown(clean)
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            while sock.recv(4096):
                pass

    def _shutdown(self, clean: bool = True) -> None:
        """Clean stop: no more requests, the volatile tail and the end mark, durable. After a
        failure (`clean` False: a log that could not be written or synced), neither."""
        if self.conn is not None:
            conn, self.conn = self.conn, None
            attach = getattr(self.sink, "attach", None)
            if attach is not None:
                attach(None)
            conn.close()
        self.device.conn = None
        try:
            if not clean:
                # Serving stopped on a failure: past its last counted entry the log may not
                # describe the image (writes that failed on the log reached it), so no volatile
                # tail and no end mark claim a clean, complete log.
                log.warning("stopped on a failure: the log ends at its last counted entry")
            elif self.device.log_full is None:
                self.sink.close()
            else:
                # The log stopped describing the image at its last FLUSH: no volatile tail
                # and no end mark after that (they would claim a clean, complete log).
                log.warning("%s: the log ends at its last counted entry", self.device.log_full)
        except LogFullError as err:
            # The log stays valid up to its last counted entry; the tail and end mark are not
            # in it, which the status and the log say already.
            log.error("log full at stop: %s (volatile tail and end mark not logged)", err)
        if self.control is not None:
            self.control.close()
        if self._listener is not None:
            self.loop.unwatch(self._listener.fileno())
            unlisten_unix(self._listener, self.socket_path)
        self.loop.close()
        log.info("stopped%s", f" by signal {self._stop_signal}" if self._stop_signal else "")

    # -- the vhost-user connection ---------------------------------------------------------------

    def _accept(self, fd: int) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        # One front-end at a time: the next one waits in the listen backlog until this one
        # leaves (a reconnecting QEMU may connect before we have seen the old socket's EOF).
        self.loop.unwatch(self._listener.fileno())
        sock.setblocking(True)  # libvhost-user reads and writes it blocking
        device = self.device
        try:
            self.conn = Connection(sock, device, self.loop, max_queues=device.num_queues,
                                   features=device.features,
                                   protocol_features=device.protocol_features)
        except Exception:
            log.warning("could not take a front-end", exc_info=True)
            sock.close()
            self.loop.watch(self._listener.fileno(), self._accept)
            return
        device.attach(self.conn)
        attach = getattr(self.sink, "attach", None)
        if attach is not None:
            # The pending journal follows each request's identity and the resubmissions.
            attach(self.conn)
        self.connections += 1
        log.info("front-end connected (connection %d)", self.connections)

    def _disconnected(self) -> None:
        conn, self.conn = self.conn, None
        assert conn is not None
        if conn.panic:
            log.warning("front-end dropped after a protocol error: %s", conn.panic)
        else:
            log.info("front-end disconnected")
        attach = getattr(self.sink, "attach", None)
        if attach is not None:
            attach(None)
        conn.close()
        self.device.detach()        # the volatile tail (DESIGN §3.6)
        if self._listener is not None and not self.once:
            self.loop.watch(self._listener.fileno(), self._accept)

    # -- a full log, paused (--on-log-full pause) ------------------------------------------------

    def _pause_until_resumed(self, reason: str) -> bool:
        """Serve only the control socket (and stop signals) until `resume`; the device is in
        the middle of a FLUSH, so the vhost-user connection and kicks wait (level-triggered,
        they fire again afterwards). True when resumed, False when stopping."""
        self._resumed = False
        if self.control is None:
            return False
        self.control.log_full(reason)
        while not self._resumed and self._stop_signal is None:
            allowed = {self.control.listener_fd, *self.control.clients}
            if self._wake is not None:
                allowed.add(self._wake.fileno())
            callbacks = self.loop.callbacks()
            with selectors.DefaultSelector() as sel:
                for fd in allowed & callbacks.keys():
                    sel.register(fd, selectors.EVENT_READ, callbacks[fd])
                for key, _ in sel.select(1.0):
                    # An earlier callback of this round may have unwatched this fd.
                    if self.loop.callbacks().get(key.fd) is key.data:
                        key.data(key.fd)
        self.control.log_full(None)
        return self._resumed

    def resume_log_full(self) -> bool:
        """`resume` from the control socket: True if a paused FLUSH will be retried."""
        self._resumed = True
        return True

    # -- what the control socket asks --------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.conn is not None
