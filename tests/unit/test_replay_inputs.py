"""What `replay` and `inspect` refuse, and how: a target that is the log, paths that are no
file or block device (a FIFO would block forever), entries beyond any device, damage met
half-way and a target that cannot grow. One line, exit 2, and the log never written."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from logwrites.logfile import LogReader
from logwrites.storagepaths import storage_stat

OPS = [("w", 1, 2, 7), ("w", 3, 1, 8), ("f",), ("w", 5, 1, 9), ("m", "done")]


def logwrites(*argv: str) -> subprocess.CompletedProcess[str]:
    # A subprocess with a timeout: a FIFO opened by mistake blocks, and must fail the test.
    return subprocess.run([sys.executable, "-m", "logwrites.cli", *argv], capture_output=True,
                          text=True, timeout=60, check=False)


def one_line_exit_2(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("logwrites: "), done.stderr
    return lines[0].removeprefix("logwrites: ")


def with_entry_3(log: Path, tmp_path: Path, name: str, field: int, value: int) -> Path:
    """A copy of `log` whose entry 3 has header field `field` (0 sector, 2 flags) = value."""
    with LogReader(log) as reader:
        header = next(e for e in reader.entries() if e.index == 3).data_offset - 512
    data = bytearray(log.read_bytes())
    struct.pack_into("<Q", data, header + 8 * field, value)
    bad = tmp_path / name
    bad.write_bytes(data)
    return bad


@pytest.mark.parametrize("argv", [["replay", "{log}", "{log}"],
                                  ["replay", "--state", "p:4", "{log}", "{log}"],
                                  ["replay", "{log}", "{link}"]])
def test_the_log_as_its_own_target_is_refused(make_log, tmp_path: Path,
                                              argv: list[str]) -> None:
    log = make_log(OPS)
    (tmp_path / "link").symlink_to(log)
    before = log.read_bytes()
    said = one_line_exit_2(logwrites(*(a.format(log=log, link=tmp_path / "link")
                                       for a in argv)))
    assert said.endswith("is the log itself: the replay would overwrite the log it reads")
    assert log.read_bytes() == before


@pytest.mark.parametrize(("argv", "said"), [
    (["inspect", "{fifo}"], "log {fifo}: a FIFO, not a regular file or block device"),
    (["replay", "{fifo}", "{img}"], "log {fifo}: a FIFO, not a regular file or block device"),
    (["replay", "{log}", "{fifo}"], "target {fifo}: a FIFO, not a regular file or block device"),
    (["replay", "--state", "p:4", "{log}", "{fifo}"],
     "target {fifo}: a FIFO, not a regular file or block device"),
    (["replay", "{log}", "/dev/null"],
     "target /dev/null: a character device, not a regular file or block device"),
    (["inspect", ""], "log: an empty path"),
    (["replay", "{log}", ""], "target: an empty path"),
    (["inspect", "/proc/self/status"],
     "log /proc/self/status: a file on proc, a kernel pseudo filesystem, not storage"),
    # "Regular" files by their type, but their sizes (4096, 0) and contents are the kernel's.
    (["inspect", "/sys/kernel/notes"],
     "log /sys/kernel/notes: a file on sysfs, a kernel pseudo filesystem, not storage"),
    (["replay", "/proc/version", "{img}"],
     "log /proc/version: a file on proc, a kernel pseudo filesystem, not storage"),
    (["replay", "{log}", "/sys/kernel/notes"],
     "target /sys/kernel/notes: a file on sysfs, a kernel pseudo filesystem, not storage"),
    (["replay", "--find", "--limit", "2", "{log}", "{img}"],
     "--find replays nothing: no TARGET ({img}) with it"),
])
def test_what_is_no_log_or_target_is_named(make_log, tmp_path: Path, argv: list[str],
                                           said: str) -> None:
    log = make_log(OPS)
    fifo, img = tmp_path / "fifo", tmp_path / "t.img"
    os.mkfifo(fifo)
    names = {"log": log, "fifo": fifo, "img": img}
    assert one_line_exit_2(logwrites(*(a.format(**names) for a in argv))) == said.format(**names)
    assert not img.exists()


def test_files_of_real_filesystems_are_storage(tmp_path: Path) -> None:
    # tmpfs has an anonymous device number, as every pseudo filesystem does: looked up, kept.
    for where in (tmp_path, Path("/dev/shm")):
        with tempfile.NamedTemporaryFile(dir=where) as file:
            assert storage_stat(file.name, "log") is not None


@pytest.mark.parametrize("argv", [["inspect", "{bad}"], ["replay", "{bad}", "{img}"],
                                  ["replay", "--state", "p:4", "{bad}", "{img}"]])
def test_an_entry_beyond_any_device_is_damage(make_log, tmp_path: Path,
                                              argv: list[str]) -> None:
    # 2^60 sectors of 512 bytes: an offset no file or device has (pwrite overflowed before).
    bad = with_entry_3(make_log(OPS), tmp_path, "huge.log", 0, 1 << 60)
    img = tmp_path / "t.img"
    img.write_bytes(bytes(8 * 512))
    said = one_line_exit_2(logwrites(*(a.format(bad=bad, img=img) for a in argv)))
    assert said.startswith("log entry 3: sectors 1152921504606846976+1 end beyond any device")


def test_damage_met_half_way_says_what_the_target_holds(make_log, tmp_path: Path) -> None:
    bad = with_entry_3(make_log(OPS), tmp_path, "bad.log", 2, 0x100)
    img = tmp_path / "t.img"
    said = one_line_exit_2(logwrites("replay", str(bad), str(img)))
    assert said == f"log entry 3: unknown flag bits 0x100; {img} holds the entries 0..2 " \
                   f"replayed before it"
    data = img.read_bytes()
    assert data[512:1536] == b"\x07" * 1024 and data[1536:2048] == b"\x08" * 512


def test_a_target_that_cannot_grow_names_the_entry(make_log, tmp_path: Path) -> None:
    # Sector 2^50 is a valid offset, but past ext4's and tmpfs' largest file.
    bad = with_entry_3(make_log(OPS), tmp_path, "far.log", 0, 1 << 50)
    img = tmp_path / "t.img"
    said = one_line_exit_2(logwrites("replay", str(bad), str(img)))
    assert said == f"entry 3 onto {img}: File too large"


def test_a_stopped_replay_ends_its_fsck_command(make_log, tmp_path: Path) -> None:
    # The shell's child (`sleep`) outlived a SIGTERM of replay, still holding the target.
    log, img, pid_file = make_log(OPS), tmp_path / "t.img", tmp_path / "sleep.pid"
    fsck = f"sleep 300 & echo $! > {pid_file}; wait"
    err = tmp_path / "stderr"  # a file, not a pipe: a surviving child would hold a pipe open
    with err.open("w") as err_file:
        replay = subprocess.Popen([sys.executable, "-m", "logwrites.cli", "replay", str(log),
                                   str(img), "--check", "1", "--fsck", fsck], stderr=err_file)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline and replay.poll() is None, "--fsck never ran"
        time.sleep(0.05)
    sleeper = int(pid_file.read_text())
    replay.send_signal(signal.SIGTERM)
    assert replay.wait(timeout=30) == 128 + signal.SIGTERM
    assert err.read_text() == "logwrites: stopped by SIGTERM\n"
    await_gone(sleeper, deadline, "the --fsck command's child outlived the replay")


def test_a_hung_fsck_command_fails_its_check_at_the_timeout(make_log, tmp_path: Path) -> None:
    # replay-log waits forever for its fsck; a hung one hung the replay (and the script).
    log, img, pid_file = make_log(OPS), tmp_path / "t.img", tmp_path / "sleep.pid"
    fsck = f"sleep 300 & echo $! > {pid_file}; wait"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "logwrites.cli", "replay", str(log), str(img),
                           "--check", "flush", "--fsck", fsck, "--fsck-timeout", "0.5"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=60, check=False)
    assert time.monotonic() - started < 30
    # SIGKILLed with its group, but it may still be exiting.
    await_gone(int(pid_file.read_text()), time.monotonic() + 10,
               "the --fsck command's child outlived its timeout")
    assert (done.returncode, done.stderr) == (1, (
        f"logwrites: check failed after log entry 2: {fsck!r} did not finish within 0.5 s "
        f"(--fsck-timeout): killed with its process group\n"))


def await_gone(pid: int, deadline: float, failure: str) -> None:
    """Wait until `pid` has exited, failing with `failure` past `deadline` (monotonic)."""
    try:
        while running(pid):
            assert time.monotonic() < deadline, failure
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # not left behind when the test fails


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
