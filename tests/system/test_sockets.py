"""Sockets and inputs of `logwrites serve` (issue 6): socket modes and directories, what the
control socket does with hostile lines (beyond tests/system/test_backend_control.py), and
every command-line error being one line with exit status 2.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import write_log
from tests.system.test_backend_control import Control
from vhost.testing.daemons import LogwritesServe, logwrites_path
from vhost.testing.frontend import BlkFrontend, Status

MiB = 1 << 20


def image(tmp_path: Path, size: int = 4 * MiB) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(size)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_sockets_are_private_and_open_directories_warned(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    d = LogwritesServe(image(tmp_path), private / "s.sock", tmp_path / "log", tmp_path)
    with d:
        assert mode(private / "s.sock") == 0o600
        assert mode(private / "s.sock.control") == 0o600
        assert "warning" not in d.stderr_tail()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    d = LogwritesServe(image(tmp_path), shared / "s.sock", tmp_path / "log2", tmp_path,
                       extra_args=["--socket-mode", "660"])
    with d:
        assert mode(shared / "s.sock") == 0o660
        assert mode(shared / "s.sock.control") == 0o660
        with BlkFrontend(d.socket_path) as fe:       # still a working disk
            assert fe.write(0, b"\x05" * 4096).status == Status.OK
    assert f"warning: {shared} is open to other users (mode 0777)" in d.stderr_tail()


@pytest.mark.slow
def test_control_socket_survives_hostile_lines(tmp_path: Path) -> None:
    with LogwritesServe(image(tmp_path), tmp_path / "s.sock", tmp_path / "log", tmp_path) as d:
        ctl = Control(tmp_path / "s.sock.control")
        bad_lines = [
            b"\xff\xfe not utf-8\n",
            b'{"cmd": "mark", "name": 7}\n',
            b'{"cmd": "mark", "name": "tab\\there"}\n',
            b'{"cmd": "mark", "name": "new\\nline"}\n',
            b'{"cmd": "mark", "name": " "}\n',
            b'{"cmd": 1}\n',
            b'{"cmd": "stop-at", "at": 5}\n',
            b'{"cmd": "stop-at", "at": "flush:-1"}\n',
            b"{" * 10000 + b"\n",                          # nesting the parser may refuse
            json.dumps({"cmd": "mark", "name": "y" * 5000}).encode() + b"\n",
        ]
        for line in bad_lines:
            reply = ctl.send_raw(line)
            assert reply["ok"] is False and reply["error"], line[:40]
        # A line longer than the limit: refused once, however the kernel splits it, and the
        # rest of it up to its newline is dropped; the connection goes on with the next line.
        ctl.sock.sendall(b"z" * (200 << 10) + b"\n")
        reply = ctl.line()
        assert reply["ok"] is False and "too long" in reply["error"]
        status = ctl("status")              # not a second refusal of the same line
        assert status.get("entries") == 0, status
        for piece in (b"y" * (70 << 10), b"y" * (70 << 10), b'"}\n'):
            ctl.sock.sendall(piece)
            time.sleep(0.05)                # separate reads: each is past the limit alone
        reply = ctl.line()
        assert reply["ok"] is False and "too long" in reply["error"]
        status = ctl("status")
        assert status.get("entries") == 0, status
        assert ctl("mark", name="fine")["ok"] is True
        assert ctl("status")["entries"] == 1
        ctl.close()
        assert d.alive()


CLI_ERRORS = {
    "missing image": (["serve", "{tmp}/nope.img", "--socket", "{tmp}/s", "--log", "{tmp}/l"],
                      "No such file"),
    "bad sector size": (["serve", "{img}", "--socket", "{tmp}/s", "--log", "{tmp}/l",
                         "--sector-size", "1000"], "--sector-size"),
    "image not a multiple of the sector size": (
        ["serve", "{odd}", "--socket", "{tmp}/s", "--log", "{tmp}/l", "--sector-size", "4096"],
        "not a multiple"),
    "image smaller than a sector": (["serve", "{tiny}", "--socket", "{tmp}/s", "--log",
                                     "{tmp}/l"], "smaller than one sector"),
    "unwritable log": (["serve", "{img}", "--socket", "{tmp}/s", "--log", "/proc/nope/l"],
                       "No such file"),
    "log is the image": (["serve", "{img}", "--socket", "{tmp}/s", "--log", "{img}"],
                         "the image itself"),
    "no log": (["serve", "{img}", "--socket", "{tmp}/s"], "needs --log"),
    "log size too small": (["serve", "{img}", "--socket", "{tmp}/s", "--log", "{tmp}/l",
                            "--log-size", "100"], "--log-size"),
    "bad on-log-full": (["serve", "{img}", "--socket", "{tmp}/s", "--log", "{tmp}/l",
                         "--on-log-full", "ignore"], "--on-log-full"),
    "socket directory missing": (["serve", "{img}", "--socket", "{tmp}/no/dir/s", "--log",
                                  "{tmp}/l"], "directory"),
    "socket path too long": (["serve", "{img}", "--socket", "{tmp}/" + "s" * 120, "--log",
                              "{tmp}/l"], "107 bytes"),
    "bad socket mode": (["serve", "{img}", "--socket", "{tmp}/s", "--log", "{tmp}/l",
                         "--socket-mode", "rw"], "--socket-mode"),
    "image is a directory": (["serve", "{tmp}", "--socket", "{tmp}/s", "--log", "{tmp}/l"],
                             ""),
    "no queues": (["serve", "{img}", "--socket", "{tmp}/s", "--log", "{tmp}/l",
                   "--num-queues", "0"], "--num-queues"),
    "long serial": (["serve", "{img}", "--socket", "{tmp}/s", "--log", "{tmp}/l",
                     "--serial", "x" * 21], "--serial"),
    # A new log would destroy what these hold: an earlier recording, or an image.
    "log holds an earlier log": (["serve", "{img}", "--socket", "{tmp}/s", "--log",
                                  "{earlier}"], "holds a log of 2 entries: --resume"),
    "log holds an image": (["serve", "{img}", "--socket", "{tmp}/s", "--log", "{odd}"],
                           "holds 4608 bytes that are not a log: --overwrite"),
    "resume and overwrite": (["serve", "{img}", "--socket", "{tmp}/s", "--log", "{earlier}",
                              "--resume", "--overwrite"], "one or the other"),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_serve_command_line_errors_are_one_line_exit_2(tmp_path: Path, case: str) -> None:
    img = image(tmp_path)
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(4096 + 512))
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(bytes(100))
    earlier = write_log(tmp_path / "earlier.log", [("w", 1, 1, 7), ("m", "done")])
    kept = {path: path.read_bytes() for path in (earlier, odd)}
    argv, expect = CLI_ERRORS[case]
    argv = [a.format(tmp=tmp_path, img=img, odd=odd, tiny=tiny, earlier=earlier)
            for a in argv]
    done = subprocess.run([logwrites_path(), *argv], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, (case, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, (case, done.stderr)
    assert expect in lines[0], (case, lines[0])
    assert done.stdout == ""
    assert not (tmp_path / "s").exists()
    assert {path: path.read_bytes() for path in kept} == kept


def test_overwrite_starts_a_new_log_over_an_earlier_one(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log", [("w", 1, 1, 7), ("m", "earlier")])
    with LogwritesServe(image(tmp_path), tmp_path / "s.sock", log, tmp_path,
                        extra_args=["--overwrite"]) as d, BlkFrontend(d.socket_path) as fe:
        assert fe.write(8, b"\x09" * 4096).status == Status.OK
        assert fe.flush().status == Status.OK
    done = subprocess.run([logwrites_path(), "inspect", "--json", str(log)],
                          capture_output=True, text=True, timeout=60, check=True)
    entries = [json.loads(line) for line in done.stdout.splitlines()]
    assert "earlier" not in done.stdout
    assert [(e["sector"], e["nr_sectors"]) for e in entries if not e["flags"]] == [(8, 8)]


@pytest.mark.parametrize(("argv", "expect"), [
    (["mark", "m", "--timeout", "nan"], "--timeout nan: must be more than 0 seconds"),
    (["status", "--timeout", "-1"], "--timeout -1: must be more than 0 seconds"),
    (["status", "--timeout", "inf"], "--timeout inf: must be a finite number of seconds"),
    (["status", "--timeout", "0.3"], "control socket {ctl}: no reply within 0.3 s (--timeout)"),
    (["mark", "m", "--timeout", "0.3"], "control socket {ctl}: no reply within 0.3 s (--timeout)"),
])
def test_control_clients_errors_are_one_line_exit_2(
        tmp_path: Path, argv: list[str], expect: str) -> None:
    # A control socket that takes the request and never answers (a backend stuck in a sync).
    ctl = tmp_path / "ctl"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(ctl))
        silent.listen()
        done = subprocess.run([logwrites_path(), *argv, "--control", str(ctl)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [f"logwrites: {expect.format(ctl=ctl)}"]
    assert done.stdout == ""
