"""The log writer alone: the cost of one guest FLUSH's log work, old paths against the one
the backend takes.

`per-entry` appends each parked record with its own pwritev and commits with the count synced
(two fdatasyncs), as the flush path once did; `batched` appends the records and the FLUSH entry
with one pwritev (`LogWriter.append_batch`) and defers the count's sync to the next commit
(`commit(sync_count=False)`), into a file that grows; `zeroed` is `batched` into room zeroed
ahead (`preallocate`, as `logwrites serve` does), so the commit's fdatasync need not write the
inode back. Shapes follow bench/backend.py's fio jobs. Prints wall and CPU time per flush and
per record. No asserts.

    .venv/bin/python bench/logwriter.py [--flushes 200] [--dir DIR]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from logwrites.commands.serve import LOG_ZERO_AHEAD
from logwrites.logfile import LogWriter

SHAPES = {  # name: (records per flush, payload bytes per record)
    "1 x 4 KiB": (1, 4096),
    "32 x 4 KiB": (32, 4096),
    "4 x 1 MiB": (4, 1 << 20),
}

VARIANTS = (  # name, batched, zeroed room ahead (bytes)
    ("per-entry", False, 0),
    ("batched", True, 0),
    ("zeroed", True, LOG_ZERO_AHEAD),
)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_run(log: Path, batched: bool, records: int, size: int, flushes: int,
            zero_ahead: int = 0) -> tuple[float, float]:
    payload = b"\x5a" * size
    nr = size // 512
    parked = [(i * nr, nr, 0, payload) for i in range(records)]
    with LogWriter.create(log, 512, preallocate=zero_ahead) as writer:
        wall, cpu = time.perf_counter(), cpu_seconds()
        for _ in range(flushes):
            if batched:
                writer.append_batch(parked, flush=True)
                writer.commit(sync_count=False)
            else:
                for sector, nr_sectors, flags, data in parked:
                    writer.append_write(sector, nr_sectors, [data], flags)
                writer.append_flush()
                writer.commit()
        return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flushes", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None, help="where the log goes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lw-writer-", dir=args.dir) as tmp:
        for shape, (records, size) in SHAPES.items():
            flushes = max(10, args.flushes * 4096 // size)
            for name, batched, zero_ahead in VARIANTS:
                wall, cpu = one_run(Path(tmp) / "log", batched, records, size, flushes,
                                    zero_ahead)
                print(f"{shape:11s} {name:9s} "
                      f"wall {wall / flushes * 1e3:6.2f} ms/flush  "
                      f"CPU {cpu / flushes * 1e3:6.3f} ms/flush  "
                      f"{cpu / (flushes * records) * 1e6:7.1f} us/record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
