"""Whole-VM snapshots on our backend (issue 4 "Snapshots"): a booted, prepared guest on
`logwrites serve` is saved (QMP migration to a file) with a checkpoint of the backend (image
clone, log copy, log position) at a moment when the guest has a completed write no FLUSH has
logged. Pausing stops the vhost-user device and the backend logs that write then, as the
volatile tail, so the checkpoint holds nothing in memory only. Restoring twice, each time with
`serve --resume` on copies of the checkpoint, and running the same workload gives two logs that
continue the saved one and hold the same writes after the snapshot point — payloads included,
the payload coming from the guest's memory as it was saved. A backend that still held
unflushed records at the checkpoint, with no journal of them, is refused.
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
from qmp.snapshot import VmSnapshot, restore_files, save_vm_snapshot

MiB = 1 << 20
RECORD = 4096

# Before the snapshot: random bytes in the guest's tmpfs (only its saved memory has them), three
# records on the disk, each flushed, and a fourth block written at block 50 but never flushed.
PREPARE = f"""\
head -c {4 * RECORD} /dev/urandom > /tmp/payload
for i in 1 2 3; do
    dd if=/tmp/payload of="$LW_DEV" bs={RECORD} skip=$((i - 1)) seek=$i count=1 \\
        oflag=direct conv=fsync 2>/dev/null || exit 1
done
dd if=/tmp/payload of="$LW_DEV" bs={RECORD} skip=3 seek=50 count=1 oflag=direct 2>/dev/null
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


def _writes(log: Path, start: int = 0) -> list[tuple[int, int, int, str, bytes]]:
    """(sector, nr_sectors, flags, mark, payload) of every entry from `start`."""
    out = []
    with LogReader(log) as reader:
        for e in reader.entries():
            if e.index < start:
                continue
            payload = reader.read_payload(e) if e.nr_sectors and not e.is_discard else b""
            out.append((e.sector, e.nr_sectors, int(e.flags), e.mark or "", payload))
    return out


class _Unflushed:
    """A control client whose (paused) backend still holds one unflushed write."""

    async def status(self) -> dict[str, int]:
        return {"unflushed": 1, "entries": 7, "log_bytes": 4096}


class _Pausing:
    """A machine whose save_state only calls the checkpoint, as the real one does once paused."""

    async def save_state(self, path: Path, checkpoint: Any = None) -> None:
        await checkpoint()


def test_snapshot_refused_with_unflushed_writes_and_no_journal(tmp_path: Path) -> None:
    """Records the backend holds in memory only would be lost to every restore: refused."""
    log = tmp_path / "log"
    log.write_bytes(b"")  # a log, but no log.pending beside it
    with pytest.raises(MachineError, match=r"1 completed writes no FLUSH.*--pending-journal"):
        asyncio.run(save_vm_snapshot(_Pausing(), _Unflushed(), tmp_path / "image",  # type: ignore
                                     tmp_path / "snap", log=log))
    assert not (tmp_path / "snap" / "image.img").exists()


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
                prepared = await m.run(PREPARE, timeout_s=120)
                assert prepared.ok, prepared.stderr
                saved["payload"] = prepared.reports["payload"]
                assert (await control.status())["unflushed"] == 1
                saved["snap"] = await save_vm_snapshot(m, control, image, tmp_path / "snap",
                                                       log=tmp_path / "log0")
            await m.power_cut()

    async def restore(i: int) -> dict[str, str]:
        snap: VmSnapshot = saved["snap"]
        image_i, log_i = restore_files(snap, tmp_path / f"r{i}")
        assert log_i is not None
        backend = ServeBackend(image_i, log_i, tmp_path / f"b{i}", extra_args=snap.resume_args)
        async with backend, Machine(default_guest, tmp_path / f"restored{i}", incoming=snap.state,
                                    disk_socket=backend.socket,
                                    control_socket=backend.control) as m:
            result = await m.run(WORKLOAD, timeout_s=120)
            assert result.ok, result.stderr
            await m.power_cut()
        return result.reports

    asyncio.run(save())
    snap = saved["snap"]
    assert snap.state.stat().st_size > 0 and snap.log is not None
    # The saved log up to the snapshot: PREPARE's three records, each with its FLUSH, then the
    # write at block 50, logged as the volatile tail when the pause stopped the device.
    before = _writes(snap.log)
    assert len(before) == snap.log_entries and snap.resume_args == ("--resume",)
    assert [(sector, flags) for sector, _, flags, _, _ in before] == [
        (8, 0), (0, 1), (16, 0), (0, 1), (24, 0), (0, 1), (400, 0)]
    reports = [asyncio.run(restore(i)) for i in (1, 2)]

    for got in reports:
        # The restored guest is the saved one: its tmpfs payload, and the disk it wrote before.
        assert got["payload"] == saved["payload"]
    assert reports[0]["before"] == reports[1]["before"]
    with snap.image.open("rb") as f:
        f.seek(RECORD)
        assert hashlib.sha256(f.read(3 * RECORD)).hexdigest() == reports[0]["before"]

    logs = [tmp_path / f"r{i}" / "log" for i in (1, 2)]
    for log in logs:
        assert _writes(log)[:snap.log_entries] == before  # each continues the saved log
    first, second = (_writes(log, snap.log_entries) for log in logs)
    assert first == second
    kinds = [(sector, flags, mark) for sector, _, flags, mark, _ in first]
    # The payload's four writes at block 100, their FLUSH, the mark, the volatile tail at block
    # 200, the end mark.
    assert kinds == [(800, 0, ""), (808, 0, ""), (816, 0, ""), (824, 0, ""), (0, 1, ""),
                     (0, 8, "after-restore"), (1600, 0, ""), (0, 8, END_MARK)]
    # The bytes written are the saved guest's tmpfs payload (block 50 before the snapshot: its
    # fourth block).
    assert hashlib.sha256(b"".join(e[4] for e in first[:4])).hexdigest() == saved["payload"]
    assert before[-1][4] == first[3][4]
