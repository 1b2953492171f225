"""Backend speed: the same guest and fio jobs against four disks, in one run.

Contenders: `logwrites serve --mode passthrough`, `logwrites serve` (logwrites mode),
qemu-storage-daemon's vhost-user-blk export of the same image, and QEMU's own virtio-blk over
the blklogwrites driver (and, in a phase of their own, logwrites mode with four queues and a
control: Multiqueue below). Every guest first sets its cache to write back
(qemu-storage-daemon starts with wce=0), then runs each fio job on the raw disk (O_DIRECT,
libaio): 4 KiB random write at depth 1 and 32, 4 KiB random read at depth 32, 1 MiB sequential
write at depth 4, 4 KiB random write with an fsync after each (`--job` picks some).
Prints IOPS per job, ratios to qemu-storage-daemon and to blklogwrites, the backend process's
CPU time per request (utime+stime from /proc, over fio's request count; blklogwrites runs inside
QEMU, so it has none of its own), its wake-ups per request (voluntary + involuntary context
switches from /proc/PID/status) and its peak memory. Under TCG the guest is often the
bottleneck: CPU per request is the figure that shows the backend's own cost. Contenders run back
to back in each of `--rounds` rounds, each in a guest and backend of its own, every other
round in reverse order (no contender always runs in the same place, after the same
neighbour); each figure is the best of the rounds (the machine's cores are shared, so the worst
round measures the neighbours). Then the two routes a log has for 1 MiB appends are timed
alone, each for a job's length and with the fsync the job ends with (O_DIRECT to the disk, and
the page cache): what bounds logged 1 MiB writes on the machine, since qemu-storage-daemon's
land in page-cache pages it already holds. Ends with one verdict line per goal of issue 7. No
asserts.

Two goals need phases of their own. Memory: job `write-10x-ram` writes ten times the guest's RAM
(1 MiB sequential writes looping over the fio area, an fsync every 64 writes) through the
passthrough, logwrites and qemu-storage-daemon backends while the backend's VmRSS, RssAnon and
RssShmem are sampled from /proc; the goal is about RssAnon (what the backend allocates), since
the guest RAM it maps (RssShmem) is the guest's. The bench guest gets `--guest-mib` of RAM
(384 MiB: the default guest's initramfs is unpacked into RAM, and 256 MiB panics at boot), so
10x is 3840 MiB. The memory job runs once every timed job ran, `--rounds` times, each run in a
guest and backend of its own, so that no timed job follows a 4 GB write.
Multiqueue: a phase of its own, after the others (`--mq-rounds`, `--mq-runtime`). In each round
three logwrites-mode contenders are up at once, each with its guest and backend: `logwrites`
(one queue), `logwrites-control` (the same again) and `logwrites-4q` (`--num-queues 4`, QEMU
`num-queues=4`). Each job is run by each of them in turn while the other two guests idle, in
an order that changes from round to round (`interleaved_order`: six rounds run every order
once). The verdict takes, per job, the median over rounds of four queues' ratio to one queue
in the same round: runs seconds apart, where the contenders of the main rounds run a minute
or more apart. The control's ratio to one queue, taken alike, is the noise the four-queue
figures are judged against. Every round has new guests and backends: a pair of QEMU and
backend keeps its cost per request for its whole life, and pairs differ (in session 17 the
control's guest cost 0.51-0.59x one queue's per read in all of six rounds kept in one set of
guests, with the same wake-ups per request), so one set of guests would compare one draw of
each. With one guest CPU the guest's virtio-blk starts one of the four queues (one per CPU),
so this measures what offering four costs a single-queue workload; `--cpus 2` gives every
contender's guest two CPUs, and then the guest starts two queues, one per CPU.

Placement. On the development machine (a VM with two vCPUs) a wake-up across CPUs costs far
more than one on the same CPU: two processes passing a byte back and forth over pipes took
about 28 us of CPU per round trip on two CPUs and 1.7 us on one. Small requests cost the
backend mostly wake-ups, so its CPU per 4 KiB request moves with where the scheduler happens
to put it beside QEMU, by up to 2x between rounds of one configuration. `--placement shared`
puts each contender's QEMU and backend (every thread) on one CPU before each job, the same
for every contender; it measures the backend's own work far more steadily, but it is not how
anyone deploys one (1 MiB writes, which need both CPUs, lose), so the default is `free`.

    .venv/bin/python bench/backend.py [--runtime 5] [--size-mib 256] [--rounds 2]
        [--guest-mib 384] [--cpus 1] [--only CONTENDER]... [--job JOB]...
        [--placement free|shared] [--mq-rounds 6] [--mq-runtime 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from guests.build import default_guest
from qmp.backend import BackendError, ControlClient, ServeBackend, StorageDaemon
from qmp.machine import Machine, PlainDisk

JOBS: Final = {  # name: fio options of the timed single-job runs
    "randwrite-4k-qd1": "--rw=randwrite --bs=4k --iodepth=1",
    "randwrite-4k-qd32": "--rw=randwrite --bs=4k --iodepth=32",
    "randread-4k-qd32": "--rw=randread --bs=4k --iodepth=32",
    "seqwrite-1m-qd4": "--rw=write --bs=1m --iodepth=4",
    "randwrite-4k-fsync": "--rw=randwrite --bs=4k --iodepth=1 --fsync=1",
}
# Ten times the guest's RAM written, flushed along the way: the memory goal's workload.
MEMORY_JOB: Final = "write-10x-ram"
MEMORY_JOB_OPTIONS: Final = "--rw=write --bs=1m --iodepth=4 --fsync=64"
ALL_JOBS: Final = (*JOBS, MEMORY_JOB)
MQ_QUEUES: Final = 4
CONTENDERS: Final = ("passthrough", "logwrites", "qemu-storage-daemon", "blklogwrites")
LOGWRITES_MODE: Final = ("logwrites", "logwrites-control", "logwrites-4q")
# The multiqueue phase's contenders, all up at once: one queue, the same again (the noise the
# four-queue figures are judged against) and four queues.
MQ_CONTENDERS: Final = ("logwrites", "logwrites-control", "logwrites-4q")
# Contenders with a backend process whose memory the memory job samples.
MEMORY_CONTENDERS: Final = ("passthrough", "logwrites", "qemu-storage-daemon")
SAMPLE_INTERVAL_S: Final = 0.1
MEMORY_LIMIT_MIB: Final = 100
MQ_IOPS_FLOOR, MQ_CPU_CEILING = 0.9, 1.1  # "within noise" for the multiqueue goal
TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


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


def status_kib(pid: int | None, keys: tuple[str, ...]) -> dict[str, int]:
    """The `keys` fields (KiB) of /proc/PID/status."""
    if pid is None:
        return {}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in keys:
            out[key] = int(line.split()[1])
    return out


def memory_kib(pid: int | None) -> dict[str, int]:
    """Peak resident set (VmHWM) and private anonymous memory (RssAnon) of `pid`, in KiB.

    A vhost-user backend maps the guest's RAM (a shared memfd): pages it touches count in its
    VmRSS/VmHWM although they are the guest's memory. RssAnon is what the backend allocates.
    """
    return status_kib(pid, ("VmHWM", "RssAnon", "RssShmem"))


class RssSampler:
    """Samples a process's VmRSS, RssAnon and RssShmem every SAMPLE_INTERVAL_S while a job
    runs: the peaks, and RssAnon at the first and last sample (flat or growing)."""

    KEYS: Final = ("VmRSS", "RssAnon", "RssShmem")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = dict.fromkeys(self.KEYS, 0)
        self.first_anon_kib: int | None = None
        self.last_anon_kib = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        try:
            now = status_kib(self.pid, self.KEYS)
        except OSError:  # the backend is gone: the job will say why
            return
        for key, value in now.items():
            self.peak_kib[key] = max(self.peak_kib[key], value)
        anon = now.get("RssAnon", 0)
        if self.first_anon_kib is None:
            self.first_anon_kib = anon
        self.last_anon_kib = anon
        self.samples += 1

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sample()

    def figures(self) -> dict:
        return {"rss_peak_kib": self.peak_kib, "rss_anon_first_kib": self.first_anon_kib or 0,
                "rss_anon_last_kib": self.last_anon_kib, "rss_samples": self.samples}


def fio_script(options: str) -> str:
    return (f"echo 'write back' > /sys/block/vda/cache_type\n"
            f"fio --name=j --filename=$LW_DEV --direct=1 --ioengine=libaio {options} "
            f"--output-format=json > /tmp/fio.json 2>/tmp/fio.err "
            f"|| {{ cat /tmp/fio.err >&2; exit 1; }}\n"
            f"lw-report fio \"$(cat /tmp/fio.json)\"\n")


def timed_job(options: str, runtime: int, size_mib: int) -> str:
    # --end_fsync: each job ends with a FLUSH, so a job that sends none (the O_DIRECT write
    # jobs) pays for logging its own parked writes instead of handing them to the next job.
    return fio_script(f"{options} --size={size_mib}M --runtime={runtime} --time_based "
                      f"--ramp_time=1 --end_fsync=1")


def memory_job(size_mib: int, write_mib: int) -> str:
    # --io_size beyond --size: fio loops over the area until write_mib are written.
    return fio_script(f"{MEMORY_JOB_OPTIONS} --size={size_mib}M --io_size={write_mib}M "
                      f"--end_fsync=1")


def fio_figures(report: str) -> tuple[float, int, int]:
    """(IOPS, requests including flushes, bytes written) of a fio JSON report."""
    job = json.loads(report[report.index("{"):])["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"]
    requests = job["read"]["total_ios"] + job["write"]["total_ios"]
    requests += job.get("sync", {}).get("total_ios", 0)
    return iops, requests, job["write"]["io_bytes"]


def queue_counts(status: dict) -> dict[str, int]:
    return {"queues": int(status.get("queues", 0)),
            "queues_started": int(status.get("queues_started", 0))}


@dataclass
class Seat:
    """One contender's live guest and backend."""

    contender: str
    machine: Machine
    backend: ServeBackend | StorageDaemon | None
    placement: str
    failed_first: str = ""      # the first job that failed: the disk is suspect after it

    @property
    def pid(self) -> int | None:
        return self.backend.proc.pid if self.backend and self.backend.proc else None


