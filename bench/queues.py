"""What offering more queues costs a single-queue stream: the backend's CPU per request with
one queue offered against four, the front-end starting one (as a one-CPU guest does).

No guest: the test front-end (`vhost/testing/frontend.py`) sends 4 KiB writes, then 4 KiB
reads, then 4 KiB writes each followed by a FLUSH (a quarter as many pairs), one request at a
time (queue depth 1, a kick each), to `logwrites serve` in logwrites mode.
Runs alternate between the two backends, each order in turn, so both see the same host.
In `bench/backend.py` the same comparison goes through a TCG guest and QEMU, whose cost per
request moves from run to run; this one measures only what the backend does with the queues.
Prints the backend's CPU time per request of every run and the ratio of the medians. No
asserts.

    .venv/bin/python bench/queues.py [--requests 20000] [--runs 4] [--queues 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.backend import cpu_seconds, round_order
from vhost.testing.daemons import LogwritesServe
from vhost.testing.frontend import BlkFrontend, read_parts

BLOCK = 4096
AREA_SECTORS = 200 << 11            # 200 MiB of the 256 MiB image, in 512-byte sectors
WARM_UP = 200
FLUSH_PAIRS_DIVISOR = 4             # write+FLUSH pairs per run: a quarter of --requests


def per_request(pid: int, requests: int, serve_one: Callable[[int], object]) -> float:
    """Backend CPU (µs) per request over `requests` calls of `serve_one(i)`."""
    before = cpu_seconds(pid)
    for i in range(requests):
        serve_one(i)
    return (cpu_seconds(pid) - before) / requests * 1e6


def measure(queues: int, requests: int) -> dict[str, float]:
    """One backend offering `queues` queues: CPU per 4 KiB write, per 4 KiB read and per
    request of a write+FLUSH pair. Its files go when it is done, so the next run does not share
    the host with their writeback."""
    with tempfile.TemporaryDirectory(prefix="lw-bench-queues-") as tmp:
        return measure_in(Path(tmp), queues, requests)


def measure_in(run_dir: Path, queues: int, requests: int) -> dict[str, float]:
    image = run_dir / "disk.img"
    with image.open("wb") as f:
        f.truncate(256 << 20)
    daemon = LogwritesServe(image, run_dir / "s.sock", run_dir / "log", run_dir,
                            extra_args=["--num-queues", str(queues)])
    daemon.start()
    try:
        assert daemon.proc is not None
        pid, data = daemon.proc.pid, os.urandom(BLOCK)
        with BlkFrontend(daemon.socket_path, timeout_s=20) as fe:
            for i in range(WARM_UP):
                fe.write(i * 8, data)
            write = per_request(pid, requests, lambda i: fe.write(i * 8 % AREA_SECTORS, data))
            read = per_request(pid, requests,
                               lambda i: fe.run_one(read_parts(i * 8 % AREA_SECTORS, BLOCK)))
            # A FLUSH syncs the log and the image: fewer pairs, each two requests.
            pairs = max(1, requests // FLUSH_PAIRS_DIVISOR)
            flushed = per_request(pid, pairs, lambda i: (fe.write(i * 8 % AREA_SECTORS, data),
                                                         fe.flush())) / 2
    finally:
        daemon.stop()
    return {"write": write, "read": read, "write+flush": flushed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000,
                        help="writes, then reads, per run (and a quarter as many write+FLUSH "
                             "pairs)")
    parser.add_argument("--runs", type=int, default=4, help="runs of each backend")
    parser.add_argument("--queues", type=int, default=4, help="queues the other backend offers")
    args = parser.parse_args()
    if min(args.requests, args.runs) < 1 or args.queues < 2:
        parser.error("--requests and --runs must be at least 1, --queues at least 2")
    figures: dict[int, list[dict[str, float]]] = {1: [], args.queues: []}
    for run in range(args.runs):
        for queues in round_order((1, args.queues), run):
            got = measure(queues, args.requests)
            figures[queues].append(got)
            print(f"{queues} queue(s) offered: write {got['write']:5.1f} µs  "
                  f"read {got['read']:5.1f} µs  write+flush {got['write+flush']:5.1f} µs of "
                  "backend CPU per request", flush=True)
    for kind in ("write", "read", "write+flush"):
        one = statistics.median(r[kind] for r in figures[1])
        many = statistics.median(r[kind] for r in figures[args.queues])
        ratio = f"x{many / one:.2f}" if one else "no ratio (too few requests for the CPU clock)"
        print(f"{kind}: median {one:.1f} µs with 1 queue, {many:.1f} µs with {args.queues}: "
              f"{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
