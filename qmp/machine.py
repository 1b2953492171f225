"""One QEMU machine driven over QMP: start it, talk to the guest agent, crash it.

`Machine` starts QEMU with memfd-backed shareable guest memory (vhost-user needs it), the
vhost-user-blk-pci disk on a backend's socket, further plain virtio-blk disks, the serial console
captured to a file, and two virtio-serial ports: `org.logwrites.agent` (jobs and results, to a
socket this class listens on) and `org.logwrites.control` (connected straight to the backend's
control socket, so that the guest's `lw-mark` speaks the backend's protocol itself). It knows
nothing of the log format: it gets socket paths. Every wait is bounded; a guest kernel panic
ends any wait with `KernelPanic`, an agent that cannot work with `AgentError`, both carrying the
console tail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

from qemu.qmp import QMPClient

from qmp.errors import AgentError, KernelPanic, MachineError

log = logging.getLogger(__name__)

QEMU: Final = "qemu-system-x86_64"
QBOOT: Final = "/usr/share/qemu/qboot.rom"
AGENT_PORT: Final = "org.logwrites.agent"
CONTROL_PORT: Final = "org.logwrites.control"
MARKER: Final = "@@LW@@ "
PANIC_TEXT: Final = "Kernel panic"
FATAL_TEXT: Final = "lw-agent: FATAL:"
CONSOLE_TAIL_BYTES: Final = 4096

# Fixed PCI slots so the guest names disks in a stable order: the disk under test is vda.
_SLOT_SERIAL, _SLOT_VHOST_DISK, _SLOT_FIRST_PLAIN = 3, 4, 5


class GuestImage(Protocol):
    """What a machine needs of a guest (guests.build.Guest has it)."""

    kernel: Path
    initrd: Path
    cmdline: str


# ---- acceleration ----------------------------------------------------------------------------

def _cpu_has_virtualization() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and (" vmx" in line or " svm" in line)
               for line in flags.splitlines())


def _probe_firmware() -> bytes:
    """A 64 KiB BIOS whose reset vector writes 1 to isa-debug-exit (port 0xf4) and halts:
    QEMU then exits with status 3 — proof that guest code ran."""
    code = bytes([0xB0, 0x01, 0xE6, 0xF4, 0xF4])  # mov al,1; out 0xf4,al; hlt
    image = bytearray(b"\xF4" * 0x10000)
    image[0xFFF0:0xFFF0 + len(code)] = code  # the CPU starts at 0xFFFF0 in real mode
    return bytes(image)


def accel_works(accel: str, timeout_s: float = 10.0) -> bool:
    """Whether QEMU runs guest code under `accel` ("kvm", "tcg"), proved by a tiny BIOS that
    exits QEMU through isa-debug-exit; bounded by `timeout_s`."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as bios:
        bios.write(_probe_firmware())
        bios.flush()
        argv = [QEMU, "-machine", f"pc,accel={accel}", "-nodefaults", "-display", "none",
                "-bios", bios.name, "-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-m", "16"]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
        except (subprocess.TimeoutExpired, OSError) as err:
            log.info("accel probe %s failed: %s", accel, err)
            return False
    return proc.returncode == 3


@functools.cache
def kvm_usable() -> bool:
    """KVM proved to work: the CPU shows vmx/svm AND a bounded probe ran guest code under it.

    On machines where /dev/kvm opens but guests hang (no vmx/svm flag) this returns False at
    once, without touching /dev/kvm.
    """
    if not _cpu_has_virtualization() or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    return accel_works("kvm")


def choose_accel(requested: str | None) -> str:
    return requested or ("kvm" if kvm_usable() else "tcg")


# ---- the agent's results -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AgentReady:
    """The agent's "ready": `host_seconds` from QEMU's start, `uptime` the guest's clock."""

    host_seconds: float
    uptime: float
    kernel: str
    disks: tuple[dict[str, Any], ...]
    control: bool
    boot_id: str  # new at every boot: tells a reboot from a guest that stayed up
    init_uptime: float = 0.0     # guest clock when /init started: the kernel's own boot
    modules_uptime: float = 0.0  # guest clock when the boot modules were loaded

    def breakdown(self) -> str:
        """Where the boot's time went, for humans: firmware and loading (host clock before the
        guest's), the kernel up to /init, module loading, the agent's own start."""
        before = max(0.0, self.host_seconds - self.uptime)
        modules = max(0.0, self.modules_uptime - self.init_uptime)
        agent = max(0.0, self.uptime - max(self.modules_uptime, self.init_uptime))
        return (f"QEMU and firmware {before:.2f} s, kernel to /init {self.init_uptime:.2f} s, "
                f"modules {modules:.2f} s, agent {agent:.2f} s")