@contextlib.asynccontextmanager
async def seated(contender: str, guest, work: Path, size_mib: int, guest_mib: int, cpus: int,
                 placement: str = "free") -> AsyncIterator[Seat]:
    """`contender`'s backend and guest, up until the block ends."""
    run_dir = work / contender
    run_dir.mkdir()
    image = run_dir / "disk.img"
    with image.open("wb") as f:
        f.truncate((size_mib + 64) << 20)
    queues = MQ_QUEUES if contender == "logwrites-4q" else 1
    backend: ServeBackend | StorageDaemon | None = None
    if contender == "passthrough" or contender in LOGWRITES_MODE:
        mode = "logwrites" if contender in LOGWRITES_MODE else contender
        backend = ServeBackend(image, run_dir / "log", run_dir, mode=mode, num_queues=queues)
    elif contender == "qemu-storage-daemon":
        backend = StorageDaemon(image, run_dir)
    disks = ()
    if contender == "blklogwrites":
        log = run_dir / "log"
        log.write_bytes(b"")
        # Machine's plain disk line is `file=PATH,format=FMT,...`: the log child rides along.
        disks = (PlainDisk(Path(f"{image},log.driver=file,log.filename={log},"
                                f"log-sector-size=512"), format="blklogwrites"),)
    if backend is not None:
        await backend.start()
    try:
        async with Machine(guest, run_dir / "m", disk_socket=backend.socket if backend else None,
                           disks=disks, num_queues=queues, memory_mb=guest_mib,
                           cpus=cpus) as m:
            yield Seat(contender, m, backend, placement)
            await m.quit()
    finally:
        if backend is not None:
            await backend.stop()


