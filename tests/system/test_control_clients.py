"""`logwrites mark` and `status` against sockets that are not a backend's control socket, and
with names and timeouts the backend could never take: one line naming the socket, exit 2,
never a traceback (beyond tests/system/test_sockets.py, whose socket never answers).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost.testing.daemons import LogwritesServe, logwrites_path

NOT_OURS = "control socket {ctl}: not a logwrites control socket"


class OneReply:
    """A Unix socket that takes one connection, waits for the request and answers `reply`
    (bytes, or None: close without reading it, which resets the client's connection)."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.path, self.reply = path, reply
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            if self.reply is None:
                conn.recv(1, socket.MSG_PEEK)    # the request is here, and left unread
                return
            conn.recv(65536)
            with contextlib.suppress(OSError):  # a client that has heard enough hangs up
                conn.sendall(self.reply)

    def __enter__(self) -> OneReply:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=10)
        self.listener.close()


def logwrites(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([logwrites_path(), *argv], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "ctl"


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["mark", "m"]])
@pytest.mark.parametrize(("reply", "expect"), [
    (b"hello\n", NOT_OURS + " (reply b'hello\\n' is no JSON)"),
    (b"\xff\xfe\n", NOT_OURS + " (reply b'\\xff\\xfe\\n' is no JSON)"),
    (b"[1]\n", NOT_OURS + " (reply b'[1]\\n' is no JSON object)"),
    (b"null\n", NOT_OURS + " (reply b'null\\n' is no JSON object)"),
    (b"x" * (2 << 20), NOT_OURS + " (no line end in 1048576 bytes)"),
    (None, NOT_OURS + " (it reset the connection: Connection reset by peer)"),
], ids=["text", "not-utf8", "list", "null", "endless", "reset"])
def test_a_socket_speaking_another_protocol_is_one_line(
        ctl: Path, command: list[str], reply: bytes | None, expect: str) -> None:
    with OneReply(ctl, reply):
        done = logwrites(*command, "--control", str(ctl))
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [f"logwrites: {expect.format(ctl=ctl)}"]
    assert done.stdout == ""


@pytest.mark.parametrize(("command", "field"), [(["status"], "line"), (["mark", "m"], "entry")])
def test_a_yes_without_the_answer_is_not_our_backend(ctl: Path, command: list[str],
                                                     field: str) -> None:
    with OneReply(ctl, b'{"ok": true}\n'):
        done = logwrites(*command, "--control", str(ctl))
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [
        f"logwrites: {NOT_OURS.format(ctl=ctl)} (a reply without {field})"]


@pytest.mark.parametrize(("argv", "expect"), [
    (["mark", "\udcff"], "mark name b'\\xff': not UTF-8 text"),
    (["mark", ""], "a mark name cannot be empty"),
    (["mark", "a b"], "mark name 'a b' contains whitespace"),
    (["mark", "m", "--timeout", "1e30"], "--timeout 1e+30: must be at most 604800 seconds "
                                         "(a week)"),
    (["status", "--timeout", "604801"], "--timeout 604801: must be at most 604800 seconds "
                                        "(a week)"),
])
def test_what_no_backend_takes_is_refused_before_asking(ctl: Path, argv: list[str],
                                                       expect: str) -> None:
    # The socket would answer; nothing may reach it.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(ctl))
        listener.listen()
        listener.settimeout(0)
        done = logwrites(*argv, "--control", str(ctl))
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [f"logwrites: {expect}"]


@pytest.mark.slow
def test_the_disk_socket_given_as_control_socket_is_named(tmp_path: Path) -> None:
    # An easy slip: the vhost-user socket is the one every other command is given.
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    sock = tmp_path / "s.sock"
    with LogwritesServe(disk, sock, tmp_path / "log", tmp_path):
        done = logwrites("status", "--control", str(sock))
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [
        f"logwrites: {NOT_OURS.format(ctl=sock)} (it reset the connection: Connection reset "
        "by peer)"]