@dataclass(slots=True)
class AgentResult:
    """What one job gave: exit `status` (of mkfs/mount in phase "setup", else of the script;
    137 when the timeout killed it), the tails of its output, and the values of lw-report."""

    status: int
    phase: str
    stdout: str
    stderr: str
    stdout_bytes: int
    stderr_bytes: int
    reports: dict[str, str] = field(default_factory=dict)
    setup: str = ""  # what mkfs and the setup mark said
    seconds: float = 0.0
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 0


@dataclass(frozen=True, slots=True)
class PlainDisk:
    """A disk QEMU serves itself (virtio-blk-pci), e.g. for the kernel's own dm-log-writes."""

    path: Path
    format: str = "raw"
    cache: str = "writeback"


class _AgentChannel:
    """The host end of org.logwrites.agent: QEMU connects to our socket; lines of events in,
    command lines out."""

    def __init__(self, path: Path, transcript: Path) -> None:
        self.path = path
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._transcript_path = transcript
        self._transcript: Any = None

    async def listen(self) -> None:
        self._transcript = self._transcript_path.open("ab")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path),
                                                       limit=1 << 22)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A restored machine is a new QEMU that connects anew: the newest connection wins.
        self._writer = writer
        self._connected.set()
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, ValueError) as err:
                log.debug("agent channel: %s", err)
                break
            if not line:
                break
            self._transcript.write(line)
            self._transcript.flush()
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if not text.startswith(MARKER):
                continue
            try:
                self.events.put_nowait(json.loads(text[len(MARKER):]))
            except json.JSONDecodeError:
                log.warning("agent channel: unreadable event %r", text)
        if self._writer is writer:
            self._writer = None
            self._connected.clear()

    async def send(self, *lines: str) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), 30)
        except TimeoutError:
            raise MachineError("the guest agent channel is not connected") from None
        assert self._writer is not None
        self._writer.write("".join(line + "\n" for line in lines).encode())
        await self._writer.drain()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
        if self._transcript is not None:
            self._transcript.close()
            self._transcript = None


def _b64_chunks(data: bytes, size: int = 1024) -> list[str]:
    text = base64.b64encode(data).decode()
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def _decode(event: dict[str, Any]) -> str:
    return base64.b64decode(event.get("b64", "")).decode("utf-8", "replace")


# ---- the machine -------------------------------------------------------------------------------

