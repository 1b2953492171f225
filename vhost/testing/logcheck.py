"""What a backend's log says, in the front-end's units, for tests to compare with what they sent.

`log_records` turns a log into `LogRecord`s in bytes (entry sectors are `sectorsize` units,
converted here once); `replay` applies them to an initial image. Requests that failed must
not be there (DESIGN.md §3.8), and every write record must be a write some request completed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from logwrites.format import EntryFlag
from logwrites.logfile import LogReader


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One entry: `kind` is write|discard|flush|mark; offsets and lengths in bytes."""

    index: int
    kind: str
    byte_offset: int = 0
    nbytes: int = 0
    sha: str = ""            # sha256 of a write's payload
    fua: bool = False
    mark: str | None = None


def log_records(log_path: Path) -> tuple[int, list[LogRecord], list[bytes]]:
    """(sectorsize, records, payloads) of every counted entry; payloads[i] is b"" if none."""
    records, payloads = [], []
    with LogReader(log_path) as reader:
        sectorsize = reader.sectorsize
        for entry in reader.entries():
            byte_offset = entry.sector * sectorsize
            nbytes = entry.nr_sectors * sectorsize
            fua = bool(entry.flags & EntryFlag.FUA)
            data = b""
            if entry.flags & EntryFlag.MARK:
                rec = LogRecord(entry.index, "mark", mark=entry.mark)
            elif entry.flags & EntryFlag.FLUSH and not entry.nr_sectors:
                rec = LogRecord(entry.index, "flush")
            elif entry.flags & EntryFlag.DISCARD:
                rec = LogRecord(entry.index, "discard", byte_offset, nbytes)
            else:
                data = reader.read_payload(entry)
                rec = LogRecord(entry.index, "write", byte_offset, nbytes,
                                hashlib.sha256(data).hexdigest(), fua)
            records.append(rec)
            payloads.append(data)
    return sectorsize, records, payloads


def replay(initial: bytes, records: list[LogRecord], payloads: list[bytes]) -> bytearray:
    """The image after applying every write; discarded ranges are left as they were."""
    image = bytearray(initial)
    for rec, data in zip(records, payloads, strict=True):
        if rec.kind == "write":
            image[rec.byte_offset:rec.byte_offset + rec.nbytes] = data
    return image
