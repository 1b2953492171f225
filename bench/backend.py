"""Backend speed: the same guest and fio jobs against four disks, in one run.

Contenders: `logwrites serve --mode passthrough`, `logwrites serve` (logwrites mode),
qemu-storage-daemon's vhost-user-blk export of the same image, and QEMU's own virtio-blk over
the blklogwrites driver. Every guest first sets its cache to write back (qemu-storage-daemon
starts with wce=0), then runs each fio job on the raw disk (O_DIRECT, libaio): 4 KiB random
write at depth 1 and 32, 4 KiB random read at depth 32, 1 MiB sequential write at depth 4,
4 KiB random write with an fsync after each. Prints IOPS per job, ratios to
qemu-storage-daemon and to blklogwrites, the backend process's CPU time per request
(utime+stime from /proc, over fio's request count; blklogwrites runs inside QEMU, so it has
none of its own), its wake-ups per request (voluntary + involuntary context switches from
/proc/PID/status) and its peak memory. Under TCG the guest is often the bottleneck: CPU per
request is the figure that shows the backend's own cost. Contenders run back to back in each
of `--rounds` rounds; each figure is the best of the rounds (the machine's cores are shared,
so the worst round measures the neighbours). Ends with one verdict line per goal of issue 7.
No asserts.

    .venv/bin/python bench/backend.py [--runtime 5] [--size-mib 256] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from guests.build import default_guest
from qmp.backend import ServeBackend, StorageDaemon
from qmp.machine import Machine, PlainDisk

JOBS = {  # name: fio options
    "randwrite-4k-qd1": "--rw=randwrite --bs=4k --iodepth=1",
    "randwrite-4k-qd32": "--rw=randwrite --bs=4k --iodepth=32",
    "randread-4k-qd32": "--rw=randread --bs=4k --iodepth=32",
    "seqwrite-1m-qd4": "--rw=write --bs=1m --iodepth=4",
    "randwrite-4k-fsync": "--rw=randwrite --bs=4k --iodepth=1 --fsync=1",
}
CONTENDERS = ("passthrough", "logwrites", "qemu-storage-daemon", "blklogwrites")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wakeups(pid: int | None) -> int:
    """Voluntary + involuntary context switches of every thread of `pid` so far."""
    if pid is None:
        return 0
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def memory_kib(pid: int | None) -> dict[str, int]:
    """Peak resident set (VmHWM) and private anonymous memory (RssAnon) of `pid`, in KiB.

    A vhost-user backend maps the guest's RAM (a shared memfd): pages it touches count in its
    VmRSS/VmHWM although they are the guest's memory. RssAnon is what the backend allocates.
    """
    if pid is None:
        return {}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmHWM", "RssAnon", "RssShmem"):
            out[key] = int(line.split()[1])
    return out


def fio_script(options: str, runtime: int, size_mib: int) -> str:
    # --end_fsync: each job ends with a FLUSH, so a job that sends none (the O_DIRECT write
    # jobs) pays for logging its own parked writes instead of handing them to the next job.
    return (f"echo 'write back' > /sys/block/vda/cache_type\n"
            f"fio --name=j --filename=$LW_DEV --direct=1 --ioengine=libaio {options} "
            f"--size={size_mib}M --runtime={runtime} --time_based --ramp_time=1 --end_fsync=1 "
            f"--output-format=json > /tmp/fio.json 2>/tmp/fio.err "
            f"|| {{ cat /tmp/fio.err >&2; exit 1; }}\n"
            f"lw-report fio \"$(cat /tmp/fio.json)\"\n")


def fio_figures(report: str) -> tuple[float, int, int]:
    """(IOPS, requests including flushes, bytes written) of a fio JSON report."""
    job = json.loads(report[report.index("{"):])["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"]
    requests = job["read"]["total_ios"] + job["write"]["total_ios"]
    requests += job.get("sync", {}).get("total_ios", 0)
    return iops, requests, job["write"]["io_bytes"]


async def measure(contender: str, guest, work: Path, runtime: int, size_mib: int) -> dict:
    run_dir = work / contender
    run_dir.mkdir()
    image = run_dir / "disk.img"
    with image.open("wb") as f:
        f.truncate((size_mib + 64) << 20)
    backend: ServeBackend | StorageDaemon | None = None
    if contender in ("passthrough", "logwrites"):
        backend = ServeBackend(image, run_dir / "log", run_dir, mode=contender)
    elif contender == "qemu-storage-daemon":
        backend = StorageDaemon(image, run_dir)
    disks = ()
    if contender == "blklogwrites":
        log = run_dir / "log"
        log.write_bytes(b"")
        # Machine's plain disk line is `file=PATH,format=FMT,...`: the log child rides along.
        disks = (PlainDisk(Path(f"{image},log.driver=file,log.filename={log},"
                                f"log-sector-size=512"), format="blklogwrites"),)
    results: dict = {}
    if backend is not None:
        await backend.start()
    try:
        async with Machine(guest, run_dir / "m", disk_socket=backend.socket if backend else None,
                           disks=disks) as m:
            pid = backend.proc.pid if backend and backend.proc else None
            for name, options in JOBS.items():
                before, woke = cpu_seconds(pid), wakeups(pid)
                result = await m.run(fio_script(options, runtime, size_mib),
                                     timeout_s=runtime * 10 + 120)
                used, woke = cpu_seconds(pid) - before, wakeups(pid) - woke
                if result is None or not result.ok:
                    results[name] = {"error": (result.stderr if result else "no result")[-300:]}
                    continue
                iops, requests, written = fio_figures(result.reports["fio"])
                ok = bool(pid and requests)
                results[name] = {"iops": iops, "requests": requests, "bytes_written": written,
                                 "cpu_us_per_request": used / requests * 1e6 if ok else None,
                                 "wakeups_per_request": woke / requests if ok else None}
            accel, memory_mb = m.accel, m.memory_mb
            memory = memory_kib(pid)
            await m.quit()
    finally:
        if backend is not None:
            await backend.stop()
    return {"accel": accel, "guest_memory_mib": memory_mb, "memory_kib": memory,
            "jobs": results}


def best_of(rounds: list[dict]) -> dict:
    """One contender's figures over rounds: per job the highest IOPS and the lowest CPU and
    wake-ups per request; memory the highest; bytes written summed."""
    merged = {k: v for k, v in rounds[0].items() if k != "jobs"}
    merged["memory_kib"] = {key: max(r["memory_kib"].get(key, 0) for r in rounds)
                            for key in rounds[0]["memory_kib"]}
    merged["jobs"] = {}
    for job in JOBS:
        ok = [r["jobs"][job] for r in rounds if "error" not in r["jobs"].get(job, {"error": 1})]
        if not ok:
            merged["jobs"][job] = rounds[-1]["jobs"].get(job, {"error": "not run"})
            continue
        figures = {"iops": max(g["iops"] for g in ok),
                   "requests": sum(g["requests"] for g in ok),
                   "bytes_written": sum(g["bytes_written"] for g in ok)}
        for key in ("cpu_us_per_request", "wakeups_per_request"):
            values = [g[key] for g in ok if g[key] is not None]
            figures[key] = min(values) if values else None
        merged["jobs"][job] = figures
    return merged


def worst_ratio(ours: dict, ref: dict, key: str, higher_is_better: bool
                ) -> tuple[float, str] | None:
    """The worst ratio ours/ref of `key` over the jobs both ran, and that job's name."""
    ratios = []
    for job in JOBS:
        a, b = ours.get(job, {}).get(key), ref.get(job, {}).get(key)
        if a is not None and b:
            ratios.append((a / b, job))
    if not ratios:
        return None
    return min(ratios) if higher_is_better else max(ratios)


