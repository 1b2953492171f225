"""`logwrites run`: boot a guest on the backend, run one workload, crash or stop it as asked,
and leave the base image, the log, the console and a summary in an output folder.

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
import subprocess
import time
from pathlib import Path
from typing import Any

from guests.build import default_guest
from logwrites.errors import UsageError

FILESYSTEMS = ("ext4", "xfs", "btrfs", "none")
CRASHES = ("power-cut", "reset", "quit", "shutdown")
SETUP_MARK = "mkfs"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="boot a guest on the backend and run a workload")
    p.add_argument("--workload", type=Path, required=True, help="shell script run in the guest")
    p.add_argument("--fs", choices=FILESYSTEMS, default="none",
                   help="make and mount this filesystem on the disk first (LW_MNT)")
    p.add_argument("--crash", choices=CRASHES, default=None,
                   help="how the run ends (default: shutdown, or power-cut with --crash-at)")
    p.add_argument("--crash-at", metavar="entry:N|mark:M|flush:K|time:S",
                   help="crash at this point of the log (or S seconds into the workload)")
    p.add_argument("--kernel", type=Path, help="your bzImage instead of the distribution kernel")
    p.add_argument("--modules", type=Path, help="its modules directory")
    p.add_argument("--out", type=Path, help="output folder (default: out/run-TIMESTAMP)")
    p.add_argument("--size", type=int, default=512, help="disk size in MiB (default 512)")
    p.add_argument("--backend", choices=("serve", "qemu-storage-daemon"), default="serve")
    p.add_argument("--mode", default="logwrites", help="backend mode (logwrites serve --mode)")
    p.add_argument("--accel", choices=("kvm", "tcg"), help="default: kvm when it works")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="bound on the workload, seconds (default 600)")
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
            float(value)
        except ValueError:
            raise UsageError(f"--crash-at {text}: time needs seconds") from None
    return kind, value


def run(args: argparse.Namespace) -> Any:
    if not args.workload.is_file():
        raise UsageError(f"--workload {args.workload}: no such file")
    crash_at = _parse_crash_at(args.crash_at)
    serve_available = (Path(__file__).parent / "serve.py").is_file()
    if args.backend == "serve" and not serve_available:
        raise UsageError("logwrites serve is not available yet: use "
                         "--backend qemu-storage-daemon")
    if crash_at and crash_at[0] != "time" and args.backend != "serve":
        raise UsageError(f"--crash-at {args.crash_at} needs the logging backend (serve)")
    return _run(args, crash_at)


async def _run(args: argparse.Namespace, crash_at: tuple[str, str] | None) -> int:
    from qmp.backend import ControlClient, ServeBackend, StorageDaemon, backend_trouble
    from qmp.machine import Machine

    out = args.out or Path("out") / time.strftime("run-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    guest = default_guest(args.kernel, args.modules)
    base = out / "base.img"
    with base.open("wb") as f:
        f.truncate(args.size << 20)
    image = out / "disk.img"
    # The base image stays as it was before the run: the log replays onto copies of it.
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(base), str(image)],
                   check=True)
    backend: ServeBackend | StorageDaemon
    if args.backend == "serve":
        # A run again into the same --out starts afresh, as its images do.
        backend = ServeBackend(image, out / "log", out, mode=args.mode, overwrite=True)
    else:
        backend = StorageDaemon(image, out)
    crash = args.crash or ("power-cut" if crash_at else "shutdown")
    fs = None if args.fs == "none" else args.fs
    summary: dict[str, Any] = {"out": str(out), "kernel": guest.kernel_version,
                               "backend": args.backend, "fs": args.fs, "crash": crash,
                               "crash_at": args.crash_at}
    started = time.monotonic()
    async with backend, Machine(guest, out, disk_socket=backend.socket,
                                control_socket=backend.control, accel=args.accel) as machine:
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
            await machine.run(args.workload, fs=fs, setup_mark=setup_mark,
                              timeout_s=args.timeout, wait=False)
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
            await machine.run(args.workload, fs=fs, setup_mark=setup_mark,
                              timeout_s=args.timeout, wait=False)
            with contextlib.suppress(TimeoutError):
                result = await asyncio.wait_for(machine.result(), float(crash_at[1]))
                summary["result"] = _result_summary(result)
            await machine.crash(crash)
        else:
            result = await machine.run(args.workload, fs=fs, setup_mark=setup_mark,
                                       timeout_s=args.timeout)
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
    if args.backend == "serve" and backend.control is not None:
        summary["log"] = str(out / "log")
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
    print("\n".join(lines))