class Machine:
    """One QEMU guest. Use `async with Machine(...) as m:` (start, wait for "agent ready",
    always tear down), or call `start()` and `close()`.

    Files in `run_dir`: `console.log` (serial console), `agent.log` (the agent channel's
    transcript), `qemu.log` (QEMU's stderr), `qemu-cmdline.sh` (the reproducer).

    :param disk_socket: the backend's vhost-user-blk socket (the guest's /dev/vda), or None.
    :param control_socket: the backend's control socket, for in-guest marks, or None.
    :param disks: plain disks served by QEMU, after the vhost-user disk (vdb, vdc, ...).
    :param incoming: a state file saved by `save_state` to restore instead of booting.
    :param disk_reconnect_s: how often QEMU retries the backend's socket when it is gone.
    """

    def __init__(self, guest: GuestImage, run_dir: Path, *, disk_socket: Path | None = None,
                 control_socket: Path | None = None, disks: Sequence[PlainDisk] = (),
                 num_queues: int = 1, memory_mb: int = 1024, cpus: int = 1,
                 accel: str | None = None, name: str = "guest",
                 boot_timeout_s: float = 180.0, extra_cmdline: str = "",
                 incoming: Path | None = None, qemu: str = QEMU,
                 disk_reconnect_s: int = 1) -> None:
        self.guest = guest
        self.disk_reconnect_s = disk_reconnect_s
        self.run_dir = run_dir
        self.disk_socket = disk_socket
        self.control_socket = control_socket
        self.disks = tuple(disks)
        self.num_queues = num_queues
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.accel = choose_accel(accel)
        self.name = name
        self.boot_timeout_s = boot_timeout_s
        self.extra_cmdline = extra_cmdline
        self.incoming = incoming
        self.qemu = qemu
        self.console_path = run_dir / "console.log"
        self.ready: AgentReady | None = None
        # Unix socket paths are limited to 107 bytes: keep ours short, outside run_dir.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="lw-m-"))
        self.qmp_socket = self._sock_dir / "qmp.sock"
        self.agent = _AgentChannel(self._sock_dir / "agent.sock", run_dir / "agent.log")
        self.qmp: QMPClient | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._qemu_log: Any = None
        self._started_at = 0.0
        self._expect_exit = False
        self._reboot_action_reset = False
        self._failure: asyncio.Future[MachineError] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._console_offset = 0
        self._console_tail = b""

    # -- command line, one concern per function ----------------------------------------------

    def argv(self) -> list[str]:
        return [self.qemu, "-name", self.name, "-nodefaults", "-display", "none",
                *self._accel_args(), *self._memory_args(), *self._kernel_args(),
                *self._console_args(), *self._qmp_args(), *self._channel_args(),
                *self._disk_args(), *self._action_args(), *self._incoming_args()]

    def _accel_args(self) -> list[str]:
        cpu = ["-cpu", "host"] if self.accel == "kvm" else []
        return ["-accel", self.accel, *cpu, "-smp", str(self.cpus)]

    def _memory_args(self) -> list[str]:
        # vhost-user maps guest memory in the backend: it must be a shareable fd (memfd).
        return ["-m", f"{self.memory_mb}M",
                "-object", f"memory-backend-memfd,id=mem,size={self.memory_mb}M,share=on",
                "-machine", "q35,memory-backend=mem"]

    def _kernel_args(self) -> list[str]:
        cmdline = f"{self.guest.cmdline} {self.extra_cmdline}".strip()
        args = ["-kernel", str(self.guest.kernel), "-initrd", str(self.guest.initrd),
                "-append", cmdline]
        # A kernel booted directly (PVH) needs no BIOS services: qboot gets it there 0.3-0.5 s
        # sooner than SeaBIOS under TCG.
        if getattr(self.guest, "direct_boot", False) and Path(QBOOT).is_file():
            args += ["-bios", QBOOT]
        return args

    def _console_args(self) -> list[str]:
        return ["-chardev", f"file,id=console,path={self.console_path}",
                "-serial", "chardev:console"]

    def _qmp_args(self) -> list[str]:
        return ["-chardev", f"socket,id=qmp,path={self.qmp_socket}",
                "-mon", "chardev=qmp,mode=control"]

    def _channel_args(self) -> list[str]:
        args = ["-device", f"virtio-serial-pci,id=vser,addr={_SLOT_SERIAL:#x}",
                "-chardev", f"socket,id=agent,path={self.agent.path}",
                "-device", f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT}"]
        if self.control_socket is not None:
            # reconnect: a backend restarting (or not yet listening) must not stop QEMU.
            args += ["-chardev", f"socket,id=control,path={self.control_socket},reconnect=1",
                     "-device", f"virtserialport,bus=vser.0,chardev=control,name={CONTROL_PORT}"]
        return args

    def _disk_args(self) -> list[str]:
        args: list[str] = []
        if self.disk_socket is not None:
            # reconnect: QEMU follows a backend that restarts (a killed one restarted with
            # --resume), keeping the disk's in-flight region; 0 would end QEMU's disk with it.
            args += ["-chardev", f"socket,id=disk0,path={self.disk_socket},"
                                 f"reconnect={self.disk_reconnect_s}",
                     "-device", f"vhost-user-blk-pci,id=vdisk0,chardev=disk0,"
                                f"num-queues={self.num_queues},addr={_SLOT_VHOST_DISK:#x}"]
        for i, disk in enumerate(self.disks, start=1):
            args += ["-drive", f"if=none,id=drive{i},file={disk.path},format={disk.format},"
                               f"cache={disk.cache}",
                     "-device", f"virtio-blk-pci,drive=drive{i},serial=lw-disk{i},"
                                f"addr={_SLOT_FIRST_PLAIN + i - 1:#x}"]
        return args

    def _action_args(self) -> list[str]:
        # The kernel runs with panic=-1 (reboot at once on panic); a guest reboot ends QEMU
        # (like -no-reboot) so that a panic never loops. reset() switches it for its reset.
        return ["-action", "reboot=shutdown"]

    def _incoming_args(self) -> list[str]:
        return ["-incoming", "defer"] if self.incoming is not None else []

    # -- life cycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Machine:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def start(self, wait_ready: bool = True) -> None:
        """Start QEMU, accept its QMP connection and (unless `wait_ready` is False) wait for the
        agent's "ready" (or, with `incoming`, restore the saved state and resume).

        :raise MachineError: QEMU did not start or the guest did not come up in time.
        :raise KernelPanic: the guest kernel panicked on the way.
        """
        if shutil.which(self.qemu) is None:
            raise MachineError(f"{self.qemu} is not installed: run ./run.sh setup "
                               "(apt-get install qemu-system-x86)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console_path.write_bytes(b"")
        self._failure = asyncio.get_running_loop().create_future()
        await self.agent.listen()
        self.qmp = QMPClient(self.name)
        await self.qmp.start_server(str(self.qmp_socket))  # QEMU connects to us: no polling
        argv = self.argv()
        reproducer = shlex.join(argv)
        log.info("%s: %s", self.name, reproducer)
        (self.run_dir / "qemu-cmdline.sh").write_text(f"#!/bin/sh\n{reproducer}\n")
        self._qemu_log = (self.run_dir / "qemu.log").open("ab")
        self._started_at = time.monotonic()
        self._proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=self._qemu_log,
            stderr=self._qemu_log, start_new_session=True)
        self._spawn(self._watch_process())
        self._spawn(self._watch_console())
        try:
            await self._bounded(self.qmp.accept(), 30, "QEMU's QMP connection")
        except MachineError as err:
            raise MachineError(f"QEMU did not start: {err}; {self._qemu_log_tail()}") from err
        if self.incoming is not None:
            await self._restore(self.incoming)
        elif wait_ready:
            await self.wait_ready()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_ready(self, timeout_s: float | None = None) -> AgentReady:
        """Wait for the agent's "ready" (after boot or after a guest reboot).

        :raise MachineError: none came within the bound; the message names the likely cause.
        """
        timeout_s = timeout_s or self.boot_timeout_s
        self._started_at = time.monotonic() if self.ready is not None else self._started_at
        event = await self._next_event({"ready"}, timeout_s, "the guest agent's 'ready'",
                                       hint="a kernel that cannot run /init, or a kernel "
                                            "without CONFIG_VIRTIO_CONSOLE/VIRTIO_PCI, "
                                            "never reports ready")
        self.ready = AgentReady(host_seconds=time.monotonic() - self._started_at,
                                uptime=float(event.get("uptime", 0.0)),
                                kernel=str(event.get("kernel", "")),
                                disks=tuple(event.get("disks", ())),
                                control=bool(event.get("control", False)),
                                boot_id=str(event.get("boot_id", "")),
                                init_uptime=float(event.get("init", 0.0)),
                                modules_uptime=float(event.get("modules", 0.0)))
        if self._reboot_action_reset:
            await self._need_qmp().execute("set-action", {"reboot": "shutdown"})
            self._reboot_action_reset = False
        log.info("%s: agent ready after %.2f s (guest uptime %.2f s: %s)", self.name,
                 self.ready.host_seconds, self.ready.uptime, self.ready.breakdown())
        return self.ready

    async def run(self, script: str | bytes | Path, *, fs: str | None = None,
                  mkfs: bool = True, mkfs_opts: str = "", mount_opts: str = "",
                  dev: str | None = None, setup_mark: str | None = None,
                  timeout_s: float = 600.0, env: Mapping[str, str] | None = None,
                  wait: bool = True) -> AgentResult | None:
        """Run a workload or checker script in the guest and return its result.

        The script runs with `LW_DEV` = `dev` (default /dev/vda when the machine has a disk);
        with `fs`, the agent first makes (unless `mkfs` is False) and mounts that filesystem
        and sets `LW_MNT`; with `setup_mark`, it logs
        that mark after the set-up (it needs the control socket). `timeout_s` bounds the
        script inside the guest; the host waits a little longer. With `wait` False, returns
        None at once: the caller crashes the machine or calls `result()` later.

        :raise AgentError: the agent could not run the job (no such disk, ...).
        :raise KernelPanic: the guest kernel panicked.
        :raise MachineError: no result within the bound, or QEMU went away.
        """
        body = script.read_bytes() if isinstance(script, Path) else (
            script.encode() if isinstance(script, str) else script)
        if dev is None:
            dev = "/dev/vda" if self.disk_socket is not None or self.disks else ""
        settings = {"LW_DEV": dev, "LW_FS": fs or "", "LW_MKFS": "1" if mkfs else "0",
                    "LW_MKFS_OPTS": mkfs_opts, "LW_MOUNT_OPTS": mount_opts,
                    "LW_TIMEOUT": str(max(1, int(timeout_s))),
                    "LW_SETUP_MARK": setup_mark or "", **(env or {})}
        env_file = "".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items())
        lines = [f"env {c}" for c in _b64_chunks(env_file.encode())]
        lines += [f"script {c}" for c in _b64_chunks(body)]
        self._job_timeout = timeout_s
        self._need_qmp()
        await self._bounded(self.agent.send(*lines, "run"), 30, "sending the job to the agent")
        if not wait:
            return None
        return await self.result()

    async def result(self, timeout_s: float | None = None) -> AgentResult:
        """The result of the job started with `run(..., wait=False)`."""
        bound = timeout_s or getattr(self, "_job_timeout", 600.0) + 60.0
        started = time.monotonic()
        outputs: dict[str, dict[str, Any]] = {}
        reports: dict[str, str] = {}
        while True:
            remaining = bound - (time.monotonic() - started)
            event = await self._next_event({"output", "report", "done", "error"}, remaining,
                                           "the job's result")
            kind = event["event"]
            if kind == "error":
                raise AgentError(f"guest agent: {_decode(event)}", self.console_tail())
            if kind == "output":
                outputs[event["stream"]] = event
            elif kind == "report":
                reports[str(event["key"])] = _decode(event)
            else:
                status = int(event["status"])
                seconds = float(event.get("ended", 0)) - float(event.get("started", 0))
                out, err = outputs.get("stdout", {}), outputs.get("stderr", {})
                return AgentResult(status=status, phase=str(event.get("phase", "")),
                                   stdout=_decode(out), stderr=_decode(err),
                                   stdout_bytes=int(out.get("bytes", 0)),
                                   stderr_bytes=int(err.get("bytes", 0)), reports=reports,
                                   setup=_decode(outputs.get("setup", {})),
                                   seconds=seconds, timed_out=status == 137)

    async def ping(self, timeout_s: float = 30.0) -> float:
        """The guest's uptime, asked of the agent: proves the guest runs and listens."""
        self._need_qmp()
        await self.agent.send("ping")
        event = await self._next_event({"pong"}, timeout_s, "the agent's pong")
        return float(event.get("uptime", 0.0))

    # -- crashes and stops -----------------------------------------------------------------------

    async def power_cut(self) -> None:
        """SIGKILL QEMU: no warning, nothing more reaches the disk."""
        self._expect_exit = True
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGKILL)
            await self._proc.wait()
        log.info("%s: power cut", self.name)
        await self._disconnect_qmp()

    async def reset(self, wait_ready: bool = True) -> AgentReady | None:
        """`system_reset`: the guest reboots at once on the same disks, as after a crash; wait
        for its agent to come up again (unless `wait_ready` is False)."""
        qmp = self._need_qmp()
        with qmp.listener("RESET") as reset_events:
            # Host resets obey the reboot action too: let this one through. SeaBIOS answers a
            # warm start with a hard reset of its own, so the action stays "reset" until the
            # agent is up again (wait_ready restores it).
            await qmp.execute("set-action", {"reboot": "reset"})
            self._reboot_action_reset = True
            await qmp.execute("system_reset")
            await self._bounded(reset_events.get(), 30, "the RESET event")
        log.info("%s: reset", self.name)
        self._drain_events()
        return await self.wait_ready() if wait_ready else None

    async def quit(self) -> None:
        """QMP `quit`: QEMU exits cleanly (devices are shut down in order; the guest is not
        asked — use `shutdown()` for a guest power-off)."""
        self._expect_exit = True
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await self._need_qmp().execute("quit")
        await self._wait_exit(30)

    async def shutdown(self, timeout_s: float = 60.0) -> None:
        """Ask the agent to sync and power the guest off; wait for QEMU to exit."""
        self._expect_exit = True
        await self.agent.send("poweroff")
        await self._wait_exit(timeout_s)

    async def stop(self) -> None:
        """Pause the vCPUs (QMP `stop`), waiting for the STOP event."""
        qmp = self._need_qmp()
        with qmp.listener("STOP") as stopped:
            await qmp.execute("stop")
            await self._bounded(stopped.get(), 30, "the STOP event")

    async def cont(self) -> None:
        """Resume the vCPUs (QMP `cont`)."""
        qmp = self._need_qmp()
        with qmp.listener("RESUME") as resumed:
            await qmp.execute("cont")
            await self._bounded(resumed.get(), 30, "the RESUME event")

    async def crash(self, kind: str) -> None:
        """One of "power-cut", "reset" (without waiting for the reboot), "quit"."""
        if kind == "power-cut":
            await self.power_cut()
        elif kind == "reset":
            await self.reset(wait_ready=False)
        elif kind == "quit":
            await self.quit()
        else:
            raise MachineError(f"unknown crash kind {kind!r} (power-cut, reset, quit)")

    # -- whole-VM state ------------------------------------------------------------------------

    async def save_state(self, path: Path,
                         checkpoint: Callable[[], Any] | None = None,
                         timeout_s: float = 300.0) -> None:
        """Pause the guest and save its whole machine state (RAM, devices) to `path`, calling
        `checkpoint` (sync or async) while paused, after the state is saved — the moment the
        backend's image and log position belong to this state. The guest stays paused: `cont()`
        it or `power_cut()` it.

        :raise MachineError: QEMU refused (a device may block migration) or it failed.
        """
        qmp = self._need_qmp()
        await self.stop()
        await qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}]})
        dest = f"exec:cat > {shlex.quote(str(path))}"
        try:
            await qmp.execute("migrate", {"uri": dest})
        except Exception as err:  # qemu.qmp's ExecuteError: QEMU said why
            raise MachineError(f"saving the machine state: {err}") from err
        await self._bounded(self._migration_done(qmp), timeout_s, "saving the machine state")
        if checkpoint is not None:
            result = checkpoint()
            if asyncio.iscoroutine(result):
                await result
        log.info("%s: state saved to %s", self.name, path)

    async def _migration_done(self, qmp: QMPClient) -> None:
        while True:
            info = await qmp.execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise MachineError(f"migration {status}: {info.get('error-desc', '')}")
            await asyncio.sleep(0.1)

    async def _restore(self, path: Path, timeout_s: float = 300.0) -> None:
        qmp = self._need_qmp()
        await qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}]})
        await qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(path))}"})
        await self._bounded(self._migration_done(qmp), timeout_s, "restoring the machine state")
        await self.cont()
        log.info("%s: restored from %s", self.name, path)

    # -- teardown --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Kill QEMU if it still runs, stop our tasks, remove our sockets. Idempotent."""
        self._expect_exit = True
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 30)
        await self._disconnect_qmp()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.agent.close()
        if self._qemu_log is not None:
            self._qemu_log.close()
            self._qemu_log = None
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def pid(self) -> int | None:
        """QEMU's process id, while it runs (a benchmark reads its CPU time and placement)."""
        return None if self._proc is None or self._proc.returncode is not None else self._proc.pid

    # -- internals -------------------------------------------------------------------------------

    def _need_qmp(self) -> QMPClient:
        if self.qmp is None or self._proc is None or self._proc.returncode is not None:
            raise MachineError(f"{self.name}: QEMU is not running")
        return self.qmp

    async def _disconnect_qmp(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):  # EOF: we caused it
                await self.qmp.disconnect()

    async def _wait_exit(self, timeout_s: float) -> None:
        assert self._proc is not None
        try:
            await asyncio.wait_for(self._proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("%s: QEMU did not exit within %s s: killing it", self.name, timeout_s)
            self._proc.send_signal(signal.SIGKILL)
            await self._proc.wait()
        await self._disconnect_qmp()
        self._read_console()
        if PANIC_TEXT in self._console_tail.decode("utf-8", "replace"):
            raise KernelPanic(self.console_tail())

    def _drain_events(self) -> None:
        while not self.agent.events.empty():
            self.agent.events.get_nowait()

    async def _next_event(self, kinds: set[str], timeout_s: float, what: str,
                          hint: str = "") -> dict[str, Any]:
        async def wanted() -> dict[str, Any]:
            while True:
                event = await self.agent.events.get()
                if event.get("event") in kinds:
                    return event
                if event.get("event") == "fatal":
                    raise AgentError(f"guest agent: {_decode(event)}", self.console_tail())
                log.debug("%s: agent event %s while waiting for %s", self.name, event, what)
        return await self._bounded(wanted(), timeout_s, what, hint)

    async def _bounded(self, aw: Any, timeout_s: float, what: str, hint: str = "") -> Any:
        """Await `aw` for at most `timeout_s`, unless the machine fails first (panic, QEMU
        exit, agent fatal): then raise that failure instead."""
        task = asyncio.ensure_future(aw)
        waiters: set[asyncio.Future[Any]] = {task}
        if self._failure is not None:
            waiters.add(self._failure)
        done, _ = await asyncio.wait(waiters, timeout=max(0.0, timeout_s),
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if self._failure is not None and self._failure.done():
            raise self._failure.result()
        self._read_console()
        why = f" ({hint})" if hint else ""
        raise MachineError(f"{self.name}: no {what} within {timeout_s:.0f} s{why}; "
                           f"console: {self._last_console_line()}", self.console_tail())

    def _fail(self, error: MachineError) -> None:
        if self._failure is not None and not self._failure.done():
            log.error("%s: %s", self.name, error)
            self._failure.set_result(error)

    async def _watch_process(self) -> None:
        assert self._proc is not None
        status = await self._proc.wait()
        if self._expect_exit:
            return
        self._read_console()
        console = self._console_tail.decode("utf-8", "replace")
        if PANIC_TEXT in console:
            self._fail(KernelPanic(self.console_tail()))
        elif FATAL_TEXT in console:
            self._fail(AgentError(self._fatal_line(console), self.console_tail()))
        else:
            self._fail(MachineError(f"{self.name}: QEMU exited with status {status}; "
                                    f"{self._qemu_log_tail()}; console: "
                                    f"{self._last_console_line()}", self.console_tail()))

    async def _watch_console(self) -> None:
        # A panicking kernel with panic=-1 reboots and QEMU exits at once; the console is
        # watched too so that a panic with another panic action still ends waits promptly.
        while True:
            await asyncio.sleep(0.25)
            self._read_console()
            console = self._console_tail.decode("utf-8", "replace")
            if PANIC_TEXT in console and not self._expect_exit:
                await asyncio.sleep(0.5)  # let the panic's backtrace reach the file
                self._read_console()
                self._fail(KernelPanic(self.console_tail()))
                return
            if FATAL_TEXT in console and not self._expect_exit:
                self._fail(AgentError(self._fatal_line(console), self.console_tail()))
                return

    def _read_console(self) -> None:
        try:
            with self.console_path.open("rb") as f:
                f.seek(self._console_offset)
                data = f.read()
        except OSError:
            return
        self._console_offset += len(data)
        self._console_tail = (self._console_tail + data)[-4 * CONSOLE_TAIL_BYTES:]

    def console_tail(self, nbytes: int = CONSOLE_TAIL_BYTES) -> str:
        self._read_console()
        return self._console_tail[-nbytes:].decode("utf-8", "replace")

    def _last_console_line(self) -> str:
        lines = [ln.strip() for ln in self.console_tail().splitlines() if ln.strip()]
        return lines[-1] if lines else "(empty)"

    @staticmethod
    def _fatal_line(console: str) -> str:
        line = next(ln for ln in console.splitlines() if FATAL_TEXT in ln)
        return "guest agent: " + line[line.index(FATAL_TEXT) + len(FATAL_TEXT):].strip()

    def _qemu_log_tail(self) -> str:
        try:
            text = (self.run_dir / "qemu.log").read_text(errors="replace").strip()
        except OSError:
            return "no QEMU output"
        return "QEMU said: " + (text.splitlines()[-1] if text else "nothing")