async def run_job(seat: Seat, name: str, runtime: int, size_mib: int) -> dict:
    """One fio job in `seat`'s guest: its IOPS and the backend's CPU and wake-ups per request
    (and its memory over the memory job), or {"error": why}."""
    if seat.failed_first:
        # A job that failed (a disk that stopped answering is killed at its timeout) leaves
        # the disk suspect: the rest would each wait as long.
        return {"error": f"not run: {seat.failed_first} failed before it"}
    m, pid = seat.machine, seat.pid
    if name == MEMORY_JOB:
        write_mib = 10 * m.memory_mb
        script, timeout_s = memory_job(size_mib, write_mib), write_mib // 5 + 300
    else:
        script, timeout_s = timed_job(JOBS[name], runtime, size_mib), runtime * 10 + 120
    if seat.placement == "shared":
        share_one_cpu((pid, m.pid), min(os.sched_getaffinity(0)))
    sampler = RssSampler(pid) if name == MEMORY_JOB and pid else None
    before, woke = cpu_seconds(pid), wakeups(pid)
    async with sampler or contextlib.nullcontext():
        result = await m.run(script, timeout_s=timeout_s)
    used, woke = cpu_seconds(pid) - before, wakeups(pid) - woke
    if result is None or not result.ok:
        seat.failed_first = name
        error = (result.stderr if result else "no result")[-300:]
        return {"error": error + guest_kernel_says(m.console_path)}
    iops, requests, written = fio_figures(result.reports["fio"])
    ok = bool(pid and requests)
    figures = {"iops": iops, "requests": requests, "bytes_written": written,
               "cpu_us_per_request": used / requests * 1e6 if ok else None,
               "wakeups_per_request": woke / requests if ok else None}
    return figures | (sampler.figures() if sampler is not None else {})


async def seat_figures(seat: Seat) -> dict:
    """What a contender's run says beside its jobs: the guest, the backend's peak memory, and
    how many of the offered queues the guest started (one per guest CPU)."""
    extra: dict = {}
    if isinstance(seat.backend, ServeBackend) and seat.backend.control is not None:
        try:
            async with ControlClient(seat.backend.control, timeout_s=30) as control:
                extra = queue_counts(await control.status())
        except (BackendError, OSError, TimeoutError, ValueError) as err:
            extra = {"status_error": str(err)}
    m = seat.machine
    return {"accel": m.accel, "guest_memory_mib": m.memory_mb, "guest_cpus": m.cpus,
            "memory_kib": memory_kib(seat.pid), **extra}


async def measure(contender: str, guest, work: Path, runtime: int, size_mib: int,
                  jobs: tuple[str, ...], guest_mib: int, cpus: int,
                  placement: str = "free") -> dict:
    """`contender`'s figures on `jobs`, one after another in one guest."""
    async with seated(contender, guest, work, size_mib, guest_mib, cpus, placement) as seat:
        results = {}
        for name in jobs:
            if name == MEMORY_JOB and (contender not in MEMORY_CONTENDERS or seat.pid is None):
                continue
            results[name] = await run_job(seat, name, runtime, size_mib)
        return await seat_figures(seat) | {"jobs": results}


