"""`logwrites inspect`: the table streams, the summary adds up, `--json` is exactly §8's keys."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from logwrites.cli import main
from logwrites.commands import inspect as inspect_command
from logwrites.format import EntryFlag
from logwrites.logfile import LogReader, LogWriter

OPS = [("w", 0, 2, 0x11), ("fua", 8, 1, 0x22), ("d", 0, 4), ("z", 3, 2), ("f",),
       ("m", "after-setup"), ("w", 100, 3, 0x44)]


@pytest.mark.parametrize("sectorsize", [512, 4096])
def test_json_lines_have_exactly_the_design_keys(
        make_log, capsys: pytest.CaptureFixture[str], sectorsize: int) -> None:
    log = make_log(OPS, sectorsize)
    assert main(["inspect", "--json", str(log)]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows == [
        {"index": 0, "sector": 0, "nr_sectors": 2, "flags": [], "data_len": 0, "mark": None},
        {"index": 1, "sector": 8, "nr_sectors": 1, "flags": ["fua"], "data_len": 0,
         "mark": None},
        {"index": 2, "sector": 0, "nr_sectors": 4, "flags": ["discard"], "data_len": 0,
         "mark": None},
        {"index": 3, "sector": 3, "nr_sectors": 2, "flags": [], "data_len": 0, "mark": None},
        {"index": 4, "sector": 0, "nr_sectors": 0, "flags": ["flush"], "data_len": 0,
         "mark": None},
        {"index": 5, "sector": 0, "nr_sectors": 0, "flags": ["mark"], "data_len": 11,
         "mark": "after-setup"},
        {"index": 6, "sector": 100, "nr_sectors": 3, "flags": [], "data_len": 0, "mark": None},
    ]


@pytest.mark.parametrize("sectorsize", [512, 4096])
def test_table_and_summary(make_log, capsys: pytest.CaptureFixture[str], sectorsize: int) -> None:
    log = make_log(OPS, sectorsize)
    assert main(["inspect", str(log)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["index", "sector", "nr_sectors", "flags", "data_len", "mark"]
    assert lines[2].split() == ["1", "8", "1", "fua", "0"]
    assert lines[6].split() == ["5", "0", "0", "mark", "11", "after-setup"]
    summary = {}
    for line in lines[8:]:
        *name, value = line.split()
        if value.isdigit():
            summary[" ".join(name)] = int(value)
    payload_blocks = 2 + 1 + 2 + 3
    assert summary == {
        "sectorsize": sectorsize, "entries": 7, "writes": 4, "flushes": 1, "FUA": 1,
        "discards": 1, "marks": 1, "payload bytes": payload_blocks * sectorsize,
        "log bytes used": (1 + 7 + payload_blocks) * sectorsize,
    }
    assert log.stat().st_size == summary["log bytes used"]


def _peak_while_streaming(log: Path, stream) -> int:
    class Sink:
        def write(self, text: str) -> int:
            return len(text)

    tracemalloc.start()
    try:
        with LogReader(log) as reader:
            summary = inspect_command.Summary(reader.sectorsize)
            stream(reader, summary, Sink())
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _long_log(path: Path, writes: int) -> Path:
    with LogWriter.create(path, 512) as writer:
        for i in range(writes):
            writer.append_write(i % 1000, 1, [b"\x5a" * 512], EntryFlag.FUA if i % 7 == 0 else 0)
            if i % 100 == 0:
                writer.append_flush()
        writer.commit()
    return path


@pytest.mark.parametrize("stream", [inspect_command._stream_json, inspect_command._stream_table])
def test_inspect_streams_with_flat_memory(tmp_path: Path, stream) -> None:
    short = _peak_while_streaming(_long_log(tmp_path / "short.log", 1_000), stream)
    long = _peak_while_streaming(_long_log(tmp_path / "long.log", 20_000), stream)
    # 20 times the entries, the same memory (the read buffer dominates)
    assert long < 3 << 20 and long - short < 64 << 10, (short, long)
