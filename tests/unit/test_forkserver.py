"""The fork server (logwrites/forkserver.py, logwrites/_forkserver.c): each run is a fresh
copy of the program with the server's argv and environment, giving the exit status and output
a plain run gives; a run past its timeout is killed; a server that cannot serve says so."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from logwrites.forkserver import FORKSERVER_SO, ForkServer, ForkServerGone

SCRIPT = 'echo "run $$ $LW_TEST"; read x; echo "stdin: ${x:-empty}"; exit 3'


@pytest.fixture
def preload() -> Path:
    if not FORKSERVER_SO.is_file():
        raise AssertionError(f"{FORKSERVER_SO} is missing: run bash scripts/setup.sh")
    return FORKSERVER_SO


def test_each_run_is_a_fresh_copy_with_the_plain_runs_answer(tmp_path: Path,
                                                              preload: Path) -> None:
    argv = ["sh", "-c", SCRIPT]
    server = ForkServer(argv, {"LW_TEST": "x1"}, preload, tmp_path / "out")
    try:
        answers = [server.run(10.0) for _ in range(3)]
    finally:
        server.close()
    plain = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           env={"LW_TEST": "x1", "PATH": "/usr/bin:/bin"})
    assert [status for status, _ in answers] == [3, 3, 3] == [plain.returncode] * 3
    pids = set()
    for _, out in answers:
        first, second = out.splitlines()
        word, pid, env = first.split()
        assert (word, env, second) == ("run", "x1", "stdin: empty")
        pids.add(pid)
    assert len(pids) == 3                      # three processes, not one
    assert plain.stdout.splitlines()[1] == "stdin: empty"


def test_a_run_past_its_timeout_is_killed_and_the_server_goes_on(tmp_path: Path,
                                                                 preload: Path) -> None:
    marker = tmp_path / "slow"
    argv = ["sh", "-c", f'if [ -e {marker} ]; then rm {marker}; sleep 30; fi; echo done']
    server = ForkServer(argv, {}, preload, tmp_path / "out")
    try:
        marker.touch()
        started = time.monotonic()
        status, _ = server.run(0.5)
        assert status is None and time.monotonic() - started < 10
        assert server.run(10.0) == (0, "done\n")
    finally:
        server.close()


def test_a_server_that_cannot_serve_says_so(tmp_path: Path) -> None:
    # No fork server in the preload: the program runs main() at once and ends.
    server = ForkServer(["true"], {}, tmp_path / "missing.so", tmp_path / "out")
    try:
        with pytest.raises(ForkServerGone):
            server.run(10.0)
    finally:
        server.close()
