"""`logwrites run`: boot a guest on the backend, run one workload, crash or stop it as asked,
and leave the base image, the log, the console and a summary in an output folder.

The workload is named as crash-loop names it: a built-in one (guests/workloads/) or a script,
with its arguments. The run's log and base image are a recording crash-loop can check
(`--log OUT/log --base OUT/base.img`); the summary prints that command.

The backend is `logwrites serve` (it logs every write); `--backend qemu-storage-daemon` runs the
same guest on QEMU's own server instead (no log: for comparisons, and for machines without our
backend). Crash points `entry:N`, `mark:M`, `flush:K` ask the backend to hold every completion
past the point (`stop-at`) and cut the machine when it reports the point; `time:S` cuts it S
seconds after the workload starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from guests.build import default_guest
from logwrites.check import TIMEOUT_LIMIT, require_timeout
from logwrites.crashstates import SETUP_MARK
from logwrites.errors import UsageError
from qmp.machinesize import MachineSize, add_machine_arguments

FILESYSTEMS = ("ext4", "xfs", "btrfs", "none")
CRASHES = ("power-cut", "reset", "quit", "shutdown")
MODES = ("logwrites", "immediate", "passthrough")   # = serve --mode
DEFAULT_SIZE = "512M"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="boot a guest on the backend and run a workload",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True,
                   help="a built-in workload name (guests/workloads/) or a script path, with "
                        "arguments if any, e.g. 'txnlog --no-barrier'")
    p.add_argument("--fs", choices=FILESYSTEMS, default="none",
                   help="make and mount this filesystem on the disk first (LW_MNT)")
    p.add_argument("--mkfs-opts", default="",
                   help="options for mkfs.FS, split at whitespace (no quotes: the guest "
                        "passes them on as they are)")
    p.add_argument("--crash", choices=CRASHES, default=None,
                   help="how the run ends (default: shutdown, or power-cut with --crash-at)")
    p.add_argument("--crash-at", metavar="entry:N|mark:M|flush:K|time:S",
                   help="crash at this point of the log (or S seconds into the workload)")
    p.add_argument("--kernel", type=Path, help="your bzImage instead of the distribution kernel")
    p.add_argument("--modules", type=Path, help="its modules directory")
    p.add_argument("--out", type=Path, help="output folder (default: out/run-TIMESTAMP)")
    p.add_argument("--size", default=DEFAULT_SIZE,
                   help="disk size: MiB, or with K, M, G or T (default 512M)")
    p.add_argument("--backend", choices=("serve", "qemu-storage-daemon"), default="serve",
                   help="serve: ours, logging every write (default); qemu-storage-daemon: "
                        "QEMU's own, no log")
    p.add_argument("--mode", choices=MODES, default="logwrites",
                   help="the log's ordering (serve --mode; default logwrites)")
    p.add_argument("--accel", choices=("kvm", "tcg"), help="default: kvm when it works")
    add_machine_arguments(p)
    p.add_argument("--timeout", type=float, default=600.0,
                   help=f"bound on the workload, seconds (default 600; {TIMEOUT_LIMIT})")
    p.set_defaults(run=run)


def _parse_crash_at(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    kind, _, value = text.partition(":")
    if kind not in ("entry", "mark", "flush", "time") or not value:
        raise UsageError(f"--crash-at {text}: expected entry:N, mark:NAME, flush:K or time:S")
    if kind in ("entry", "flush") and not value.isdigit():
        raise UsageError(f"--crash-at {text}: {kind} needs a whole number")
    if kind == "time":
        try:
            seconds = float(value)
        except ValueError:
            raise UsageError(f"--crash-at {text}: time needs seconds") from None
        if not seconds >= 0:    # also NaN
            raise UsageError(f"--crash-at {text}: time needs seconds, 0 or more")
    return kind, value


def parse_disk_size(text: str) -> int:
    """`--size` in bytes: a plain number is MiB (as it always was here), else `parse_size`'s.

    :raise UsageError: not a size, over `MAX_SIZE`, or not a whole number of 4 KiB blocks (the
        disk's sectors, and every filesystem's blocks).
    """
    from logwrites.guestrecord import MAX_SIZE, parse_size, size_text

    size = int(text) << 20 if text.isdigit() else parse_size(text)
    if size > MAX_SIZE:
        raise UsageError(f"--size {text}: must be at most {size_text(MAX_SIZE)}")
    if size <= 0 or size % 4096:
        raise UsageError(f"--size {text}: must be a whole number of 4 KiB blocks, more than 0")
    return size


def run(args: argparse.Namespace) -> Any:
    from logwrites.crashloop_job import refuse_mkfs_opts, resolve_workload
    from logwrites.guestrecord import require_mkfs_room, workload_script

    # Everything is refused before the output folder or a disk is made.
    script, script_args = resolve_workload(args.workload, args.fs)
    size = parse_disk_size(args.size)
    refuse_mkfs_opts(args.mkfs_opts)
    require_mkfs_room(None if args.fs == "none" else args.fs, size, args.mkfs_opts,
                      f"--size {args.size}")
    require_timeout(args.timeout)
    crash_at = _parse_crash_at(args.crash_at)
    if crash_at and crash_at[0] != "time" and args.backend != "serve":
        raise UsageError(f"--crash-at {args.crash_at} needs the logging backend (serve)")
    if args.backend != "serve" and args.mode != "logwrites":
        raise UsageError(f"--mode {args.mode} is serve's: qemu-storage-daemon keeps no log")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    machine_size = MachineSize.from_args(args)
    guest = default_guest(args.kernel, args.modules)
    return _run(args, guest, script, workload_script(script, script_args), size, machine_size,
                crash_at)


async def _run(args: argparse.Namespace, guest: Any, script: Path, workload: str, size: int,
               machine_size: MachineSize, crash_at: tuple[str, str] | None) -> int:
    from qmp.backend import ControlClient, ServeBackend, StorageDaemon, backend_trouble
    from qmp.machine import Machine

    out = args.out or Path("out") / time.strftime("run-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base.img"
    with base.open("wb") as f:
        f.truncate(size)
    image = out / "disk.img"
    # The base image stays as it was before the run: the log replays onto copies of it.
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(base), str(image)],
                   check=True)
    backend: ServeBackend | StorageDaemon
    if args.backend == "serve":
        # A run again into the same --out starts afresh, as its images do.
        backend = ServeBackend(image, out / "log", out, mode=args.mode, overwrite=True,
                               num_queues=machine_size.queues)
    else:
        backend = StorageDaemon(image, out, num_queues=machine_size.queues)
    crash = args.crash or ("power-cut" if crash_at else "shutdown")
    fs = None if args.fs == "none" else args.fs
    summary: dict[str, Any] = {"out": str(out), "kernel": guest.kernel_version,
                               "workload": args.workload, "backend": args.backend,
                               "fs": args.fs, "crash": crash, "crash_at": args.crash_at,
                               "memory_mib": machine_size.memory_mib,
                               "cpus": machine_size.cpus, "queues": machine_size.queues}
    started = time.monotonic()
    async with backend, Machine(guest, out, disk_socket=backend.socket,
                                control_socket=backend.control, accel=args.accel,
                                **machine_size.machine_args()) as machine:
        assert machine.ready is not None
        summary["boot_seconds"] = round(machine.ready.host_seconds, 2)
        summary["accel"] = machine.accel
        setup_mark = SETUP_MARK if fs and backend.control else None
        stopped_event: dict[str, Any] | None = None
        if crash_at and crash_at[0] != "time":
            assert backend.control is not None
            async with ControlClient(backend.control) as control:
                await control.stop_at(f"{crash_at[0]}:{crash_at[1]}")
            watcher = ControlClient(backend.control)
            events = watcher.subscribe()
            stopped = asyncio.ensure_future(_first_stopped(events))
            await machine.run(workload, fs=fs, mkfs_opts=args.mkfs_opts,
                              setup_mark=setup_mark, timeout_s=args.timeout, wait=False)
            job = asyncio.ensure_future(machine.result())
            done, _ = await asyncio.wait({stopped, job}, timeout=args.timeout + 120,
                                         return_when=asyncio.FIRST_COMPLETED)
            if stopped in done:
                stopped_event = stopped.result()
                await machine.stop()  # the backend holds completions; the vCPUs stop too
                job.cancel()
                summary["stopped_at"] = stopped_event
            else:
                stopped.cancel()
                summary["result"] = _result_summary(job.result()) if job in done else None
                summary["note"] = "the crash point was never reached"
            await machine.crash(crash)
            await watcher.close()
        elif crash_at:
            await machine.run(workload, fs=fs, mkfs_opts=args.mkfs_opts, setup_mark=setup_mark,
                              timeout_s=args.timeout, wait=False)
            with contextlib.suppress(TimeoutError):
                result = await asyncio.wait_for(machine.result(), float(crash_at[1]))
                summary["result"] = _result_summary(result)
            await machine.crash(crash)
        else:
            result = await machine.run(workload, fs=fs, mkfs_opts=args.mkfs_opts,
                                       setup_mark=setup_mark, timeout_s=args.timeout)
            assert result is not None
            summary["result"] = _result_summary(result)
            if crash == "shutdown":
                await machine.shutdown()
            else:
                await machine.crash(crash)
        summary["qemu_status"] = machine.returncode
        if isinstance(backend, ServeBackend) and backend.control is not None:
            summary["backend_trouble"] = await backend_trouble(backend.control)
    summary["backend_status"] = await backend.stop()
    summary["seconds"] = round(time.monotonic() - started, 2)
    if args.backend == "serve" and args.mode != "passthrough":
        summary["log"] = str(out / "log")
        summary["check_with"] = crash_loop_command(out, args.fs, script)
    summary_path = out / "summary.json"
    unwritten = None
    try:
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    except OSError as err:  # a full filesystem (the log's too, most likely): say so after all
        unwritten = OSError(err.errno, err.strerror, str(summary_path))
    _print_summary(summary, out)
    if summary.get("backend_trouble"):
        from logwrites.guestrecord import RecordError

        # The guest's I/O failed (a full log or disk): not the run that was asked for.
        raise RecordError(summary["backend_trouble"]
                          + (f" ({summary_path}: {unwritten.strerror})" if unwritten else ""))
    if unwritten is not None:
        raise unwritten
    status = (summary.get("result") or {}).get("status", 0)
    return 1 if status else 0


def crash_loop_command(out: Path, fs: str, script: Path) -> str:
    """The command that checks every crash state of the run's log with the checks crash-loop
    would run for this workload (its base image is the blank disk before mkfs; the states
    start at the mark logged after the set-up)."""
    from logwrites.commands.crash_loop import our_command
    from logwrites.crashloop_job import default_checks

    command = [our_command(), "crash-loop", "--log", str(out / "log"), "--base",
               str(out / "base.img"), "--fs", fs]
    # Given in full: crash-loop cannot tell the workload from a log.
    for check in default_checks(fs, script) or ["host:YOUR-CHECKER {image}"]:
        command += ["--check", check]
    return shlex.join(command)


async def _first_stopped(events: Any) -> dict[str, Any]:
    async for event in events:
        if event.get("event") == "stopped":
            return dict(event)
    return {}


def _result_summary(result: Any) -> dict[str, Any]:
    return {"status": result.status, "phase": result.phase, "timed_out": result.timed_out,
            "seconds": round(result.seconds, 2), "reports": result.reports,
            "stdout_tail": result.stdout[-2000:], "stderr_tail": result.stderr[-2000:]}


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    result = summary.get("result") or {}
    lines = [f"run: {out}",
             f"  guest: kernel {summary['kernel']}, {summary.get('accel')}, "
             f"agent ready after {summary.get('boot_seconds')} s",
             f"  backend: {summary['backend']}, fs {summary['fs']}, "
             f"ended by {summary['crash']}"
             + (f" at {summary['crash_at']}" if summary.get("crash_at") else "")]
    if "stopped_at" in summary:
        lines.append(f"  stopped at entry {summary['stopped_at'].get('entry')}")
    if result:
        lines.append(f"  workload: exit {result['status']} ({result['phase']}) "
                     f"in {result['seconds']} s" + (" TIMED OUT" if result["timed_out"] else ""))
        for key, value in result["reports"].items():
            lines.append(f"  report {key}: {value.strip().replace(chr(10), ' | ')}")
        tail = [ln for ln in result["stdout_tail"].splitlines() if ln.strip()][-5:]
        lines += [f"  | {ln}" for ln in tail]
    elif summary.get("crash_at"):
        lines.append("  workload: cut before it finished")
    files = ", ".join(p.name for p in sorted(out.iterdir()) if p.is_file())
    lines.append(f"  files: {files}")
    if summary.get("note"):
        lines.append(f"  note: {summary['note']}")
    if summary.get("check_with"):
        lines.append(f"  its crash states: {summary['check_with']}")
    print("\n".join(lines))
