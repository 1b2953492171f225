"""Crashes at an exact point of the log, checked against the log and against what the guest saw
complete (DESIGN §6, issue 4 "Crashes").

One boot, two points (and a third through `logwrites run --crash-at entry:N`). The guest writes
numbered 4 KiB records straight to its disk (O_DIRECT), most followed by a FLUSH
(`conv=fsync`), and says on the console which ones returned. First the backend stops at the
k-th FLUSH: while it holds, the log ends at that FLUSH, the guest has seen no record past it
complete and the next record is not even on the image; then the run goes on. Then it stops at
a mark the guest inserts, and the machine is cut: past the mark the log holds only the volatile
tail (a write the guest saw complete *before* the mark, never flushed) and the end mark; the
record the guest wrote after the mark is nowhere.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from logwrites.format import END_MARK, Entry
from logwrites.logfile import LogReader
from qmp.backend import ControlClient, ServeBackend
from qmp.machine import Machine

MiB = 1 << 20
RECORD = 4096
LOOP = 8             # records 1..LOOP, each with a FLUSH
VOLATILE = 20        # written after the loop without a FLUSH
AFTER_MARK = 21      # written (with a FLUSH) after the mark
MARK = "before-crash"
FLUSH_POINT = 3      # stop at the 3rd FLUSH of the workload

WORKLOAD = f"""\
rec() {{
    {{ printf 'record-%d\\n' "$1"; head -c {RECORD} /dev/zero; }} | head -c {RECORD} > /tmp/r
    dd if=/tmp/r of="$LW_DEV" bs={RECORD} seek="$1" oflag=direct $2 2>/dev/null || exit 1
    echo "lw-done $1" > /dev/console
}}
i=1
while [ $i -le {LOOP} ]; do rec $i conv=fsync; i=$((i + 1)); done
rec {VOLATILE}
lw-mark {MARK} >/dev/null || exit 1
echo "lw-marked {MARK}" > /dev/console
rec {AFTER_MARK} conv=fsync
"""


def _record(n: int) -> bytes:
    return (f"record-{n}\n".encode() + bytes(RECORD))[:RECORD]


def _on_image(image: Path, n: int) -> bytes:
    with image.open("rb") as f:
        f.seek(n * RECORD)
        return f.read(RECORD)


def _log(path: Path) -> list[Entry]:
    with LogReader(path) as reader:
        return list(reader.entries())


def _record_of(entry: Entry) -> int | None:
    """The record number a write entry carries (512-byte log blocks: 8 per record)."""
    if entry.is_mark or entry.is_discard or not entry.nr_sectors:
        return None
    assert (entry.sector % 8, entry.nr_sectors) == (0, 8), entry
    return entry.sector // 8


def _done(console: Path) -> list[int]:
    """The records the guest saw complete, in order, from its console lines."""
    return [int(n) for n in re.findall(r"^lw-done (\d+)", console.read_text(errors="replace"),
                                       re.MULTILINE)]


async def _stopped(events: Any) -> dict[str, Any]:
    async for event in events:
        if event.get("event") == "stopped":
            return dict(event)
    raise AssertionError("the control socket closed before the stop point")


@pytest.mark.slow
def test_crash_at_flush_then_at_mark(default_guest, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    log_path = tmp_path / "log"
    console = tmp_path / "run" / "console.log"
    held: dict[str, Any] = {}

    async def scenario() -> dict[str, Any]:
        backend = ServeBackend(image, log_path, tmp_path / "b")
        async with backend, Machine(default_guest, tmp_path / "run", disk_socket=backend.socket,
                                    control_socket=backend.control) as m:
            assert backend.control is not None
            control = ControlClient(backend.control)
            watcher = ControlClient(backend.control)
            events = watcher.subscribe()
            flushes_before = (await control.status())["flushes"]
            point = flushes_before + FLUSH_POINT
            await control.stop_at(f"flush:{point}")
            # A subscriber that comes after the stop still hears of it: no race here.
            first = asyncio.ensure_future(_stopped(events))
            await m.run(WORKLOAD, timeout_s=300, wait=False)
            event = await asyncio.wait_for(first, 240)
            await m.stop()  # as `logwrites run --crash-at` does: the vCPUs stop too
            status = await control.status()
            held.update(event=event, status=status, flushes=point, done=_done(console),
                        log=_log(log_path), next_record=_on_image(image, FLUSH_POINT + 1))
            # Go on to the second point: arm it before the vCPUs run again.
            await control.request("resume")
            await control.stop_at(f"mark:{MARK}")
            second = asyncio.ensure_future(_stopped(events))
            await m.cont()
            event2 = await asyncio.wait_for(second, 240)
            await m.stop()
            await m.power_cut()
            await control.close()
            await watcher.close()
        # The backend stopped cleanly after the cut: volatile tail, then the end mark.
        return event2

    event2 = asyncio.run(scenario())

    # -- the first point: the FLUSH_POINT-th FLUSH, while the backend held the guest --------------
    entries, event = held["log"], held["event"]
    flushes = [e for e in entries if e.is_flush and not e.nr_sectors]
    assert event["at"] == f"flush:{held['flushes']}"
    assert held["status"]["held"] is True
    # The log ends at the point: the stopped entry is the last logged, and it is that FLUSH.
    assert held["status"]["entries"] == event["entry"] + 1 == len(entries)
    assert entries[-1].index == event["entry"] and entries[-1] is flushes[-1]
    assert len(flushes) == held["flushes"]
    logged = [r for r in map(_record_of, entries) if r is not None]
    assert logged == list(range(1, FLUSH_POINT + 1))
    # What the guest saw complete is in the log at or before the point; at most the last
    # record's console line may not have been printed before the vCPUs stopped.
    assert held["done"] in (list(range(1, FLUSH_POINT + 1)), list(range(1, FLUSH_POINT)))
    # The next record was not completed, nor even written to the image.
    assert held["next_record"] == bytes(RECORD)

    # -- the second point: the guest's mark, then a power cut ------------------------------------
    final = _log(log_path)
    assert final[:len(entries)] == entries  # the run went on after the first point
    assert event2["at"] == f"mark:{MARK}"
    at = final[event2["entry"]]
    assert at.is_mark and at.mark == MARK
    past = final[at.index + 1:]
    # Past the mark: the write the guest saw complete before the mark (never flushed: the
    # volatile tail, logged after the mark as DESIGN §3.5-6 say), then the end mark. Nothing
    # the guest did after the mark.
    assert [_record_of(e) for e in past] == [VOLATILE, None]
    assert past[-1].is_mark and past[-1].mark == END_MARK
    before = [r for r in map(_record_of, final[:at.index]) if r is not None]
    assert before == list(range(1, LOOP + 1))
    done = _done(console)
    assert done == [*range(1, LOOP + 1), VOLATILE]
    text = console.read_text(errors="replace")
    if f"lw-marked {MARK}" in text:  # lw-mark returned before the vCPUs stopped
        assert text.index(f"lw-done {VOLATILE}") < text.index(f"lw-marked {MARK}")
    assert AFTER_MARK not in done
    assert _on_image(image, AFTER_MARK) == bytes(RECORD)
    for n in (*range(1, LOOP + 1), VOLATILE):
        assert _on_image(image, n) == _record(n)


@pytest.mark.slow
def test_run_crash_at_entry_cli(default_guest, tmp_path: Path) -> None:
    """`logwrites run --crash-at entry:N`: the machine is cut when the log reaches entry N; the
    summary names the point, and nothing past it reached the guest, the log or the image."""
    workload = tmp_path / "records.sh"
    workload.write_text(WORKLOAD)
    out = tmp_path / "out"
    # Per record a write and its FLUSH: entry 5 is the FLUSH of record 3.
    done = subprocess.run([sys.executable, "-m", "logwrites.cli", "run", "--workload",
                           str(workload), "--crash-at", "entry:5", "--size", "64", "--out",
                           str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["crash"], summary["qemu_status"]) == ("power-cut", -9)
    assert summary["stopped_at"]["entry"] == 5 and "result" not in summary
    assert "stopped at entry 5" in done.stdout
    entries = _log(out / "log")
    assert [_record_of(e) for e in entries] == [1, None, 2, None, 3, None, None]
    assert entries[5].is_flush and entries[-1].mark == END_MARK
    assert _done(out / "console.log") in ([1, 2, 3], [1, 2])
    assert _on_image(out / "disk.img", 4) == bytes(RECORD)
    assert _on_image(out / "disk.img", 3) == _record(3)
    assert _on_image(out / "base.img", 1) == bytes(RECORD)  # the base stays as it was
