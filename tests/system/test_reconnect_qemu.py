"""A backend killed and restarted under a running QEMU guest (issue 6, "Reconnect"): QEMU's
disk chardev reconnects, keeps the in-flight region (INFLIGHT_SHMFD), and libvhost-user in the
restarted backend (`serve --resume --pending-journal`) resubmits what was popped but never
published. The guest runs fio with crc32c verification on its raw disk while the test kills
the backend with SIGKILL 10 times; fio must see no I/O error and verify, and the log must
hold every write fio made exactly once and replay to the image.

A third of the kills come at random moments; the others are failpoints of the backend (see
vhost/pending.py) that kill it inside the windows where a request is done but unpublished —
right after a batch's journal records count, and right after a FLUSH's log commit — so that
QEMU resubmits requests the backend already recorded, which must not be logged again.

Each fio run writes its own 4 MiB region once (random order, no block twice: fio's random
map), and the guest block layer does not merge requests (`nomerges`), so the log must hold
exactly one 4 KiB write entry per block of the regions fio finished, nothing else.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Final

import pytest

from logwrites.logfile import LogReader
from qmp.backend import BackendError, ControlClient, ServeBackend
from qmp.machine import Machine, PlainDisk
from tests.conftest import require_tool
from vhost.pending import FAILPOINT_ENV

MiB = 1 << 20
DISK = 512 * MiB
REGION = 4 * MiB            # one fio run: 1024 writes of 4 KiB, each block once
BLOCK = 4096
KILLS = 10
WORKLOAD_MAX_S = 300        # the guest stops starting fio runs then, at the latest
STOP: Final = b"STOP"       # ... or once the test writes this at the start of its flag disk

# Run i writes region i (sparse image: untouched regions cost nothing), verifies it at the end
# (crc32c in every block, fatal on the first mismatch), FLUSHes every 32 writes. Between runs
# the guest reads its second disk (vdb, served by QEMU itself, not by the backend under test):
# the test writes STOP there once it is done killing.
FIO = f"""
echo 2 > /sys/block/vda/queue/nomerges
end=$(( $(cut -d. -f1 /proc/uptime) + {WORKLOAD_MAX_S} ))
stopped() {{ dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | grep -q {STOP.decode()}; }}
i=0
while ! stopped && [ $(cut -d. -f1 /proc/uptime) -lt $end ] && [ $i -lt {DISK // REGION} ]; do
    fio --name=run$i --filename=$LW_DEV --rw=randwrite --bs={BLOCK} --size={REGION} \\
        --offset=$(( i * {REGION} )) --direct=1 --ioengine=libaio --iodepth=8 \\
        --fsync=32 --verify=crc32c --verify_fatal=1 --randseed=$(( i + 1 )) \\
        > /tmp/fio.out 2>&1 || {{ echo "fio run $i failed"; cat /tmp/fio.out; exit 1; }} >&2
    grep -q "err= 0" /tmp/fio.out || {{ echo "fio run $i: errors"; cat /tmp/fio.out; exit 1; }} >&2
    i=$(( i + 1 ))
done
lw-report runs $i
"""


def replay_to(log: Path, target: Path) -> Path:
    """`logwrites replay LOG TARGET` onto a fresh zeroed image."""
    with target.open("wb") as f:
        f.truncate(DISK)
    done = subprocess.run([sys.executable, "-m", "logwrites.cli", "replay", str(log),
                           str(target)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return target


def same_files(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            ca, cb = fa.read(MiB), fb.read(MiB)
            if ca != cb:
                return False
            if not ca:
                return True


async def serving(backend: ServeBackend, at_least: int, timeout_s: float = 60.0) -> bool:
    """Wait until the (re)started backend has a front-end and served `at_least` writes; False
    if it died first (its failpoint)."""
    assert backend.control is not None and backend.proc is not None
    deadline = time.monotonic() + timeout_s
    try:
        async with ControlClient(backend.control, timeout_s=10) as control:
            while True:
                status = await control.status()
                if status["connected"] and int(status["requests"]["out"]) >= at_least:
                    return True
                assert time.monotonic() < deadline, f"backend idle after restart: {status}"
                await asyncio.sleep(0.1)
    except (ConnectionError, BackendError):
        await asyncio.sleep(0.5)
        if backend.proc.returncode is not None:
            return False
        raise


@pytest.mark.slow
def test_ten_backend_kills_under_fio_verify(default_guest, tmp_path: Path) -> None:
    require_tool("qemu-system-x86_64", "qemu-system-x86")
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    image, log = tmp_path / "disk.img", tmp_path / "log"
    with image.open("wb") as f:
        f.truncate(DISK)
    flag = tmp_path / "flag.img"
    flag.write_bytes(bytes(1 << 20))
    kills: list[int | None] = []
    # How each backend dies: its own failpoint (published:N, flushed:N) or the test's SIGKILL.
    plans: list[str | None] = [
        (f"published:{rng.randint(2, 40)}", f"flushed:{rng.randint(1, 6)}", None)[k % 3]
        for k in range(KILLS)]
    ready_lines: list[str] = []
    outage_s: list[float] = []
    runs = 0
    started = time.monotonic()

    async def scenario() -> None:
        nonlocal runs
        backend = ServeBackend(image, log, tmp_path / "b", verbose=True,
                               extra_args=["--pending-journal"])
        backend.env = {FAILPOINT_ENV: plans[0]} if plans[0] else {}
        async with backend:
            assert backend.control is not None
            async with Machine(default_guest, tmp_path / "m", disk_socket=backend.socket,
                               control_socket=backend.control, cpus=1,
                               disks=[PlainDisk(flag)]) as m:
                await m.run(FIO, timeout_s=WORKLOAD_MAX_S + 240, wait=False)
                for k, plan in enumerate(plans):
                    assert backend.proc is not None
                    if plan is None:
                        # Kill while fio runs, after the backend served some writes, at a
                        # random moment.
                        await serving(backend, rng.randint(1, 200))
                        await asyncio.sleep(rng.uniform(0.0, 1.5))
                    else:
                        await asyncio.wait_for(backend.proc.wait(), 120)
                    kills.append(await backend.kill())
                    following = plans[k + 1] if k + 1 < KILLS else None
                    backend.env = {FAILPOINT_ENV: following} if following else {}
                    down = time.monotonic()
                    await asyncio.sleep(rng.uniform(0.0, 0.5))
                    await backend.restart()
                    ready_lines.append(backend.ready_line)
                    if await serving(backend, 1):
                        outage_s.append(time.monotonic() - down)
                # A fio run's worth of writes on the last backend (so at least two runs),
                # then STOP: the guest finishes the run it is in.
                await serving(backend, REGION // BLOCK, timeout_s=180)
                with flag.open("r+b") as f:
                    f.write(STOP)
                result = await m.result()
                assert result.ok, f"seed {seed}: {result.stderr}"
                runs = int(result.reports["runs"])
                await m.quit()
            assert await backend.stop() == 0

    asyncio.run(scenario())
    elapsed = time.monotonic() - started
    assert kills == [-signal.SIGKILL] * KILLS, kills
    assert runs >= 2, f"seed {seed}: only {runs} fio runs"

    # Every block fio wrote is in the log exactly once, and nothing else was written.
    written: Counter[int] = Counter()
    flushes = 0
    with LogReader(log) as reader:
        sectorsize = reader.sectorsize
        for entry in reader.entries():
            if entry.is_mark:
                continue
            if entry.is_flush and not entry.nr_sectors:
                flushes += 1
                continue
            assert not entry.is_discard and entry.nr_sectors * sectorsize == BLOCK, entry
            written[entry.sector * sectorsize] += 1
    doubled = {offset: n for offset, n in written.items() if n > 1}
    assert not doubled, f"seed {seed}: blocks logged more than once: {sorted(doubled)[:10]}"
    blocks = runs * REGION // BLOCK
    expected = set(range(0, runs * REGION, BLOCK))
    missing = expected - written.keys()
    assert not missing, f"seed {seed}: {len(missing)} blocks fio wrote are not in the log"
    extra = written.keys() - expected
    # A run cut short by the workload's end would leave a partial region; fio runs complete.
    assert not extra, f"seed {seed}: {len(extra)} logged blocks outside the fio runs"
    assert len(written) == blocks
    # The log still describes the image.
    assert same_files(replay_to(log, tmp_path / "replayed.img"), image), seed

    text = (tmp_path / "b" / "serve.log").read_text(errors="replace")
    resubmitted = sum(int(n) for n in re.findall(r"(\d+) requests resubmitted", text))
    already = sum(int(n) for n in re.findall(r"(\d+) of them already done", text))
    # The failpoints left done, unpublished requests: QEMU resubmitted them, none was logged
    # twice (checked above), so they were completed without being served again.
    assert already > 0, f"seed {seed}: no resubmission was already done ({resubmitted})"
    restored = sum(int(n) for n in re.findall(r"restored=(\d+)", " ".join(ready_lines)))
    print(f"\nseed {seed}: reconnects survived with nothing lost and nothing doubled: "
          f"{len(kills)}/{KILLS} ({', '.join(p or 'random' for p in plans)}); "
          f"{runs} fio runs verified ({blocks} writes, each logged "
          f"once; {flushes} FLUSH entries); {resubmitted} requests resubmitted by QEMU's "
          f"in-flight region, {already} of them already done (completed without logging), "
          f"{restored} records restored from the pending journal; outage per restart "
          f"{min(outage_s):.1f}-{max(outage_s):.1f} s; {elapsed:.0f} s in all")
    shutil.rmtree(tmp_path / "m", ignore_errors=True)
