"""The control socket: JSON lines from the host (CLI, QEMU layer) and from the guest's agent.

Requests, one JSON object per line, each answered by one line:
- `{"cmd": "mark", "name": N}` → `{"ok": true, "entry": I}` once the mark is durable. While the
  device is stopped at a stop point the mark waits (a mark logged then would land past the crash
  point): it is logged and answered at `resume`, or never, if the run ends there.
- `{"cmd": "status"}` → the kernel target's line `"<#logged entries> <highest allocated
  sector>"` and the detail (queues, requests by kind, bytes, unflushed records, log bytes, mode).
- `{"cmd": "subscribe"}` → `{"ok": true}`, then events on this connection:
  `{"event": "entry", "index": I, "flags": [...]}`, `{"event": "flush", "entry": I,
  "count": K}` (K-th FLUSH entry, from 1), `{"event": "mark", "entry": I, "name": N}`,
  `{"event": "stopped", "at": AT, "entry": I}`, `{"event": "log-full", "reason": R}` (with
  `--on-log-full pause`: a FLUSH is held until the user makes room and sends `resume`).
- `{"cmd": "stop-at", "at": "entry:N" | "mark:NAME" | "flush:K"}` → `{"ok": true}`: when the
  log reaches that point the device stops taking requests from the guest (they stay in the
  rings, uncompleted) and subscribers get "stopped"; `{"cmd": "resume"}` goes on.
Anything else gets `{"ok": false, "error": "..."}` and the connection stays usable. Several
clients may be connected at once (the guest's lw-mark comes through a QEMU chardev that stays
connected). The socket is created with umask 0o077 and mode 0600 (unless serve's
`--socket-mode` says otherwise).
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from logwrites.format import flag_names, validate_mark_name
from logwrites.logfile import LogFullError

if TYPE_CHECKING:
    from vhost.server import EventLoop, Server

log = logging.getLogger(__name__)

MAX_LINE: Final = 64 << 10          # a request longer than this is refused
MAX_BACKLOG: Final = 8 << 20        # a subscriber this far behind is dropped


class _Client:
    __slots__ = ("held_mark", "inbuf", "later", "outbuf", "skipping", "sock", "subscribed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        # An over-long line was refused: the rest of it, up to its newline, is dropped unread
        # (one refusal per line, however the kernel splits what the client sent).
        self.skipping = False
        self.outbuf = bytearray()
        self.subscribed = False
        self.later: list[dict[str, Any]] = []     # events due right after the reply
        # A mark asked for while the device is held at a stop point: logged (and answered) at
        # `resume`; the client's later requests wait behind it, so replies keep their order.
        self.held_mark: str | None = None


class StopPoint:
    """Where `stop-at` asked the backend to stop: `kind` entry|mark|flush and its value."""

    __slots__ = ("kind", "number", "text", "value")

    def __init__(self, text: str) -> None:
        kind, sep, value = text.partition(":")
        if kind not in ("entry", "mark", "flush") or not sep or not value:
            raise ValueError(f"stop-at {text!r}: expected entry:N, mark:NAME or flush:K")
        if kind != "mark" and not value.isdigit():
            raise ValueError(f"stop-at {text!r}: {kind} needs a whole number")
        self.text, self.kind, self.value = text, kind, value
        self.number = int(value) if kind != "mark" else -1


class ControlServer:
    """Listens on `path`; `server` is the serve loop (device, sink, connection state)."""

    def __init__(self, path: Path, loop: EventLoop, server: Server,
                 mode: int = 0o600) -> None:
        from vhost.server import listen_unix

        self.path = path
        self.loop = loop
        self.server = server
        self.clients: dict[int, _Client] = {}
        self.stop_point: StopPoint | None = None
        self.stopped: dict[str, Any] | None = None   # the last "stopped" event, while held
        self.paused_log_full: str | None = None     # why a FLUSH is held (pause mode)
        self._listener = listen_unix(path, mode)
        self.listener_fd = self._listener.fileno()
        loop.watch(self._listener.fileno(), self._accept)

    def close(self) -> None:
        for fd, client in list(self.clients.items()):
            if client.held_mark is not None:
                self._send(client, {"ok": False, "error": "the backend stopped at a stop "
                                    "point: the mark was never logged"})
            self._drop(fd)
        from vhost.server import unlisten_unix

        self.loop.unwatch(self._listener.fileno())
        unlisten_unix(self._listener, self.path)

    # -- connections ---------------------------------------------------------------------------

    def _accept(self, fd: int) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        self.clients[sock.fileno()] = _Client(sock)
        self.loop.watch(sock.fileno(), self._readable)

    def _drop(self, fd: int) -> None:
        client = self.clients.pop(fd, None)
        if client is not None:
            self.loop.unwatch(fd)
            client.sock.close()
        self._update_observer()

    def _readable(self, fd: int) -> None:
        client = self.clients.get(fd)
        if client is None:
            return
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        client.inbuf += data
        self._serve_lines(fd)

    def _serve_lines(self, fd: int) -> None:
        """Answer the complete request lines a client sent, in order."""
        client = self.clients.get(fd)
        while client is not None and fd in self.clients and client.held_mark is None:
            line, sep, rest = client.inbuf.partition(b"\n")
            if not sep:
                if client.skipping:
                    client.inbuf.clear()
                elif len(client.inbuf) > MAX_LINE:
                    client.inbuf.clear()
                    client.skipping = True
                    self._send(client, {"ok": False, "error": "request line too long"})
                break
            client.inbuf = bytearray(rest)
            if client.skipping:
                client.skipping = False     # the end of the refused line
                continue
            if line.strip():
                reply = self._request(client, bytes(line))
                if reply is None:
                    break               # a held mark: answered at resume
                self._send(client, reply)
                while client.later and fd in self.clients:
                    self._send(client, client.later.pop(0))

    def _send(self, client: _Client, message: dict[str, Any]) -> None:
        client.outbuf += json.dumps(message).encode() + b"\n"
        try:
            sent = client.sock.send(client.outbuf)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(client.sock.fileno())
            return
        del client.outbuf[:sent]
        if len(client.outbuf) > MAX_BACKLOG:
            log.warning("control client does not read its events: dropped")
            self._drop(client.sock.fileno())

    def _broadcast(self, message: dict[str, Any]) -> None:
        for client in list(self.clients.values()):
            if client.subscribed:
                self._send(client, message)

    # -- requests ------------------------------------------------------------------------------

    def _request(self, client: _Client, line: bytes) -> dict[str, Any] | None:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return {"ok": False, "error": f"not JSON: {err}"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'expected an object with a "cmd" string'}
        cmd = request["cmd"]
        try:
            if cmd == "mark":
                name = request.get("name")
                if self.stopped is not None and isinstance(name, str):
                    # The guest is stopped at a crash point: a mark logged now would land
                    # past it. Checked now, logged at resume, or never if the run ends here.
                    validate_mark_name(name, self.server.device.sectorsize)
                    client.held_mark = name
                    return None
                return self._mark(name)
            if cmd == "status":
                return self.status()
            if cmd == "subscribe":
                client.subscribed = True
                self._update_observer()
                if self.stopped is not None:
                    # Already stopped: a late subscriber learns it right after the reply.
                    client.later.append(self.stopped)
                if self.paused_log_full is not None:
                    client.later.append({"event": "log-full", "reason": self.paused_log_full})
                return {"ok": True}
            if cmd == "stop-at":
                return self._stop_at(request.get("at"))
            if cmd == "resume":
                self.stop_point = None
                self.stopped = None
                self._update_observer()
                if self.paused_log_full is not None:
                    # We run inside the held FLUSH: it retries when this reply is sent and
                    # the device goes on by itself (releasing here would re-enter it).
                    self.server.resume_log_full()
                    return {"ok": True}
                self._log_held_marks()
                self.server.device.release()
                return {"ok": True}
        except (ValueError, LogFullError) as err:
            return {"ok": False, "error": str(err)}
        return {"ok": False, "error": f"unknown command {cmd!r} "
                                      "(mark, status, subscribe, stop-at, resume)"}

    def _mark(self, name: object) -> dict[str, Any]:
        if not isinstance(name, str):
            raise ValueError('mark needs a "name" string')
        if self.server.device.log_full is not None:
            # The log no longer describes the image: a mark would name a state it never had.
            raise ValueError(f"{self.server.device.log_full}: no more marks")
        entry = self.server.sink.mark(name)    # durable when it returns
        log.info("mark %s logged as entry %d", name, entry)
        return {"ok": True, "entry": entry}

    def _log_held_marks(self) -> None:
        """`resume`: the marks asked for while stopped are logged now, in arrival order of
        their clients, and answered; each client's later requests follow."""
        for fd, client in list(self.clients.items()):
            name, client.held_mark = client.held_mark, None
            if name is None:
                continue
            try:
                reply = self._mark(name)
            except (ValueError, LogFullError) as err:
                reply = {"ok": False, "error": str(err)}
            self._send(client, reply)
            self._serve_lines(fd)

    def status(self) -> dict[str, Any]:
        sink, device = self.server.sink, self.server.device
        entries = sink.entries
        # dm-log-writes reports the last allocated 512-byte sector of the log device.
        next_sector = sink.log_bytes // 512 - 1 if sink.log_bytes else 0
        return {"ok": True, "line": f"{entries} {next_sector}", "entries": entries,
                "next_sector": next_sector, "mode": sink.mode,
                "queues": device.num_queues, "queues_started": sum(device.started),
                "connected": self.server.connected, "wce": device.wce,
                "sectorsize": device.sectorsize, "readonly": device.readonly,
                "requests": device.requests(), "bytes_written": device.bytes_written,
                "bytes_read": device.bytes_read, "served_in_c": device.served_in_c,
                "kicks_in_c": device.kicks_in_c, "big_writes_in_c": device.big_writes_in_c,
                "unflushed": sink.unflushed,
                "flushes": sink.flushes, "log_bytes": sink.log_bytes,
                "held": device.held, "stop_at": self.stop_point.text if self.stop_point else None,
                "log_full": device.log_full or (f"log full (paused): {self.paused_log_full}"
                                                if self.paused_log_full else None),
                "unlogged": device.unlogged, "log_full_events": device.log_full_events,
                "image_error": device.image_error}

    def log_full(self, reason: str | None) -> None:
        """A FLUSH is held because the log is full (reason), or goes on again (None)."""
        self.paused_log_full = reason
        if reason is not None:
            self._broadcast({"event": "log-full", "reason": reason})

    def _stop_at(self, at: object) -> dict[str, Any]:
        if not isinstance(at, str):
            raise ValueError('stop-at needs an "at" string: entry:N, mark:NAME or flush:K')
        point = StopPoint(at)
        self.stop_point = point
        self.stopped = None
        sink = self.server.sink
        # A point the log has already passed is reached at once.
        if point.kind == "entry" and point.number < sink.entries:
            self._reached(point.number)
        elif point.kind == "flush" and 0 < point.number <= sink.flushes:
            self._reached(sink.entries - 1)
        self._update_observer()
        return {"ok": True}

    def _reached(self, entry: int) -> None:
        point, self.stop_point = self.stop_point, None
        assert point is not None
        self.server.device.hold()
        self.stopped = {"event": "stopped", "at": point.text, "entry": entry}
        log.info("stop point %s reached at entry %d: holding the guest's requests",
                 point.text, entry)
        self._broadcast(self.stopped)

    def _update_observer(self) -> None:
        """Watch the log only while someone listens or a stop point waits (hot path)."""
        wanted = self.stop_point is not None or any(c.subscribed for c in self.clients.values())
        self.server.sink.observer = self if wanted else None

    # -- LogObserver: the filter tells us what it logged ---------------------------------------

    def entry(self, index: int, flags: int) -> None:
        self._broadcast({"event": "entry", "index": index, "flags": flag_names(flags)})
        point = self.stop_point
        if point is not None and point.kind == "entry" and index >= point.number:
            self._reached(index)

    def flush(self, index: int, count: int) -> None:
        self._broadcast({"event": "flush", "entry": index, "count": count})
        point = self.stop_point
        if point is not None and point.kind == "flush" and count >= point.number:
            self._reached(index)

    def mark(self, index: int, name: str) -> None:
        self._broadcast({"event": "mark", "entry": index, "name": name})
        point = self.stop_point
        if point is not None and point.kind == "mark" and name == point.value:
            self._reached(index)
