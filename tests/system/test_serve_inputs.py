"""`logwrites serve` refuses bad input in one line, exit status 2, before it creates or changes
anything: a live backend's sockets (a second serve on them must not replace them), paths that
are not what their option needs (FIFOs, directories, /proc files, empty paths), numbers out of
range and a serial the device ID cannot carry. A stale socket file, left by a killed backend,
is still replaced.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.system.test_sockets import image
from vhost.testing.daemons import LogwritesServe, logwrites_path
from vhost.testing.frontend import BlkFrontend, Status

# {tmp}: the test's directory; {img}: a 4 MiB image; {fifo}, {file}, {dir}: a FIFO, a regular
# file and a directory there; {shared}: a directory open to other users (a warning's reason).
CASES = {
    "control is the socket": (["--socket", "{tmp}/s", "--control", "{tmp}/s"],
                              "--control {tmp}/s is the --socket path"),
    "control is the socket, spelled otherwise": (
        ["--socket", "{tmp}/s", "--control", "{tmp}/./s"], "is the --socket path"),
    "log at the control socket": (["--socket", "{tmp}/s", "--log", "{tmp}/s.control"],
                                  "--log {tmp}/s.control is the --control path"),
    "empty socket": (["--socket", ""], "argument --socket: an empty path"),
    "empty control": (["--control", ""], "argument --control: an empty path"),
    "empty log": (["--log", ""], "argument --log: an empty path"),
    "log size past off_t": (["--log-size", "99999999999999999999999999"],
                            "at most 9223372036854775807 bytes"),
    "serial not UTF-8": (["--serial", "\udcff"], "not UTF-8; a serial (virtio-blk's device "
                                                 "ID) is UTF-8 text of at most 20 bytes"),
    "log is a FIFO": (["--log", "{fifo}"], "--log {fifo}: a FIFO, not a regular file or "
                                           "block device"),
    "log is a directory": (["--log", "{dir}"], "--log {dir}: a directory, not a regular file"),
    "log is a /proc file": (["--log", "/proc/self/status"],
                            "--log /proc/self/status: a file on proc, a kernel pseudo "
                            "filesystem, not storage"),
    "socket is a regular file": (["--socket", "{file}"],
                                 "--socket {file}: a regular file, not a socket"),
    "socket is a directory": (["--socket", "{dir}"], "--socket {dir}: a directory, not a socket"),
    "control is a regular file": (["--control", "{file}"],
                                  "--control {file}: a regular file, not a socket"),
    "socket mode out of range": (["--socket-mode", "999"],
                                 "argument --socket-mode: '999': an octal mode such as 600"),
    "socket mode not octal": (["--socket-mode", "abc"], "'abc': an octal mode such as 600"),
}

IMAGE_CASES = {
    "image is empty": ([""], "argument image: an empty path"),
    "image is a FIFO": (["{fifo}", "--readonly"], "{fifo}: a FIFO, not a regular file or "
                                                  "block device"),
    "image is a /proc file": (["/proc/self/status", "--readonly"],
                              "/proc/self/status: a file on proc, a kernel pseudo filesystem, "
                              "not storage"),
    # 4096 bytes by its size, a whole number of sectors: refused by its filesystem alone.
    "image is a /sys file": (["/sys/kernel/uevent_seqnum", "--readonly"],
                             "/sys/kernel/uevent_seqnum: a file on sysfs, a kernel pseudo "
                             "filesystem, not storage"),
    "image is a character device": (["/dev/null"], "/dev/null: a character device, not a "
                                                   "regular file or block device"),
    # The directory warning waits until every check passed: the error stays one line.
    "image too small, socket in a shared directory": (
        ["{file}", "--socket", "{shared}/s"], "{file}: 15 bytes, smaller than one sector"),
}


def tree(top: Path) -> dict[str, bytes | str]:
    """Every path under `top` with a regular file's bytes (else its kind): what a refused
    serve must leave as it was."""
    found: dict[str, bytes | str] = {}
    for path in sorted(top.rglob("*")):
        found[str(path)] = (path.read_bytes() if path.is_file()
                            else "dir" if path.is_dir() else "other")
    return found


def serve(argv: list[str]) -> subprocess.CompletedProcess[str]:
    # Bounded: a FIFO image used to block open() forever.
    return subprocess.run([logwrites_path(), "serve", *argv], capture_output=True, text=True,
                          timeout=30)


def assert_refused(done: subprocess.CompletedProcess[str], expect: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("logwrites: ") and expect in lines[0], lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize("case", sorted(CASES) + sorted(IMAGE_CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path: Path, case: str) -> None:
    img = image(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "file").write_bytes(b"someone's file\n")
    (tmp_path / "dir").mkdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    names = {"tmp": tmp_path, "img": img, "fifo": fifo, "file": tmp_path / "file",
             "dir": tmp_path / "dir", "shared": shared}
    if case in CASES:
        extra, expect = CASES[case]
        # Later options win in argparse: each case's own --socket/--log replace these.
        argv = [str(img), "--socket", str(tmp_path / "s"), "--log", str(tmp_path / "l"),
                *extra]
    else:
        extra, expect = IMAGE_CASES[case]
        argv = ["--socket", str(tmp_path / "s"), "--log", str(tmp_path / "l"), *extra]
    before = tree(tmp_path)
    done = serve([a.format(**names) for a in argv])
    assert_refused(done, expect.format(**names))
    assert tree(tmp_path) == before


def stale_socket(path: Path) -> None:
    """A socket file with nobody bound to it: what a killed backend leaves behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    assert path.is_socket()


def status(control: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([logwrites_path(), "status", "--control", str(control)],
                          capture_output=True, text=True, timeout=30)


def test_a_second_serve_leaves_a_live_backends_sockets_alone(tmp_path: Path) -> None:
    sock, control = tmp_path / "s.sock", tmp_path / "s.sock.control"
    # --once: a probe that connected like a front-end would end this backend.
    with LogwritesServe(image(tmp_path), sock, tmp_path / "a.log", tmp_path,
                        extra_args=["--once"]) as first:
        other = tmp_path / "other"
        other.mkdir()
        disk = image(other)
        for argv, expect in [
            (["--socket", str(sock)], f"--socket {sock}: a backend already listens there"),
            (["--socket", str(other / "t"), "--control", str(control)],
             f"--control {control}: a backend already listens there"),
        ]:
            done = serve([str(disk), "--log", str(other / "b.log"), *argv])
            assert_refused(done, expect)
            assert sorted(p.name for p in other.iterdir()) == ["disk.img"]
        assert status(control).returncode == 0
        with BlkFrontend(sock) as fe:                 # the first backend's disk, still served
            assert fe.write(0, b"\x07" * 4096).status == Status.OK
            assert fe.flush().status == Status.OK
        assert first.alive()


def test_stale_sockets_of_a_killed_backend_are_replaced(tmp_path: Path) -> None:
    sock, control = tmp_path / "s.sock", tmp_path / "s.sock.control"
    stale_socket(sock)
    stale_socket(control)
    with LogwritesServe(image(tmp_path), sock, tmp_path / "log", tmp_path) as d:
        assert status(control).returncode == 0
        with BlkFrontend(sock) as fe:
            assert fe.write(0, b"\x08" * 4096).status == Status.OK
        assert d.alive()
