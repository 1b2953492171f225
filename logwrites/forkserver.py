"""Run one command line many times without paying exec and library start-up each time.

`ForkServer(argv, env, preload)` starts `argv` with `preload` (the shared object built from
logwrites/_forkserver.c) in LD_PRELOAD; the program stops before main(), and every `run()`
forks a fresh copy of it that runs main() with the same argv and environment. A run's answer
is its exit status and its output, as `subprocess` would give them. The crash loop's checker
uses it for `e2fsck -fn` on a worker's cursor image: ~1.6 ms of the ~4.2 ms each run costs
here is exec and the dynamic linker.

A server that is gone (the preload did not load, the program ran main() at once, a crash)
raises `ForkServerGone`; the caller then runs the command the plain way.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import struct
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

_ANSWER: Final = struct.Struct("=i")
# Built by scripts/setup.sh from logwrites/_forkserver.c.
FORKSERVER_SO: Final = Path(__file__).resolve().with_name("_forkserver.so")


class ForkServerGone(Exception):
    """The server stopped answering; run the command without it."""


class ForkServer:
    """One program, held before main(), forked once per `run()`."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], preload: Path,
                 output: Path) -> None:
        self.argv, self.output = list(argv), output
        requests_r, self._requests = os.pipe()
        self._answers, answers_w = os.pipe()
        self._poll = select.poll()
        self._poll.register(self._answers, select.POLLIN)
        preloads = " ".join(p for p in (str(preload), env.get("LD_PRELOAD", "")) if p)
        child_env = {**os.environ, **env, "LD_PRELOAD": preloads,
                     "LW_FORKSERVER_CTL": f"{requests_r},{answers_w}",
                     "LW_FORKSERVER_OUT": str(output)}
        try:
            proc = subprocess.Popen(
                self.argv, env=child_env, pass_fds=(requests_r, answers_w),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(requests_r)
            os.close(answers_w)
        # A server nobody closed (its worker thread ended) ends when this object goes.
        self._finalizer = weakref.finalize(self, _shut_down, proc, self._requests,
                                           self._answers)

    def run(self, timeout_s: float) -> tuple[int | None, str]:
        """(exit status, output) of one run; status None when it outlived `timeout_s` (its
        process group is killed).

        :raise ForkServerGone: the server did not fork a child (the caller runs plainly).
        """
        if not self._finalizer.alive:
            raise ForkServerGone("closed")
        try:
            os.write(self._requests, b"r")
        except OSError as err:
            raise ForkServerGone(f"request: {err}") from None
        deadline = time.monotonic() + timeout_s
        pid = self._answer(deadline + 5.0)
        if pid is None or pid <= 0:
            raise ForkServerGone("no child forked")
        status_raw = self._answer(deadline)
        timed_out = status_raw is None
        if timed_out:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            status_raw = self._answer(time.monotonic() + 10.0)
            if status_raw is None:
                raise ForkServerGone(f"child {pid} did not end after SIGKILL")
        if status_raw == -1:
            raise ForkServerGone(f"child {pid}: lost its exit status")
        try:
            text = self.output.read_bytes().decode(errors="replace")
            self.output.unlink()
        except OSError:
            text = ""
        if timed_out:
            return None, text
        return os.waitstatus_to_exitcode(status_raw), text

    def _answer(self, deadline: float) -> int | None:
        """The server's next int32, None at the deadline; ForkServerGone at EOF."""
        data = b""
        while len(data) < _ANSWER.size:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # poll, not select: a worker's descriptors may lie past select's limit.
            if not self._poll.poll(left * 1000):
                return None
            chunk = os.read(self._answers, _ANSWER.size - len(data))
            if not chunk:
                self.close()
                raise ForkServerGone("the server ended")
            data += chunk
        return _ANSWER.unpack(data)[0]

    def close(self) -> None:
        self._finalizer()


def _shut_down(proc: subprocess.Popen[bytes], *fds: int) -> None:
    """EOF on its requests ends the server; reap it."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