def verdicts(figures: dict) -> list[str]:
    """One line per goal of issue 7: met / not met, with the figure that decides."""
    ref = figures.get("qemu-storage-daemon", {}).get("jobs", {})
    lw = figures.get("logwrites", {}).get("jobs", {})
    pt = figures.get("passthrough", {}).get("jobs", {})

    def bound(name: str, ours: dict, key: str, limit: float, higher: bool) -> str:
        got = worst_ratio(ours, ref, key, higher)
        if got is None:
            return f"{name}: not measured (needs this contender and qemu-storage-daemon)"
        ratio, job = got
        ok = ratio >= limit if higher else ratio <= limit
        sign = ">=" if higher else "<="
        return (f"{name}: {'met' if ok else 'NOT met'} (worst x{ratio:.2f} qsd on {job}, "
                f"goal {sign} {limit})")

    lines = [bound("CPU/request logwrites <= 1.0x qsd", lw, "cpu_us_per_request", 1.0, False),
             bound("CPU/request passthrough <= 0.8x qsd", pt, "cpu_us_per_request", 0.8, False),
             bound("IOPS logwrites >= 0.9x qsd", lw, "iops", 0.9, True),
             bound("wake-ups/request logwrites <= qsd", lw, "wakeups_per_request", 1.0, False)]
    ours = figures.get("logwrites")
    if ours:
        memory = ours["memory_kib"]
        peak, shared = memory.get("VmHWM", 0) / 1024, memory.get("RssShmem", 0) / 1024
        written = sum(g.get("bytes_written", 0) for g in ours["jobs"].values()) / (1 << 20)
        ram = ours["guest_memory_mib"]
        enough = written >= 10 * ram
        state = "met" if peak < 100 and enough else "NOT met"
        why = "" if enough else f"; the workload wrote {written:.0f} MiB, not 10x RAM"
        lines.append(f"memory < 100 MiB through 10x guest RAM written: {state} (peak RSS "
                     f"{peak:.0f} MiB, of which guest RAM mapped at the end {shared:.0f} MiB; "
                     f"guest RAM {ram} MiB{why})")
    lines.append("multiqueue costs single-queue nothing: not measured by this bench "
                 "(one queue, one vCPU)")
    return lines


def qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    parser.add_argument("--size-mib", type=int, default=256, help="disk area fio uses")
    parser.add_argument("--rounds", type=int, default=2, help="contenders back to back, N times")
    parser.add_argument("--only", choices=CONTENDERS, action="append")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    guest = default_guest()
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for contender in args.only or CONTENDERS:
            with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
                runs.setdefault(contender, []).append(
                    asyncio.run(measure(contender, guest, Path(tmp), args.runtime,
                                        args.size_mib)))
    figures = {contender: best_of(rounds) for contender, rounds in runs.items()}
    env = {"qemu": qemu_version(), "cores": os.cpu_count(), "python": platform.python_version(),
           "accel": next(iter(figures.values()))["accel"]}
    if args.json:
        print(json.dumps({"environment": env, "figures": figures, "verdicts": verdicts(figures)}))
        return 0
    print(f"{env['qemu']}, accel {env['accel']}, {env['cores']} cores, "
          f"runtime {args.runtime} s per job, best of {args.rounds} rounds")
    ref = figures.get("qemu-storage-daemon", {}).get("jobs", {})
    blw = figures.get("blklogwrites", {}).get("jobs", {})
    for job in JOBS:
        print(f"{job}:")
        for contender, data in figures.items():
            got = data["jobs"].get(job, {})
            if "error" in got:
                print(f"  {contender:20s} failed: {got['error'].strip().splitlines()[-1:]}")
                continue
            line = f"  {contender:20s} {got['iops']:9.0f} IOPS"
            base = ref.get(job, {}).get("iops")
            if base:
                line += f"  x{got['iops'] / base:.2f} qsd"
            other = blw.get(job, {}).get("iops")
            if other and contender != "blklogwrites":
                line += f"  x{got['iops'] / other:.2f} blklogwrites"
            if got.get("cpu_us_per_request") is not None:
                line += f"  backend CPU {got['cpu_us_per_request']:.1f} us/request"
            if got.get("wakeups_per_request") is not None:
                line += f"  {got['wakeups_per_request']:.2f} wake-ups/request"
            print(line)
    print("memory (KiB):")
    for contender, data in figures.items():
        if data["memory_kib"]:
            print(f"  {contender:20s} " + "  ".join(f"{k} {v}" for k, v in
                                                    data["memory_kib"].items()))
    print("verdicts (issue 7):")
    for line in verdicts(figures):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
