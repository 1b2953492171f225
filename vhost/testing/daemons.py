"""Start and stop vhost-user-blk backends for the front-end to talk to.

Two peers: qemu-storage-daemon's `vhost-user-blk` export (an implementation nobody here wrote,
the reference) and our `logwrites serve` (which prints a `ready` line once it listens). Both
are subprocesses with argv lists; every wait is bounded; stop() kills what start() started.
"""

from __future__ import annotations

import logging
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from logwrites.errors import LogwritesError

log = logging.getLogger(__name__)

START_TIMEOUT_S: Final = 30.0


def default_stop_signals() -> None:
    """In the child, before it runs: SIGINT and SIGHUP as a user's shell leaves them. A test
    run started in the background (`cmd &` ignores SIGINT, nohup SIGHUP) hands both ignored to
    every child, and a program rightly keeps ignoring what it was started ignoring."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


class DaemonError(LogwritesError):
    """A backend did not start, or died."""


class Daemon:
    """A backend subprocess serving `socket_path`; a context manager."""

    name = "backend"

    def __init__(self, argv: list[str], socket_path: Path, stderr_path: Path) -> None:
        self.argv, self.socket_path, self.stderr_path = argv, socket_path, stderr_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}       # added to our environment (e.g. a failpoint)

    def start(self) -> Daemon:
        log.debug("starting %s: %s", self.name, shlex.join(self.argv))
        self._stderr = self.stderr_path.open("ab")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._stderr,
                                     env={**os.environ, **self.env} if self.env else None,
                                     preexec_fn=default_stop_signals)
        try:
            self._wait_ready(time.monotonic() + START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, deadline: float) -> None:
        while not self.socket_path.exists():
            self._check_alive("starting")
            if time.monotonic() > deadline:
                raise DaemonError(f"{self.name} did not create {self.socket_path} in time")
            time.sleep(0.02)

    def _check_alive(self, during: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise DaemonError(f"{self.name} exited with {self.proc.returncode} while {during}; "
                              f"stderr in {self.stderr_path}: {self.stderr_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stderr_tail(self, nbytes: int = 2000) -> str:
        try:
            return self.stderr_path.read_bytes()[-nbytes:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int | None:
        """Signal the process and reap it (SIGKILL after `timeout_s`); its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._stderr.close()
        return self.proc.returncode

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def qsd_path() -> str:
    path = shutil.which("qemu-storage-daemon")
    if path is None:
        raise DaemonError("qemu-storage-daemon is not installed: "
                          "run ./run.sh setup (apt-get install qemu-system-common)")
    return path


class QsdExport(Daemon):
    """qemu-storage-daemon exporting a raw file as vhost-user-blk (the reference backend)."""

    name = "qemu-storage-daemon"

    def __init__(self, image: Path, socket_path: Path, workdir: Path,
                 writable: bool = True, num_queues: int = 1,
                 logical_block_size: int = 512) -> None:
        export = (f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                  f"addr.path={socket_path},writable={'on' if writable else 'off'},"
                  f"num-queues={num_queues},logical-block-size={logical_block_size}")
        argv = [qsd_path(), "--blockdev", f"driver=file,node-name=f,filename={image}",
                "--export", export]
        super().__init__(argv, socket_path, workdir / "qemu-storage-daemon.stderr")


def logwrites_path() -> str:
    """The `logwrites` script of the interpreter's environment (the project's venv)."""
    candidate = Path(sys.executable).parent / "logwrites"
    if candidate.exists():
        return str(candidate)
    path = shutil.which("logwrites")
    if path is None:
        raise DaemonError("logwrites is not installed: run bash scripts/setup.sh")
    return path


class LogwritesServe(Daemon):
    """`logwrites serve IMAGE --socket SOCK --log LOG ...`; ready when it prints `ready`."""

    name = "logwrites serve"

    def __init__(self, image: Path, socket_path: Path, log_path: Path, workdir: Path,
                 extra_args: list[str] | None = None, verbose: bool = False) -> None:
        # -v (INFO: resubmissions, ...) is the CLI's option, before the subcommand.
        argv = [logwrites_path(), *(["-v"] if verbose else []), "serve", str(image),
                "--socket", str(socket_path),
                "--log", str(log_path), *(extra_args or [])]
        super().__init__(argv, socket_path, workdir / "logwrites-serve.stderr")
        self.log_path = log_path
        self.stdout_lines: list[str] = []

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        buffered = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DaemonError(f"{self.name} printed no 'ready' line in "
                                      f"{START_TIMEOUT_S} s: {self.stderr_tail()}")
                if sel.select(remaining):
                    chunk = self.proc.stdout.read() or b""
                    if not chunk:
                        self._check_alive("starting")
                        time.sleep(0.02)
                    buffered += chunk
                    *lines, buffered = buffered.split(b"\n")
                    for line in lines:
                        text = line.decode(errors="replace")
                        self.stdout_lines.append(text)
                        if text.split()[:1] == ["ready"]:
                            return
                self._check_alive("starting")
