"""Whole-VM snapshots on our backend (issue 4 "Snapshots"): a booted, prepared guest on
`logwrites serve` is saved (QMP migration to a file) with a checkpoint of the backend (image
clone, log position, nothing unflushed); restoring it twice, each time with a new backend on a
clone of the checkpoint image and a new log, and running the same workload gives two logs that
hold the same writes — payloads included, and the payload comes from the guest's memory as it
was saved. `qmp.snapshot.save_vm_snapshot` refuses a moment when the guest has a completed write
no FLUSH has logged: the backend keeps those in memory only.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from logwrites.format import END_MARK
from logwrites.logfile import LogReader
from qmp.backend import ControlClient, ServeBackend
from qmp.errors import MachineError
from qmp.machine import Machine
from qmp.snapshot import VmSnapshot, clone_image, save_vm_snapshot

MiB = 1 << 20
RECORD = 4096

# Before the snapshot: random bytes in the guest's tmpfs (only its saved memory has them) and
# three records on the disk, each flushed.
PREPARE = f"""\
head -c {4 * RECORD} /dev/urandom > /tmp/payload
for i in 1 2 3; do
    dd if=/tmp/payload of="$LW_DEV" bs={RECORD} skip=$((i - 1)) seek=$i count=1 \\
        oflag=direct conv=fsync 2>/dev/null || exit 1
done
lw-report payload "$(sha256sum /tmp/payload | cut -d' ' -f1)"
"""

# After each restore: read back what was written before the snapshot, then write the payload
# elsewhere (flushed), a mark, and one write the guest never flushes (the volatile tail).
WORKLOAD = f"""\
lw-report before "$(dd if="$LW_DEV" bs={RECORD} skip=1 count=3 iflag=direct 2>/dev/null \\
    | sha256sum | cut -d' ' -f1)"
lw-report payload "$(sha256sum /tmp/payload | cut -d' ' -f1)"
dd if=/tmp/payload of="$LW_DEV" bs={RECORD} seek=100 oflag=direct conv=fsync 2>/dev/null || exit 1
lw-mark after-restore >/dev/null || exit 1
dd if=/tmp/payload of="$LW_DEV" bs={RECORD} count=1 seek=200 oflag=direct 2>/dev/null || exit 1
"""


def _writes(log: Path) -> list[tuple[int, int, int, str, bytes]]:
    """(sector, nr_sectors, flags, mark, payload) of every entry."""
    out = []
    with LogReader(log) as reader:
        for e in reader.entries():
            payload = reader.read_payload(e) if e.nr_sectors and not e.is_discard else b""
            out.append((e.sector, e.nr_sectors, int(e.flags), e.mark or "", payload))
    return out


@pytest.mark.slow
def test_same_workload_twice_from_one_snapshot_logs_the_same_writes(default_guest,
                                                                    tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    saved: dict[str, Any] = {}

    async def save() -> None:
        backend = ServeBackend(image, tmp_path / "log0", tmp_path / "b0")
        async with backend, Machine(default_guest, tmp_path / "saved", disk_socket=backend.socket,
                                    control_socket=backend.control) as m:
            assert backend.control is not None
            async with ControlClient(backend.control) as control:
                # Not yet: the guest has a write it never flushed. The backend keeps those in
                # memory only, and a restored backend would never log them.
                unflushed = await m.run(f"dd if=/dev/zero of=$LW_DEV bs={RECORD} count=1 "
                                        "seek=50 oflag=direct 2>/dev/null", timeout_s=120)
                assert unflushed.ok, unflushed.stderr
                with pytest.raises(MachineError, match="1 completed writes no FLUSH"):
                    await save_vm_snapshot(m, control, image, tmp_path / "refused")
                prepared = await m.run(PREPARE, timeout_s=120)
                assert prepared.ok, prepared.stderr
                saved["payload"] = prepared.reports["payload"]
                saved["snap"] = await save_vm_snapshot(m, control, image, tmp_path / "snap")
            await m.power_cut()

    async def restore(i: int) -> dict[str, str]:
        snap: VmSnapshot = saved["snap"]
        image_i = clone_image(snap.image, tmp_path / f"restored{i}.img")
        backend = ServeBackend(image_i, tmp_path / f"log{i}", tmp_path / f"b{i}")
        async with backend, Machine(default_guest, tmp_path / f"restored{i}", incoming=snap.state,
                                    disk_socket=backend.socket,
                                    control_socket=backend.control) as m:
            result = await m.run(WORKLOAD, timeout_s=120)
            assert result.ok, result.stderr
            await m.power_cut()
        return result.reports

    asyncio.run(save())
    snap = saved["snap"]
    assert snap.state.stat().st_size > 0
    with LogReader(tmp_path / "log0") as reader:
        # The saved run's log: the refused moment's write and then PREPARE's three records, each
        # with its FLUSH, are before the snapshot's position; the volatile tail and end after.
        before = list(reader.entries())[:snap.log_entries]
        assert [(e.sector, e.is_flush) for e in before if e.nr_sectors or e.is_flush] == [
            (400, False), (8, False), (0, True), (16, False), (0, True), (24, False), (0, True)]
        assert snap.log_bytes == before[-1].data_offset  # a FLUSH: no payload after its header
    reports = [asyncio.run(restore(i)) for i in (1, 2)]

    for got in reports:
        # The restored guest is the saved one: its tmpfs payload, and the disk it wrote before.
        assert got["payload"] == saved["payload"]
    assert reports[0]["before"] == reports[1]["before"]
    with snap.image.open("rb") as f:
        f.seek(RECORD)
        assert hashlib.sha256(f.read(3 * RECORD)).hexdigest() == reports[0]["before"]

    first, second = _writes(tmp_path / "log1"), _writes(tmp_path / "log2")
    assert first == second
    kinds = [(sector, flags, mark) for sector, _, flags, mark, _ in first]
    # The payload's four writes at block 100 and their FLUSH, the mark, the volatile tail at
    # block 200, the end mark.
    assert kinds == [(800, 0, ""), (808, 0, ""), (816, 0, ""), (824, 0, ""), (0, 1, ""),
                     (0, 8, "after-restore"), (1600, 0, ""), (0, 8, END_MARK)]
    # The bytes written after each restore are the saved guest's tmpfs payload.
    assert hashlib.sha256(b"".join(e[4] for e in first[:4])).hexdigest() == saved["payload"]
