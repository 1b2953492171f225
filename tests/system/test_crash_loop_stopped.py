"""A crash loop stopped part-way (Ctrl-C, a CI job's timeout sending SIGTERM, a closed
terminal) leaves nothing behind: no QEMU, no backend, no scratch directory, no cursor image in
/dev/shm (RAM), and it stops at once rather than checking the states still queued.

Before, SIGTERM killed Python on the spot with everything left in place, and Ctrl-C waited for
every queued state to be checked and then kept the scratch recording.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import PROJECT
from tests.system.test_crash_loop_hostlog import write_txnlog_log
from vhost.testing.daemons import default_stop_signals

LOGWRITES = [sys.executable, "-m", "logwrites.cli"]
HANG_GUARD_S = 120.0


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not ready():
        assert proc.poll() is None, f"the loop ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} in {HANG_GUARD_S:.0f} s"
        time.sleep(0.05)


def leftover_processes(sid: int, workdir: Path) -> list[str]:
    """Live processes of the loop: in its session (checkers), or naming its work directory
    (QEMU and the backend run in sessions of their own and outlive a parent killed outright)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and (int(fields[3]) == sid or str(workdir) in cmdline):
            found.append(cmdline)
    return found


def cursors() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("logwrites-cursor-*")} if shm.is_dir() else set()


def start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*LOGWRITES, "crash-loop", *args], cwd=PROJECT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=default_stop_signals)


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> tuple[int, str]:
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    return proc.returncode, err.decode()


@pytest.mark.parametrize(("sig", "status", "line"), [
    (signal.SIGTERM, 143, "logwrites: stopped by SIGTERM"),
    (signal.SIGINT, 130, "logwrites: interrupted"),
])
def test_stopped_while_checking_ends_the_checks_and_leaves_nothing(
        tmp_path: Path, sig: signal.Signals, status: int, line: str) -> None:
    log = write_txnlog_log(tmp_path / "txn.log", 30, barrier=False)
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(8 << 20)
    ran = tmp_path / "ran"
    checker = tmp_path / "slow-check"
    checker.write_text(f'#!/bin/sh\necho "$1" >> {ran}\nsleep 0.3\n')
    checker.chmod(0o755)
    workdir = tmp_path / "work"
    shm_before = cursors()
    proc = start(["--fs", "none", "--log", str(log), "--base", str(base), "--jobs", "1",
                  "--states", "prefix,reorder", "--check", f"host:{checker} {{image}}",
                  "--workdir", str(workdir), "--json"])
    wait_for("state checked", lambda: ran.exists() and len(ran.read_text().splitlines()) >= 2,
             proc)
    checked_at_stop = len(ran.read_text().splitlines())
    returncode, err = stop(proc, sig)

    assert returncode == status, err
    assert err.strip().splitlines()[-1] == line
    assert "Traceback" not in err
    # The state being checked at the signal may finish (and one may have just begun); the
    # other ~150 never start.
    assert len(ran.read_text().splitlines()) <= checked_at_stop + 2
    assert list(workdir.iterdir()) == []
    assert cursors() <= shm_before
    assert leftover_processes(proc.pid, workdir) == []


@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 3], ids=["once", "thrice"])
def test_stopped_while_recording_takes_qemu_and_the_recording_along(
        default_guest, tmp_path: Path, signals: int) -> None:
    # Thrice: a CI runner may repeat SIGTERM before its SIGKILL; the clean-up the first one
    # started must not be cut short by the next.
    workdir = tmp_path / "work"
    proc = start(["--image-size", "64M", "--workdir", str(workdir)])

    def guest_running() -> bool:
        return any("qemu-system" in p for p in leftover_processes(proc.pid, workdir)) and any(
            (d / "run" / "console.log").is_file() and (d / "run" / "console.log").stat().st_size
            for d in workdir.glob("logwrites-recording-*"))

    wait_for("guest booting", guest_running, proc)
    for _ in range(signals - 1):
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.02)
    returncode, err = stop(proc, signal.SIGTERM)

    assert returncode == 143, err
    assert err.strip().splitlines()[-1] == "logwrites: stopped by SIGTERM"
    assert "Traceback" not in err
    assert leftover_processes(proc.pid, workdir) == []
    assert list(workdir.iterdir()) == []


@pytest.mark.slow
def test_keep_recording_keeps_a_stopped_recording(default_guest, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    proc = start(["--image-size", "64M", "--workdir", str(workdir), "--keep-recording"])
    wait_for("log", lambda: any((d / "disk.log").is_file()
                                for d in workdir.glob("logwrites-recording-*")), proc)
    returncode, err = stop(proc, signal.SIGTERM)

    assert returncode == 143, err
    kept = [d.name for d in workdir.iterdir()]
    assert len(kept) == 1 and kept[0].startswith("logwrites-recording-"), kept
    assert (workdir / kept[0] / "disk.log").is_file()
    assert leftover_processes(proc.pid, workdir) == []