async def measure_side_by_side(contenders: Sequence[str], guest, work: Path, runtime: int,
                               size_mib: int, jobs: tuple[str, ...], guest_mib: int,
                               cpus: int, round_number: int, placement: str = "free"
                               ) -> dict[str, dict]:
    """One round with every contender's guest and backend up at once: each job run by each of
    them in turn, in round `round_number`'s `interleaved_order`, while the others idle. Per
    contender, its figures as `measure` gives them. Runs seconds apart, not minutes, and no
    contender pays for a boot or a neighbour's deleted files that another does not."""
    results: dict[str, dict] = {c: {} for c in contenders}
    async with contextlib.AsyncExitStack() as stack:
        # Booted in the round's order too: in session 17 the guest booted first was the dearest
        # of the three in most rounds, and it was always one queue's.
        seats = {c: await stack.enter_async_context(
            seated(c, guest, work, size_mib, guest_mib, cpus, placement))
            for c in interleaved_order(contenders, round_number)}
        for name in jobs:
            for contender in interleaved_order(contenders, round_number):
                results[contender][name] = await run_job(seats[contender], name, runtime,
                                                         size_mib)
        return {c: await seat_figures(seats[c]) | {"jobs": results[c]} for c in contenders}


def interleaved_order(contenders: Sequence[T], round_number: int) -> list[T]:
    """Round `round_number`'s order: forward, then reversed, then rotated by one and so on, so
    that over two rounds every contender has the other side of each neighbour, and with three
    contenders six rounds run every order once."""
    shift = (round_number // 2) % len(contenders)
    rotated = [*contenders[shift:], *contenders[:shift]]
    return rotated if round_number % 2 == 0 else rotated[::-1]


def add_memory_phase(round_figures: dict, memory: dict) -> None:
    """A contender's memory-job run (a guest and backend of its own) into its figures of the
    same round: the job's figures, and the peaks of both backend processes."""
    round_figures["jobs"] |= memory["jobs"]
    round_figures["memory_kib"] = {
        key: max(round_figures["memory_kib"].get(key, 0), memory["memory_kib"].get(key, 0))
        for key in round_figures["memory_kib"].keys() | memory["memory_kib"].keys()}


def guest_kernel_says(console: Path) -> str:
    """The guest kernel's last word on a killed job (its OOM killer, a hung task), if any: fio
    killed with no message of its own once in a run of session 15, with the console gone."""
    try:
        lines = console.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    said = [line for line in lines
            if any(w in line for w in ("Out of memory", "Killed process", "oom-kill",
                                       "blocked for more than", "BUG:", "Call Trace"))]
    return f" (guest console: {said[-1].strip()})" if said else ""


def share_one_cpu(pids: Sequence[int | None], cpu: int) -> None:
    """Put every thread of `pids` on `cpu`. Threads started later inherit it from the thread
    that starts them, and a job's threads are started by then, so this is done before each job."""
    for pid in pids:
        if pid is None:
            continue
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.sched_setaffinity(int(task.name), {cpu})


def best_of(rounds: list[dict]) -> dict:
    """One contender's figures over rounds: per job the highest IOPS and the lowest CPU and
    wake-ups per request; memory the highest; bytes written summed."""
    merged = {k: v for k, v in rounds[0].items() if k != "jobs"}
    merged["memory_kib"] = {key: max(r["memory_kib"].get(key, 0) for r in rounds)
                            for key in rounds[0]["memory_kib"]}
    merged["jobs"] = {}
    for job in ALL_JOBS:
        ok = [r["jobs"][job] for r in rounds if "error" not in r["jobs"].get(job, {"error": 1})]
        if not ok:
            if any(job in r["jobs"] for r in rounds):
                merged["jobs"][job] = rounds[-1]["jobs"].get(job, {"error": "failed"})
            continue
        figures = {"iops": max(g["iops"] for g in ok),
                   "requests": sum(g["requests"] for g in ok),
                   "bytes_written": sum(g["bytes_written"] for g in ok)}
        for key in ("cpu_us_per_request", "wakeups_per_request"):
            values = [g[key] for g in ok if g[key] is not None]
            figures[key] = min(values) if values else None
        if "rss_peak_kib" in ok[0]:
            # Memory is a ceiling: the worst round is the figure, with its first/last RssAnon.
            worst = max(ok, key=lambda g: g["rss_peak_kib"]["RssAnon"])
            figures |= {k: worst[k] for k in ("rss_peak_kib", "rss_anon_first_kib",
                                              "rss_anon_last_kib", "rss_samples")}
            figures["bytes_written_per_round"] = min(g["bytes_written"] for g in ok)
        merged["jobs"][job] = figures
    return merged


def worst_ratio(ours: dict, ref: dict, key: str, higher_is_better: bool,
                jobs: tuple[str, ...] = ALL_JOBS) -> tuple[float, str] | None:
    """The worst ratio ours/ref of `key` over the `jobs` both ran, and that job's name."""
    ratios = []
    for job in jobs:
        a, b = ours.get(job, {}).get(key), ref.get(job, {}).get(key)
        if a is not None and b:
            ratios.append((a / b, job))
    if not ratios:
        return None
    return min(ratios) if higher_is_better else max(ratios)


def memory_verdict(figures: dict) -> str:
    name = f"memory < {MEMORY_LIMIT_MIB} MiB through 10x guest RAM written"
    ours = figures.get("logwrites", {})
    got = ours.get("jobs", {}).get(MEMORY_JOB)
    if not got or "error" in got:
        why = got["error"].strip().splitlines()[-1:] if got else f"run job {MEMORY_JOB}"
        return f"{name}: not measured on logwrites ({why})"
    ram = ours["guest_memory_mib"]
    written = got["bytes_written_per_round"] / (1 << 20)
    peak = got["rss_peak_kib"]
    anon, rss, shmem = (peak[k] / 1024 for k in ("RssAnon", "VmRSS", "RssShmem"))
    enough = written >= 10 * ram
    state = "met" if anon < MEMORY_LIMIT_MIB and enough else "NOT met"
    why = "" if enough else f"; wrote {written:.0f} MiB, not 10x RAM"
    return (f"{name}: {state} (peak RssAnon {anon:.0f} MiB, from "
            f"{got['rss_anon_first_kib'] / 1024:.0f} to {got['rss_anon_last_kib'] / 1024:.0f} "
            f"MiB over the job; peak VmRSS {rss:.0f} MiB of which guest RAM mapped {shmem:.0f} "
            f"MiB; {written:.0f} MiB written, guest RAM {ram} MiB{why})")


def noise_band(control: float | None, fixed: float, higher_is_better: bool) -> float:
    """The limit a four-queue ratio to one queue is held to: the fixed band, widened to how far
    the control (the same one-queue configuration run again) strayed from one queue, either
    way, on the same job."""
    if not control:
        return fixed
    spread = max(control, 1 / control)
    return min(fixed, 1 / spread) if higher_is_better else max(fixed, spread)


def paired_ratios(runs: dict[str, list[dict]], contender: str, job: str, key: str
                  ) -> list[float]:
    """`contender`'s figure over one queue's (`logwrites`) on `job`, round by round. Both ran
    back to back in every round (neighbours in the order), so each ratio sees one state of the
    machine; their median leaves out a round the machine's neighbours spoiled for one of the
    two, where best of rounds would keep the luckiest round of each, taken minutes apart."""
    ratios = []
    for ours, one in zip(runs.get(contender, []), runs.get("logwrites", []), strict=False):
        a, b = ours["jobs"].get(job, {}).get(key), one["jobs"].get(job, {}).get(key)
        if a is not None and b:
            ratios.append(a / b)
    return ratios


def paired_ratio(runs: dict[str, list[dict]], contender: str, job: str, key: str
                 ) -> float | None:
    """The median of `paired_ratios`, None when no round has both figures."""
    ratios = paired_ratios(runs, contender, job, key)
    return statistics.median(ratios) if ratios else None


def multiqueue_verdict(runs: dict[str, list[dict]]) -> str:
    """`runs`: the multiqueue phase's, per contender one figures dict per round."""
    name = f"multiqueue ({MQ_QUEUES} queues) costs single-queue nothing"
    mq = (runs.get("logwrites-4q") or [{}])[0]
    rounds = min(len(runs.get("logwrites-4q", [])), len(runs.get("logwrites", [])))
    # (figure, job, 4q's ratio to 1q, the limit it is held to, the control's ratio to 1q)
    checks: list[tuple[str, str, float, float, float | None]] = []
    for key, fixed, higher in (("iops", MQ_IOPS_FLOOR, True),
                               ("cpu_us_per_request", MQ_CPU_CEILING, False)):
        for job in JOBS:
            ratio = paired_ratio(runs, "logwrites-4q", job, key)
            if ratio is None:
                continue
            spread = paired_ratio(runs, "logwrites-control", job, key)
            checks.append((key, job, ratio, noise_band(spread, fixed, higher), spread))
    if not checks or {key for key, *_ in checks} != {"iops", "cpu_us_per_request"}:
        return f"{name}: not measured (needs the multiqueue phase: --mq-rounds)"
    asked = {job for figures in runs.get("logwrites", []) for job in figures["jobs"]}
    unmeasured = sorted(asked - {job for _, job, *_ in checks})
    if unmeasured:
        return (f"{name}: NOT met (not measured on {', '.join(unmeasured)}: a contender's job "
                f"failed in every round)")

    def margin(check: tuple[str, str, float, float, float | None]) -> float:
        key, _, ratio, limit, _ = check
        return ratio / limit if key == "iops" else limit / ratio     # below 1: over the limit

    ok = all(margin(c) >= 1 for c in checks)
    parts = []
    for key, label in (("iops", "IOPS"), ("cpu_us_per_request", "CPU/request")):
        _, job, ratio, limit, spread = min((c for c in checks if c[0] == key), key=margin)
        sign = ">=" if key == "iops" else "<="
        noise = f", control x{spread:.2f}" if spread is not None else ", no control run"
        parts.append(f"worst {label} x{ratio:.2f} 1q on {job} ({sign} {limit:.2f}{noise})")
    started = mq.get("queues_started", "?")
    return (f"{name}: {'met' if ok else 'NOT met'} ({'; '.join(parts)}; each the median over "
            f"{rounds} rounds side by side of the ratio to one queue in the same round; band "
            f"{MQ_IOPS_FLOOR}/{MQ_CPU_CEILING}, widened to the control's on the same job; "
            f"{mq.get('guest_cpus', '?')} guest CPU, {started} of {MQ_QUEUES} queues started)")


def verdicts(figures: dict, mq_runs: dict[str, list[dict]],
             routes: dict[str, LogRoute] | None = None) -> list[str]:
    """One line per goal of issue 7: met / not met, with the figure that decides; an IOPS goal
    missed on 1 MiB writes also says how far the log's faster route (`routes`, print_log_routes)
    would go. `figures`: the main rounds' best; `mq_runs`: the multiqueue phase's rounds."""
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
        ceiling = ""
        if key == "iops" and not ok and job == "seqwrite-1m-qd4" and routes:
            # Every logged MiB goes to the log's disk or into fresh page-cache pages; qsd's land
            # in pages it already has.
            route, fastest = faster_route(routes)
            ceiling = (f"; the log's faster route ({route.replace('_', ' ')}) took "
                       f"{fastest.mib_s:.0f} MiB/s, x{fastest.mib_s / ref[job]['iops']:.2f} qsd's")
        return (f"{name}: {'met' if ok else 'NOT met'} (worst x{ratio:.2f} qsd on {job}, "
                f"goal {sign} {limit}{ceiling})")

    return [bound("CPU/request logwrites <= 1.0x qsd", lw, "cpu_us_per_request", 1.0, False),
            bound("CPU/request passthrough <= 0.8x qsd", pt, "cpu_us_per_request", 0.8, False),
            bound("IOPS logwrites >= 0.9x qsd", lw, "iops", 0.9, True),
            bound("wake-ups/request logwrites <= qsd", lw, "wakeups_per_request", 1.0, False),
            memory_verdict(figures), multiqueue_verdict(mq_runs)]


def qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def job_line(contender: str, got: dict, ref: dict, blw: dict) -> str:
    """One contender's figures on one job, with its ratios to the peers of the same run."""
    if "error" in got:
        return f"  {contender:20s} failed: {got['error'].strip().splitlines()[-1:]}"
    line = f"  {contender:20s} {got['iops']:9.0f} IOPS"
    base = ref.get("iops")
    if base:
        line += f"  x{got['iops'] / base:.2f} qsd"
    other = blw.get("iops")
    if other and contender != "blklogwrites":
        line += f"  x{got['iops'] / other:.2f} blklogwrites"
    cpu = got.get("cpu_us_per_request")
    if cpu is not None:
        line += f"  backend CPU {cpu:.1f} us/request"
    if got.get("wakeups_per_request") is not None:
        line += f"  {got['wakeups_per_request']:.2f} wake-ups/request"
    return line


def print_paired(runs: dict[str, list[dict]], jobs: Sequence[str]) -> None:
    """The multiqueue verdict's figures: per job, four queues' and the control's ratio to one
    queue in each round of the multiqueue phase, and their median."""
    if "logwrites-4q" not in runs or "logwrites" not in runs:
        return
    print("multiqueue phase, against one queue, round by round (median):")
    for job in jobs:
        for contender in ("logwrites-4q", "logwrites-control"):
            cells = []
            for key, label in (("iops", "IOPS"), ("cpu_us_per_request", "CPU/request")):
                ratios = paired_ratios(runs, contender, job, key)
                if ratios:
                    cells.append(f"{label} " + " ".join(f"{r:.2f}" for r in ratios)
                                 + f" ({statistics.median(ratios):.2f})")
            if cells:
                print(f"  {job:20s} {contender:18s} " + "   ".join(cells))
    # A round's pairs are redrawn, so its ratios move together across jobs: over every job and
    # round, four queues against the control says whether they differ beyond that.
    for contender in ("logwrites-4q", "logwrites-control"):
        cells = []
        for key, label in (("iops", "IOPS"), ("cpu_us_per_request", "CPU/request")):
            ratios = [r for job in jobs for r in paired_ratios(runs, contender, job, key)]
            if ratios:
                mean = math.exp(statistics.fmean(math.log(r) for r in ratios))
                cells.append(f"{label} x{mean:.2f}")
        if cells:
            print(f"  {'every job, geometric mean':20s} {contender:18s} " + "   ".join(cells))


def print_memory_job(figures: dict) -> None:
    rows = {c: d["jobs"][MEMORY_JOB] for c, d in figures.items()
            if "rss_peak_kib" in d["jobs"].get(MEMORY_JOB, {})}
    if not rows:
        return
    ram = next(iter(figures.values()))["guest_memory_mib"]
    print(f"{MEMORY_JOB} ({10 * ram} MiB of 1 MiB writes, fsync every 64, guest RAM {ram} MiB;"
          f" backend memory sampled every {SAMPLE_INTERVAL_S} s, MiB):")
    ref = rows.get("qemu-storage-daemon", {}).get("rss_peak_kib", {}).get("RssAnon")
    for contender, got in rows.items():
        peak = got["rss_peak_kib"]
        line = (f"  {contender:20s} peak RssAnon {peak['RssAnon'] / 1024:6.1f} (first "
                f"{got['rss_anon_first_kib'] / 1024:.1f}, last "
                f"{got['rss_anon_last_kib'] / 1024:.1f})  peak VmRSS {peak['VmRSS'] / 1024:6.1f}"
                f"  peak RssShmem {peak['RssShmem'] / 1024:6.1f}  {got['rss_samples']} samples")
        if ref:
            line += f"  RssAnon x{peak['RssAnon'] / ref:.2f} qsd"
        print(line)


@dataclass(frozen=True)
class LogRoute:
    """How fast a log can take 1 MiB appends one way on this machine, alone."""

    mib_s: float
    cpu_us_per_mib: float


def log_route(directory: Path, seconds: float, direct: bool) -> LogRoute:
    """1 MiB appends to a fresh file where the contenders put their logs, for as long as the job
    runs, and the fsync the job ends with: with O_DIRECT (`direct`, as the backend logs big
    writes) or through the page cache, where every appended MiB needs fresh pages."""
    size = 1 << 20
    buf = mmap.mmap(-1, size)               # page-aligned, as O_DIRECT wants
    buf.write(os.urandom(4096) * (size // 4096))
    flags = os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if direct else 0)
    with tempfile.TemporaryDirectory(prefix="lw-bench-disk-", dir=directory) as tmp:
        fd = os.open(Path(tmp) / "ceiling", flags)
        try:
            written, start, cpu_start = 0, time.monotonic(), time.thread_time()
            while time.monotonic() - start < seconds:
                written += os.pwrite(fd, buf, written)
            os.fsync(fd)
            elapsed, cpu = time.monotonic() - start, time.thread_time() - cpu_start
        finally:
            os.close(fd)
    mib = written / (1 << 20)
    return LogRoute(mib_s=mib / elapsed, cpu_us_per_mib=cpu / mib * 1e6)


def faster_route(routes: dict[str, LogRoute]) -> tuple[str, LogRoute]:
    """The route that took the most MiB/s, and its name."""
    return max(routes.items(), key=lambda item: item[1].mib_s)


def print_log_routes(figures: dict, routes: dict[str, LogRoute]) -> None:
    """What bounds logged 1 MiB writes on this machine: every logged MiB takes one of the log's
    two routes, to its disk or into fresh page-cache pages, while qemu-storage-daemon's land in
    page-cache pages it already has (fio's area is rewritten)."""
    got = figures.get("logwrites", {}).get("jobs", {}).get("seqwrite-1m-qd4")
    if not got:
        return
    disk, cache = routes["direct"], routes["page_cache"]
    line = (f"log routes, alone: the disk took {disk.mib_s:.0f} MiB/s of 1 MiB O_DIRECT appends "
            f"({disk.cpu_us_per_mib:.0f} us CPU per MiB), the page cache {cache.mib_s:.0f} MiB/s "
            f"of 1 MiB appends ({cache.cpu_us_per_mib:.0f} us CPU per MiB); logwrites' 1 MiB job "
            f"logged {got['iops']:.0f} MiB/s, {got['iops'] / disk.mib_s:.0%} of the disk's")
    ref = figures.get("qemu-storage-daemon", {}).get("jobs", {}).get("seqwrite-1m-qd4")
    if ref:
        _, fastest = faster_route(routes)
        line += (f"; qemu-storage-daemon's reached {ref['iops']:.0f} MiB/s in the page cache, "
                 f"x{ref['iops'] / fastest.mib_s:.2f} the log's faster route")
    print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=5, help="seconds per timed fio job")
    parser.add_argument("--size-mib", type=int, default=256, help="disk area fio uses")
    parser.add_argument("--rounds", type=int, default=2, help="contenders back to back, N times")
    parser.add_argument("--guest-mib", type=int, default=384,
                        help="guest RAM; the memory job writes 10x this (default 384: the "
                             "default guest does not boot in 256)")
    parser.add_argument("--cpus", type=int, default=1, help="guest CPUs, every contender")
    parser.add_argument("--only", choices=CONTENDERS, action="append",
                        help="run this contender (repeatable; default all)")
    parser.add_argument("--job", choices=ALL_JOBS, action="append",
                        help="run this job (repeatable; default all)")
    parser.add_argument("--placement", choices=("free", "shared"), default="free",
                        help="free: the scheduler places QEMU and the backend (as deployed); "
                             "shared: each contender's QEMU and backend on one CPU")
    parser.add_argument("--mq-rounds", type=int, default=6,
                        help="rounds of the multiqueue phase (0: none; default 6: three contenders "
                             "run in every order once)")
    parser.add_argument("--mq-runtime", type=int, default=2,
                        help="seconds per fio job in the multiqueue phase (default 2)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    jobs = tuple(args.job) if args.job else ALL_JOBS
    guest = default_guest()

    def measured(contender: str, its_jobs: tuple[str, ...]) -> dict:
        with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
            return asyncio.run(measure(contender, guest, Path(tmp), args.runtime,
                                       args.size_mib, its_jobs, args.guest_mib, args.cpus,
                                       args.placement))

    timed = tuple(job for job in jobs if job != MEMORY_JOB)
    contenders = tuple(args.only or CONTENDERS)
    runs: dict[str, list[dict]] = {}
    for round_number in range(args.rounds):
        order = interleaved_order(contenders, round_number)
        for contender in order if timed else ():
            runs.setdefault(contender, []).append(measured(contender, timed))
        # The memory job after every contender's timed jobs, each in a guest of its own: its
        # 4 GB (a 4 GB log, for logwrites) then colours no contender's timed jobs that follow.
        for contender in order if MEMORY_JOB in jobs else ():
            if contender in MEMORY_CONTENDERS:
                memory = measured(contender, (MEMORY_JOB,))
                if timed:
                    add_memory_phase(runs[contender][-1], memory)
                else:
                    runs.setdefault(contender, []).append(memory)
    # Multiqueue: each round its three contenders up at once, each job run by each in turn, so
    # that a same-round ratio compares runs seconds apart; new guests and backends every round
    # (see the docstring).
    timed_mq = tuple(job for job in timed if not args.only or "logwrites" in args.only)
    mq_runs: dict[str, list[dict]] = {}
    for round_number in range(args.mq_rounds if timed_mq else 0):
        with tempfile.TemporaryDirectory(prefix="lw-bench-mq-") as tmp:
            one_round = asyncio.run(measure_side_by_side(
                MQ_CONTENDERS, guest, Path(tmp), args.mq_runtime, args.size_mib, timed_mq,
                args.guest_mib, args.cpus, round_number, args.placement))
        for contender, figures in one_round.items():
            mq_runs.setdefault(contender, []).append(figures)
    figures = {contender: best_of(rounds) for contender, rounds in runs.items()}
    logs_dir = Path(tempfile.gettempdir())     # where the contenders' logs went
    routes = ({"direct": log_route(logs_dir, args.runtime, direct=True),
               "page_cache": log_route(logs_dir, args.runtime, direct=False)}
              if "seqwrite-1m-qd4" in jobs else {})
    first = next(iter(figures.values()), None) or next(iter(mq_runs.values()), [{}])[0]
    if not first:
        parser.error("nothing ran: give --rounds or --mq-rounds, and a job")
    env = {"qemu": qemu_version(), "cores": os.cpu_count(), "python": platform.python_version(),
           "accel": first["accel"], "guest_memory_mib": first["guest_memory_mib"],
           "guest_cpus": args.cpus, "placement": args.placement}
    if args.json:
        print(json.dumps({"environment": env, "figures": figures,
                          "verdicts": verdicts(figures, mq_runs, routes),
                          "log_routes": {name: vars(route) for name, route in routes.items()},
                          "rounds": runs,
                          "multiqueue_rounds": mq_runs}))
        return 0
    print(f"{env['qemu']}, accel {env['accel']}, {env['cores']} cores, guest "
          f"{env['guest_memory_mib']} MiB and {args.cpus} CPU, runtime {args.runtime} s per "
          f"timed job, best of {args.rounds} rounds (every other one in reverse order), "
          f"placement {args.placement}")
    ref = figures.get("qemu-storage-daemon", {}).get("jobs", {})
    blw = figures.get("blklogwrites", {}).get("jobs", {})
    for job in jobs:
        ran = {c: d["jobs"][job] for c, d in figures.items() if job in d["jobs"]}
        if not ran:
            continue
        print(f"{job}:")
        for contender, got in ran.items():
            print(job_line(contender, got, ref.get(job, {}), blw.get(job, {})))
    if routes:
        print_log_routes(figures, routes)
    print_paired(mq_runs, [job for job in jobs if job in JOBS])
    print_memory_job(figures)
    print("memory over the whole run (KiB):")
    for contender, data in figures.items():
        if data["memory_kib"]:
            print(f"  {contender:20s} " + "  ".join(f"{k} {v}" for k, v in
                                                    data["memory_kib"].items()))
    queues = {c: d for c, d in figures.items() if "queues" in d}
    if queues:
        print("queues (offered / started by the guest): " + ", ".join(
            f"{c} {d['queues']}/{d['queues_started']}" for c, d in queues.items()))
    print("verdicts (issue 7):")
    for line in verdicts(figures, mq_runs, routes):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
