"""A log whose disk fails with EIO (not a full filesystem): the backend stops with one line,
never completes a write or a FLUSH it could not log as if it had, and the log stays valid up to
its count.

The failure is injected at the system call (tests/system/shims/failing_log.c, LD_PRELOAD): the
test host has no device-mapper to make a real disk fail. Big writes run on both pipelines (C's
log thread and vhost/pipeline.py's); the FLUSH's log sync on C's path and Python's.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.system.test_backend_control import kinds
from tests.system.test_log_full import start
from vhost.testing.daemons import LogwritesServe
from vhost.testing.frontend import (
    BackendGone,
    BlkFrontend,
    CompletionTimeout,
    Status,
    flush_parts,
    write_parts,
)

BIG = 256 << 10
SHIM = Path(__file__).parent / "shims" / "failing_log.c"


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = tmp_path_factory.mktemp("shim") / "failing_log.so"
    subprocess.run([require_tool("gcc", "gcc"), "-shared", "-fPIC", "-O2", "-o", str(built),
                    str(SHIM), "-ldl"], check=True, timeout=120)
    return built


def failing(tmp_path: Path, shim: Path, what: str, in_c: bool) -> tuple[LogwritesServe, Path]:
    log = tmp_path / "log"
    trigger = tmp_path / "fail-now"
    d = start(tmp_path, log, env={"LD_PRELOAD": str(shim), "LW_FAIL_PATH": str(log),
                                  "LW_FAIL_TRIGGER": str(trigger), "LW_FAIL_WHAT": what,
                                  "LOGWRITES_PLAIN_IN_C": "1" if in_c else "0"})
    return d, trigger


def big(i: int) -> list:
    return write_parts(i * (BIG // 512), bytes([i + 1]) * BIG)


def stopped_by_itself(d: LogwritesServe) -> int | None:
    """The backend's exit status once it stopped on its own (it hangs up on the front-end
    first, then reports and exits); None if it did not within 20 s."""
    try:
        return d.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        return None
    finally:
        d.stop()


def stopped_with_one_line(d: LogwritesServe, code: int | None, what: str) -> None:
    assert code not in (0, None)
    lines = d.stderr_tail().strip().splitlines()
    assert lines and lines[-1].startswith("logwrites: ") and "Input/output error" in lines[-1]
    assert what in lines[-1], lines[-1]
    assert "Traceback" not in d.stderr_tail()


def fails_after(tmp_path: Path, shim: Path, what: str, in_c: bool, first: list,
                after: Callable[[BlkFrontend], None], message: str) -> None:
    """Serve `first` (all OK), make the log's disk fail, run `after`, which must lose the
    backend; then the backend must have stopped with one line naming `message`."""
    d, trigger = failing(tmp_path, shim, what, in_c)
    try:
        with BlkFrontend(d.socket_path, timeout_s=10) as fe:
            assert [r.status for r in fe.run(first)] == [Status.OK] * len(first)
            trigger.touch()
            with pytest.raises((BackendGone, CompletionTimeout)):
                after(fe)
    finally:
        code = stopped_by_itself(d)
    stopped_with_one_line(d, code, message)


@pytest.mark.slow
@pytest.mark.parametrize("in_c", [True, False], ids=["in-c", "in-python"])
def test_big_record_write_error_stops_the_backend(tmp_path: Path, shim: Path,
                                                  in_c: bool) -> None:
    statuses: list[Status] = []

    def big_writes(fe: BlkFrontend) -> None:
        for i in range(2, 6):
            statuses.extend(r.status for r in fe.run([big(i), big(i + 10)]))

    fails_after(tmp_path, shim, "write", in_c, [big(0), big(1), flush_parts()], big_writes,
                "log write")
    assert Status.OK not in statuses
    # Valid up to its count: the two writes and the FLUSH that counted them, nothing after.
    assert kinds(tmp_path / "log") == [("write", 0, BIG // 512, 1),
                                       ("write", BIG // 512, BIG // 512, 2), ("flush",)]


@pytest.mark.slow
@pytest.mark.parametrize("in_c", [True, False], ids=["in-c", "in-python"])
def test_log_sync_error_fails_the_flush_and_stops_the_backend(tmp_path: Path, shim: Path,
                                                              in_c: bool) -> None:
    def write_and_flush(fe: BlkFrontend) -> None:
        assert fe.write(8, b"\x02" * 4096).status == Status.OK
        fe.flush()          # never OK: the log could not be made durable

    fails_after(tmp_path, shim, "sync", in_c, [write_parts(0, b"\x01" * 4096), flush_parts()],
                write_and_flush, "log sync")
    # The count never moved past the FLUSH that succeeded.
    assert kinds(tmp_path / "log") == [("write", 0, 8, 1), ("flush",)]
