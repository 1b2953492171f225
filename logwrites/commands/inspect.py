"""`logwrites inspect LOG [--json]`: list a log's entries and sum them up.

The table streams (one line per entry as it is read), so memory stays flat however long the
log; the summary (a rich table) follows the last entry. `--json` prints one object per entry
with exactly the keys of DESIGN.md §8 and nothing else. A damaged log stops the listing at the
entry where it breaks, with one line on stderr and exit status 2 (raised to `cli.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console
from rich.table import Table

from logwrites.format import EntryFlag, flag_names
from logwrites.logfile import LogReader


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list a log's entries and a summary",
                       description="List a dm-log-writes log's entries, then a summary.")
    p.add_argument("log", help="the log file (or block device)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per entry (index, sector, nr_sectors, flags, "
                        "data_len, mark), nothing else")
    p.set_defaults(run=run)


@dataclass(slots=True)
class Summary:
    sectorsize: int
    entries: int = 0
    writes: int = 0
    flushes: int = 0
    fuas: int = 0
    discards: int = 0
    marks: int = 0
    payload_bytes: int = 0
    log_bytes_used: int = 0


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    with LogReader(args.log) as reader:
        summary = Summary(reader.sectorsize, log_bytes_used=reader.sectorsize)
        if args.json:
            _stream_json(reader, summary, out)
        else:
            _stream_table(reader, summary, out)
            out.flush()
            _print_summary(summary)
    return 0


def _count(summary: Summary, flags: int, payload: int, next_block: int) -> None:
    summary.entries += 1
    if payload:
        summary.writes += 1
        summary.payload_bytes += payload
    if flags & EntryFlag.FLUSH:
        summary.flushes += 1
    if flags & EntryFlag.FUA:
        summary.fuas += 1
    if flags & EntryFlag.DISCARD:
        summary.discards += 1
    if flags & EntryFlag.MARK:
        summary.marks += 1
    summary.log_bytes_used = next_block * summary.sectorsize


def _stream_json(reader: LogReader, summary: Summary, out: TextIO) -> None:
    dumps, write, sectorsize = json.dumps, out.write, reader.sectorsize
    for entry in reader.entries():
        write(dumps({
            "index": entry.index,
            "sector": entry.sector,
            "nr_sectors": entry.nr_sectors,
            "flags": flag_names(entry.flags),
            "data_len": entry.data_len,
            "mark": entry.mark,
        }))
        write("\n")
        _count(summary, entry.flags, entry.payload_blocks() * sectorsize,
               entry.next_block(sectorsize))


def _stream_table(reader: LogReader, summary: Summary, out: TextIO) -> None:
    # Fixed columns instead of one rich Table: a table is laid out only once all its rows are
    # known, which would hold the whole log in memory.
    width = max(5, len(str(max(reader.nr_entries - 1, 0))))
    row = f"{{:>{width}}}  {{:>12}}  {{:>10}}  {{:<20}}  {{:>8}}  {{}}"
    write, sectorsize = out.write, reader.sectorsize
    write(row.format("index", "sector", "nr_sectors", "flags", "data_len", "mark") + "\n")
    for entry in reader.entries():
        flags = entry.flags
        write(row.format(entry.index, entry.sector, entry.nr_sectors,
                         ",".join(flag_names(flags)) or "write", entry.data_len,
                         entry.mark if entry.mark is not None else "").rstrip() + "\n")
        _count(summary, flags, entry.payload_blocks() * sectorsize,
               entry.next_block(sectorsize))


def _print_summary(summary: Summary) -> None:
    table = Table(title="summary", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in (
        ("sectorsize", summary.sectorsize),
        ("entries", summary.entries),
        ("writes", summary.writes),
        ("flushes", summary.flushes),
        ("FUA", summary.fuas),
        ("discards", summary.discards),
        ("marks", summary.marks),
        ("payload bytes", summary.payload_bytes),
        ("log bytes used", summary.log_bytes_used),
    ):
        table.add_row(name, str(value))
    Console(highlight=False).print(table)
