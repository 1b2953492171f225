"""The vhost-user-blk server a machine's disk lives on, run as a subprocess, and a client of its
control socket.

`ServeBackend` runs `logwrites serve` (our backend: it logs every write) and waits for its
"ready" line; `StorageDaemon` runs qemu-storage-daemon as a stand-in that logs nothing (tests of
the QEMU layer, comparisons). `ControlClient` speaks the backend's control protocol — JSON
lines, one request and one reply each — for marks, status and crash points (`stop-at`), and
`subscribe()` yields its event stream. This module starts processes and speaks a socket
protocol; it knows nothing of the log format.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

from qmp.errors import MachineError

log = logging.getLogger(__name__)

READY_TIMEOUT_S: Final = 60.0


class BackendError(MachineError):
    """The backend did not start, or its control socket said no."""


class _Subprocess:
    """A server subprocess with its output in a file, stopped by SIGTERM (then SIGKILL)."""

    name = "backend"

    def __init__(self, run_dir: Path, socket: Path, control: Path | None) -> None:
        self.run_dir = run_dir
        self.socket = socket
        self.control = control
        self.proc: asyncio.subprocess.Process | None = None
        self.env: dict[str, str] = {}       # added to our environment at each start
        self._log: Any = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    async def _wait_started(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """:raise BackendError: it exited or did not get ready within READY_TIMEOUT_S."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        argv = self.argv()
        log.info("%s: %s", self.name, " ".join(argv))
        self._log = (self.run_dir / f"{self.name}.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=self._log, start_new_session=True,
            env={**os.environ, **self.env} if self.env else None)
        try:
            await asyncio.wait_for(self._wait_started(), READY_TIMEOUT_S)
        except (TimeoutError, BackendError) as err:
            await self.stop()
            tail = (self.run_dir / f"{self.name}.log").read_text(errors="replace").strip()
            last = tail.splitlines()[-1] if tail else "no output"
            raise BackendError(f"{self.name} did not get ready: {err or 'timeout'}; "
                               f"it said: {last}") from err

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (a clean stop: our backend then ends its log), SIGKILL after `timeout_s`."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                log.warning("%s did not stop within %s s: killing it", self.name, timeout_s)
                self.proc.kill()
                await self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    async def __aenter__(self) -> _Subprocess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class ServeBackend(_Subprocess):
    """`logwrites serve IMAGE --socket SOCK --log LOG --control CTRL ...` (DESIGN §8).

    A LOG that holds a log (or other bytes) is refused unless `overwrite` (a new log over it)
    or `resume`. With `resume`, it continues LOG (`--resume`) instead of creating it; `kill()` then
    `restart()` is a backend crash and its restart on the same image, log and sockets, which a
    QEMU whose disk chardev reconnects (Machine's default) follows by itself.
    """

    name = "serve"

    def __init__(self, image: Path, log_path: Path, run_dir: Path, *, mode: str = "logwrites",
                 sector_size: int = 512, num_queues: int = 1, writethrough: bool = False,
                 resume: bool = False, overwrite: bool = False, verbose: bool = False,
                 extra_args: Sequence[str] = ()) -> None:
        super().__init__(run_dir, run_dir / "disk.sock", run_dir / "control.sock")
        self.image, self.log_path, self.mode = image, log_path, mode
        self.sector_size, self.num_queues = sector_size, num_queues
        self.writethrough, self.extra_args = writethrough, tuple(extra_args)
        self.resume = resume
        self.overwrite = overwrite      # a new log over what LOG holds (`--overwrite`)
        self.verbose = verbose          # -v: INFO lines (resubmissions, ...) in serve.log
        self.ready_line = ""
        self._drainer: asyncio.Future[None] | None = None

    async def kill(self) -> int | None:
        """SIGKILL: no volatile tail, no end mark, nothing flushed — a crashed backend."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._drainer is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._drainer, 10)
            self._drainer = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    async def restart(self) -> None:
        """Start again on the same image and log, continuing it (`--resume`).

        :raise BackendError: it did not get ready (see `start`).
        """
        if self.proc is not None and self.proc.returncode is None:
            raise BackendError("restart: the backend still runs (kill or stop it first)")
        self.resume = True
        await self.start()

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "logwrites.cli", *(["-v"] if self.verbose else []),
                "serve", str(self.image),
                "--socket", str(self.socket), "--log", str(self.log_path),
                "--control", str(self.control), "--mode", self.mode,
                "--sector-size", str(self.sector_size), "--num-queues", str(self.num_queues)]
        if self.writethrough:
            argv.append("--writethrough")
        if self.resume:
            argv.append("--resume")
        elif self.overwrite:
            argv.append("--overwrite")
        return argv + list(self.extra_args)

    async def _wait_started(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise BackendError(f"exited with status {await self.proc.wait()}")
            if line.startswith(b"ready"):
                self.ready_line = line.decode(errors="replace").strip()
                # Keep draining stdout so the backend never blocks on a full pipe.
                self._drainer = asyncio.ensure_future(self._drain())
                return

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass


class StorageDaemon(_Subprocess):
    """qemu-storage-daemon exporting a raw image over vhost-user-blk: a stand-in backend with
    no log and no control socket."""

    name = "qemu-storage-daemon"

    def __init__(self, image: Path, run_dir: Path, *, num_queues: int = 1,
                 writable: bool = True) -> None:
        super().__init__(run_dir, run_dir / "disk.sock", None)
        self.image, self.num_queues, self.writable = image, num_queues, writable

    def argv(self) -> list[str]:
        if shutil.which("qemu-storage-daemon") is None:
            raise BackendError("qemu-storage-daemon is not installed: run ./run.sh setup "
                               "(apt-get install qemu-system-x86)")
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={self.image}",
                "--export", f"type=vhost-user-blk,id=export0,node-name=file0,"
                            f"addr.type=unix,addr.path={self.socket},"
                            f"writable={'on' if self.writable else 'off'},"
                            f"num-queues={self.num_queues}"]

    async def _wait_started(self) -> None:
        assert self.proc is not None
        while not self.socket.exists():  # it listens once the socket file exists
            if self.proc.returncode is not None:
                raise BackendError(f"exited with status {self.proc.returncode}")
            await asyncio.sleep(0.05)


async def backend_trouble(control_socket: Path) -> str | None:
    """What went wrong in the backend that the guest could only see as I/O errors: its log
    filled up (every write failed from then on) or an image read or write failed. None when
    nothing did, or the backend cannot say (one that died is reported by what failed first)."""
    try:
        async with ControlClient(control_socket) as control:
            status = await control.status()
    except (MachineError, TimeoutError, OSError, ValueError):
        log.debug("no status from %s", control_socket, exc_info=True)
        return None
    if status.get("log_full"):
        return f"{status['log_full']}: the guest's writes failed from then on"
    if status.get("image_error"):
        return f"{status['image_error']}: the guest got an I/O error"
    return None


class ControlClient:
    """A connection to a backend's control socket: one JSON request line, one reply line."""

    def __init__(self, path: Path, timeout_s: float = 60.0) -> None:
        self.path, self.timeout_s = path, timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> ControlClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path)), self.timeout_s)
        except OSError as err:
            raise BackendError(f"control socket {self.path}: {err.strerror or err}") from err

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None

    async def _line(self) -> dict[str, Any]:
        assert self._reader is not None
        line = await asyncio.wait_for(self._reader.readline(), self.timeout_s)
        if not line:
            raise BackendError(f"control socket {self.path}: closed by the backend")
        return dict(json.loads(line))

    async def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its reply.

        :raise BackendError: the reply says `"ok": false`, or no reply in time.
        """
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        self._writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await self._writer.drain()
        reply = await self._line()
        if not reply.get("ok"):
            raise BackendError(f"backend refused {cmd}: {reply.get('error', reply)}")
        return reply

    async def mark(self, name: str) -> int:
        """Insert a mark; returns its entry index once it is durable in the log."""
        return int((await self.request("mark", name=name))["entry"])

    async def status(self) -> dict[str, Any]:
        return await self.request("status")

    async def stop_at(self, at: str) -> None:
        """Ask the backend to hold every completion past `at` (entry:N, mark:NAME, flush:K)."""
        await self.request("stop-at", at=at)

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        """This connection becomes an event stream: yields each event as it comes."""
        await self.request("subscribe")
        assert self._reader is not None
        while True:
            line = await self._reader.readline()
            if not line:
                return
            yield dict(json.loads(line))
