"""Backend speed: the same guest and fio jobs against four disks, in one run.

Contenders: `logwrites serve --mode passthrough`, `logwrites serve` (logwrites mode),
qemu-storage-daemon's vhost-user-blk export of the same image, and QEMU's own virtio-blk over
the blklogwrites driver. Every guest first sets its cache to write back (qemu-storage-daemon
starts with wce=0), then runs each fio job on the raw disk (O_DIRECT, libaio): 4 KiB random
write at depth 1 and 32, 4 KiB random read at depth 32, 1 MiB sequential write at depth 4,
4 KiB random write with an fsync after each. Prints IOPS per job, ratios to
qemu-storage-daemon and to blklogwrites, and the backend process's CPU time per request
(utime+stime from /proc, over fio's request count; blklogwrites runs inside QEMU, so it has
none of its own). Under TCG the guest is often the bottleneck: CPU per request is the figure
that shows the backend's own cost. No asserts.

    .venv/bin/python bench/backend.py [--runtime 5] [--size-mib 256] [--json]
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


def fio_script(options: str, runtime: int, size_mib: int) -> str:
    return (f"echo 'write back' > /sys/block/vda/cache_type\n"
            f"fio --name=j --filename=$LW_DEV --direct=1 --ioengine=libaio {options} "
            f"--size={size_mib}M --runtime={runtime} --time_based --ramp_time=1 "
            f"--output-format=json > /tmp/fio.json 2>/tmp/fio.err "
            f"|| {{ cat /tmp/fio.err >&2; exit 1; }}\n"
            f"lw-report fio \"$(cat /tmp/fio.json)\"\n")


def fio_figures(report: str) -> tuple[float, int]:
    job = json.loads(report[report.index("{"):])["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"]
    requests = job["read"]["total_ios"] + job["write"]["total_ios"]
    requests += job.get("sync", {}).get("total_ios", 0)
    return iops, requests


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
                before = cpu_seconds(pid)
                result = await m.run(fio_script(options, runtime, size_mib),
                                     timeout_s=runtime * 10 + 120)
                used = cpu_seconds(pid) - before
                if result is None or not result.ok:
                    results[name] = {"error": (result.stderr if result else "no result")[-300:]}
                    continue
                iops, requests = fio_figures(result.reports["fio"])
                results[name] = {"iops": iops, "requests": requests,
                                 "cpu_us_per_request": (used / requests * 1e6
                                                        if pid and requests else None)}
            accel = m.accel
            await m.quit()
    finally:
        if backend is not None:
            await backend.stop()
    return {"accel": accel, "jobs": results}


def qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    parser.add_argument("--size-mib", type=int, default=256, help="disk area fio uses")
    parser.add_argument("--only", choices=CONTENDERS, action="append")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    guest = default_guest()
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
        for contender in args.only or CONTENDERS:
            figures[contender] = asyncio.run(measure(contender, guest, Path(tmp),
                                                     args.runtime, args.size_mib))
    env = {"qemu": qemu_version(), "cores": os.cpu_count(), "python": platform.python_version(),
           "accel": next(iter(figures.values()))["accel"]}
    if args.json:
        print(json.dumps({"environment": env, "figures": figures}))
        return 0
    print(f"{env['qemu']}, accel {env['accel']}, {env['cores']} cores, "
          f"runtime {args.runtime} s per job")
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
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
