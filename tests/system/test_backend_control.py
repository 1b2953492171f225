"""`logwrites serve` through the pure-Python test front-end (no QEMU): the control socket
(marks, status, events, stop-at/resume, bad requests, several clients), the CLI clients, the
guest's cache switch, write-zeroes and discards, and requests refused before anything is
touched."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from logwrites.format import END_MARK
from logwrites.logfile import LogReader
from vhost.testing.daemons import LogwritesServe
from vhost.testing.frontend import BlkFrontend, CompletionTimeout, Segment, Status, write_parts

MiB = 1 << 20
CTRL_TIMEOUT = 30


class Control:
    """A blocking control-socket client: request lines out, reply and event lines in."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CTRL_TIMEOUT)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def send_raw(self, line: bytes) -> dict:
        self.sock.sendall(line)
        return self.line()

    def __call__(self, cmd: str, **args: object) -> dict:
        return self.send_raw(json.dumps({"cmd": cmd, **args}).encode() + b"\n")

    def line(self) -> dict:
        raw = self.file.readline()
        assert raw, "control socket closed"
        return json.loads(raw)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def kinds(log: Path) -> list[tuple]:
    out = []
    with LogReader(log) as reader:
        for e in reader.entries():
            if e.is_mark:
                out.append(("mark", e.mark))
            elif e.is_flush and not e.nr_sectors:
                out.append(("flush",))
            elif e.is_discard:
                out.append(("discard", e.sector, e.nr_sectors))
            else:
                data = reader.read_payload(e)
                fill = data[0] if data == data[:1] * len(data) else None
                out.append(("fua" if e.is_fua else "write", e.sector, e.nr_sectors, fill))
    return out


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """serve(*extra_args) -> a started LogwritesServe on a 64 MiB image (stopped after)."""
    started: list[LogwritesServe] = []

    def start(*extra: str) -> LogwritesServe:
        image = tmp_path / "disk.img"
        with image.open("wb") as f:
            f.truncate(64 * MiB)
        daemon = LogwritesServe(image, tmp_path / "s.sock", tmp_path / "log", tmp_path,
                                extra_args=list(extra))
        daemon.start()
        daemon.image = image
        daemon.control = tmp_path / "s.sock.control"
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.mark.slow
def test_marks_status_and_events(serve) -> None:
    d = serve()
    assert d.control.stat().st_mode & 0o777 == 0o600
    events, ctl = Control(d.control), Control(d.control)   # two clients at once
    assert events("subscribe") == {"ok": True}
    with BlkFrontend(d.socket_path) as fe:
        assert fe.write(8, b"\x11" * 4096).status == Status.OK
        assert ctl("status")["unflushed"] == 1
        assert fe.flush().status == Status.OK
        assert ctl("mark", name="after-flush") == {"ok": True, "entry": 2}
        assert events.line() == {"event": "entry", "index": 0, "flags": []}
        assert events.line() == {"event": "entry", "index": 1, "flags": ["flush"]}
        assert events.line() == {"event": "flush", "entry": 1, "count": 1}
        assert events.line() == {"event": "entry", "index": 2, "flags": ["mark"]}
        assert events.line() == {"event": "mark", "entry": 2, "name": "after-flush"}
        status = ctl("status")
        assert status["line"] == f"3 {status['log_bytes'] // 512 - 1}"
        assert (status["entries"], status["unflushed"], status["mode"]) == (3, 0, "logwrites")
        assert status["requests"]["out"] == 1 and status["requests"]["flush"] == 1
        assert status["bytes_written"] == 4096
        # Bad requests: one error line each, and the connection stays usable.
        for bad in (b"not json\n", b"[1]\n", b'{"cmd": "frobnicate"}\n',
                    b'{"cmd": "mark", "name": "two words"}\n', b'{"cmd": "mark"}\n',
                    b'{"cmd": "mark", "name": ""}\n',
                    json.dumps({"cmd": "mark", "name": "x" * 500}).encode() + b"\n",
                    b'{"cmd": "stop-at", "at": "entry:x"}\n'):
            reply = ctl.send_raw(bad)
            assert reply["ok"] is False and reply["error"], bad
        assert ctl("status")["entries"] == 3
    # The CLI clients.
    cli = [sys.executable, "-m", "logwrites.cli"]
    done = subprocess.run([*cli, "mark", "from-cli", "--control", str(d.control)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "3\n")
    done = subprocess.run([*cli, "mark", "bad name", "--control", str(d.control)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "whitespace" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = subprocess.run([*cli, "status", "--control", str(d.control)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split()[0] == "4"
    done = subprocess.run([*cli, "status", "--json", "--control", str(d.control)],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout)["entries"] == 4
    events.close()
    ctl.close()
    assert d.stop() == 0
    assert kinds(d.log_path) == [("write", 8, 8, 0x11), ("flush",), ("mark", "after-flush"),
                                 ("mark", "from-cli"), ("mark", END_MARK)]


@pytest.mark.slow
def test_stop_at_flush_holds_requests_until_resume(serve) -> None:
    d = serve()
    events, ctl = Control(d.control), Control(d.control)
    assert ctl("stop-at", at="flush:1") == {"ok": True}
    assert events("subscribe") == {"ok": True}
    with BlkFrontend(d.socket_path, timeout_s=5) as fe:
        assert fe.write(0, b"\x01" * 4096).status == Status.OK
        assert fe.flush().status == Status.OK       # the point itself completes
        seen = [events.line() for _ in range(4)]
        assert seen[-1] == {"event": "stopped", "at": "flush:1", "entry": 1}
        held = fe.prepare(write_parts(8, b"\x02" * 4096))
        fe.publish([held])
        fe.kick()
        with pytest.raises(CompletionTimeout):
            fe.wait([held], timeout_s=1.5)
        status = ctl("status")
        assert status["held"] and status["requests"]["out"] == 1
        late = Control(d.control)                    # a late subscriber learns it at once
        assert late("subscribe") == {"ok": True}
        assert late.line()["event"] == "stopped"
        # A mark asked for while stopped (the guest's lw-mark racing the stop) waits: logged
        # at resume, after the crash point, with the same client's later requests behind it.
        marker = Control(d.control)
        marker.sock.sendall(b'{"cmd": "mark", "name": "while-stopped"}\n{"cmd": "status"}\n')
        assert select.select([marker.sock], [], [], 1.0)[0] == []   # no reply yet
        assert ctl("status")["entries"] == 2         # the write and the FLUSH, no mark
        bad = Control(d.control)                     # a bad name is refused at once
        assert bad("mark", name="two words")["ok"] is False
        bad.close()
        assert ctl("resume") == {"ok": True}
        assert marker.line() == {"ok": True, "entry": 2}
        assert marker.line()["entries"] == 3
        marker.close()
        fe.wait([held], timeout_s=10)
        assert held.status == Status.OK
        assert not ctl("status")["held"]
        # A point already passed is reached at once.
        assert ctl("stop-at", at="entry:0") == {"ok": True}
        assert ctl("status")["held"]
        assert ctl("resume") == {"ok": True}
        assert ctl("stop-at", at="mark:here") == {"ok": True}
        assert ctl("mark", name="here")["ok"]
        assert ctl("status")["held"]
        assert ctl("resume") == {"ok": True}
    for c in (events, ctl, late):
        c.close()


@pytest.mark.slow
def test_cache_switch_zeroes_discards_and_refused_requests(serve) -> None:
    d = serve("--sector-size", "4096")
    with BlkFrontend(d.socket_path) as fe:
        assert fe.config.blk_size == 4096 and fe.config.wce == 1
        assert fe.write(0, b"\x05" * 8192).status == Status.OK
        assert fe.write_zeroes([(0, 8), Segment(64, 16, 0)]).status == Status.OK
        assert fe.discard([(128, 8)]).status == Status.OK
        assert fe.write_zeroes([(256, 8)], unmap=True).status == Status.OK
        assert fe.flush().status == Status.OK
        # Refused before anything is touched: misaligned, out of range, partial sectors,
        # overflowing, unknown flags; none is logged and the image is unchanged.
        image_before = d.image.read_bytes()
        end = fe.capacity
        assert fe.write(1, b"\x06" * 4096).status == Status.IOERR          # not 4096-aligned
        assert fe.write(8, b"\x06" * 512).status == Status.IOERR           # partial sector
        assert fe.write(end, b"\x06" * 4096).status == Status.IOERR        # past the end
        assert fe.write(end - 8, b"\x06" * 8192).status == Status.IOERR    # crosses the end
        assert fe.read((1 << 64) - 8, 4096).status == Status.IOERR         # overflows
        assert fe.discard([(8, 8), (end, 8)]).status == Status.IOERR       # one bad segment
        assert fe.discard([Segment(8, 8, 1)]).status == Status.UNSUPP      # unmap on discard
        assert fe.write_zeroes([Segment(8, 8, 2)]).status == Status.UNSUPP
        assert d.image.read_bytes() == image_before
        # The guest turns its write cache off: writes are logged at once with FUA.
        fe.set_config(32, b"\x00")
        assert fe.get_config().wce == 0
        assert fe.write(16, b"\x07" * 4096).status == Status.OK
        fe.set_config(32, b"\x01")
        assert fe.write(24, b"\x08" * 4096).status == Status.OK
    assert d.stop() == 0
    assert kinds(d.log_path) == [
        ("write", 0, 2, 5), ("write", 0, 1, 0), ("write", 8, 2, 0), ("discard", 16, 1),
        ("write", 32, 1, 0), ("flush",), ("fua", 2, 1, 7),   # unmap: still zeros
        ("write", 3, 1, 8),                          # the volatile tail at the stop
        ("mark", END_MARK)]
    data = d.image.read_bytes()
    assert data[:4096] == bytes(4096) and data[4096:8192] == b"\x05" * 4096


@pytest.mark.slow
def test_passthrough_and_immediate_modes(serve, tmp_path: Path) -> None:
    d = serve("--mode", "immediate")
    with BlkFrontend(d.socket_path) as fe:
        assert fe.write(0, b"\x01" * 512).status == Status.OK
        assert fe.write(1, b"\x02" * 512).status == Status.OK
        assert fe.flush().status == Status.OK
        ctl = Control(d.control)
        assert ctl("status")["mode"] == "immediate"
        ctl.close()
    assert d.stop() == 0
    assert kinds(d.log_path) == [("write", 0, 1, 1), ("write", 1, 1, 2), ("flush",),
                                 ("mark", END_MARK)]
    d = serve("--mode", "passthrough")
    with BlkFrontend(d.socket_path) as fe:
        assert fe.write(0, b"\x03" * 512).status == Status.OK
        ctl = Control(d.control)
        reply = ctl("mark", name="m")
        assert reply["ok"] is False and "passthrough" in reply["error"]
        assert ctl("status")["line"] == "0 0"
        ctl.close()
    assert d.stop() == 0
    assert d.image.read_bytes()[:512] == b"\x03" * 512
