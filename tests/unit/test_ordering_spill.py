"""Parked payloads beyond the in-memory budget go to a spill file and reach the log unchanged:
the same log bytes as with everything parked in memory, for flushes and the volatile tail."""

from __future__ import annotations

from pathlib import Path

import pytest

from logwrites.logfile import LogReader, LogWriter
from vhost import ordering


def _run(log: Path) -> None:
    writer = LogWriter.create(log, 512)
    sink = ordering.make_sink("logwrites", writer)
    guest = bytearray(8 * 512)
    for i in range(12):
        guest[:] = bytes([i + 1]) * len(guest)
        view = memoryview(guest)
        sink.completed(i * 8, 8, 0, [view[:1024], view[1024:]])
        guest[:] = b"\xff" * len(guest)  # the guest reuses its buffer after completion
        if i % 5 == 4:
            sink.flush_durable(sink.flush_taken())
    sink.completed(200, 4, ordering.DISCARD, None)
    sink.close()  # volatile tail, then the end mark
    writer.close()


@pytest.mark.parametrize("budget", [0, 3 * 4096])
def test_spilled_payloads_log_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            budget: int) -> None:
    _run(tmp_path / "memory.log")
    monkeypatch.setattr(ordering, "PARK_IN_MEMORY", budget)
    _run(tmp_path / "spilled.log")
    assert (tmp_path / "spilled.log").read_bytes() == (tmp_path / "memory.log").read_bytes()
    with LogReader(tmp_path / "spilled.log") as reader:
        payloads = [reader.read_payload(e)[:1] for e in reader.entries() if e.has_payload]
    assert payloads == [bytes([i + 1]) for i in range(12)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.log", "spilled.log"]
