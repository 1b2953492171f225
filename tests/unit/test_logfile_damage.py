"""Damaged logs: every case is exit 2 and one line naming the entry (or the super block), never
a traceback, for `inspect` and `replay`, in process and through a real subprocess."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from logwrites.cli import main
from logwrites.errors import LogFormatError, UsageError
from logwrites.format import ENTRY_HEADER, SUPER_BLOCK
from logwrites.logfile import LogReader, LogWriter

OPS = [("w", 0, 2, 0x11), ("f",), ("w", 4, 8, 0x22), ("m", "middle"), ("d", 0, 4),
       ("w", 16, 1, 0x33), ("f",)]


def header_at(log: Path, index: int, sectorsize: int) -> int:
    """Byte offset of entry `index`'s header."""
    with LogReader(log) as reader:
        for entry in reader.entries():
            if entry.index == index:
                return entry.data_offset - sectorsize
    raise AssertionError(index)


def patch(log: Path, offset: int, data: bytes) -> None:
    fd = os.open(log, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def set_super(log: Path, **fields: int) -> None:
    raw = log.read_bytes()[: SUPER_BLOCK.size]
    magic, version, nr_entries, sectorsize = SUPER_BLOCK.unpack(raw)
    values = {"magic": magic, "version": version, "nr_entries": nr_entries,
              "sectorsize": sectorsize, **fields}
    patch(log, 0, SUPER_BLOCK.pack(values["magic"], values["version"], values["nr_entries"],
                                   values["sectorsize"]))


def bad_magic(log: Path, ss: int) -> None:
    set_super(log, magic=0x1234)


def bad_version(log: Path, ss: int) -> None:
    set_super(log, version=2)


def odd_sectorsize(log: Path, ss: int) -> None:
    set_super(log, sectorsize=1000)


def unknown_flags(log: Path, ss: int) -> None:
    patch(log, header_at(log, 2, ss) + 16, struct.pack("<Q", 0x40))


def payload_past_eof(log: Path, ss: int) -> None:
    at = header_at(log, 5, ss)
    patch(log, at + 8, struct.pack("<Q", 1 << 20))  # nr_sectors far beyond the file


def truncated(log: Path, ss: int) -> None:
    os.truncate(log, header_at(log, 2, ss) + ss * 3)  # entry 2's payload cut short


def malformed(log: Path, ss: int) -> None:
    patch(log, header_at(log, 4, ss), ENTRY_HEADER.pack(0, 0, 0, 0))


def dirty_padding(log: Path, ss: int) -> None:
    patch(log, header_at(log, 5, ss) + ss - 1, b"\x01")


def count_beyond_room(log: Path, ss: int) -> None:
    set_super(log, nr_entries=10**6)


def count_beyond_entries(log: Path, ss: int) -> None:
    # Room for more headers (entry 2 is a big write), but the entries end before the count.
    set_super(log, nr_entries=len(OPS) + 1)


CASES: list[tuple[Callable[[Path, int], None], str]] = [
    (bad_magic, "log super block: bad magic"),
    (bad_version, "log super block: unknown version 2"),
    (odd_sectorsize, "log super block: sectorsize 1000 is not a power of two"),
    (unknown_flags, "log entry 2: unknown flag bits 0x40"),
    (payload_past_eof, "log entry 5: entry runs past the end of the log"),
    (truncated, "log entry 2: entry runs past the end of the log"),
    (malformed, "log entry 4: malformed entry"),
    (dirty_padding, "log entry 5: non-zero padding"),
    (count_beyond_room, "super block counts 1000000 entries"),
    (count_beyond_entries, f"log entry {len(OPS)}: log ends at byte"),
]


@pytest.mark.parametrize("sectorsize", [512, 4096])
@pytest.mark.parametrize(("damage", "message"), CASES, ids=[c[0].__name__ for c in CASES])
def test_damaged_log_is_one_line_and_exit_2(
        make_log, tmp_path: Path, capsys: pytest.CaptureFixture[str], sectorsize: int,
        damage: Callable[[Path, int], None], message: str) -> None:
    log = make_log(OPS, sectorsize)
    damage(log, sectorsize)
    base = bytes(range(256)) * 256
    target = tmp_path / "target.img"
    target.write_bytes(base)
    for argv in (["inspect", str(log)], ["inspect", "--json", str(log)],
                 ["replay", str(log), str(target)], ["replay", str(log), "--find",
                                                     "--end-mark", "nope"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
        assert "Traceback" not in err
    with pytest.raises(LogFormatError):
        with LogReader(log) as reader:
            for _ in reader.entries():
                pass


@pytest.mark.parametrize(("damage", "message"), CASES, ids=[c[0].__name__ for c in CASES])
def test_damaged_log_through_a_subprocess(make_log, damage: Callable[[Path, int], None],
                                          message: str) -> None:
    log = make_log(OPS, 512)
    damage(log, 512)
    done = subprocess.run([sys.executable, "-m", "logwrites.cli", "inspect", str(log)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_log_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope.log")]) == 2
    err = capsys.readouterr().err
    assert err == f"logwrites: {tmp_path / 'nope.log'}: No such file or directory\n"


@pytest.mark.parametrize("command", ["inspect", "replay"])
def test_a_directory_for_a_log_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        command: str) -> None:
    # Opening a directory succeeds; the first read fails, and would not name it.
    args = [command, str(tmp_path)] + ([str(tmp_path / "t.img")] if command == "replay" else [])
    assert main(args) == 2
    assert capsys.readouterr().err == f"logwrites: {tmp_path}: Is a directory\n"
    assert not (tmp_path / "t.img").exists()


def test_an_empty_file_is_not_a_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    assert main(["inspect", str(empty)]) == 2
    assert "too short for a super block" in capsys.readouterr().err


def test_a_log_is_not_created_on_a_fifo_or_an_unseekable_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match=r"^log .*fifo: a FIFO, not a regular file or block"):
        LogWriter.create(fifo, 512)
    # Refused before it is opened: "Illegal seek" came from the write, naming no filesystem.
    with pytest.raises(UsageError, match=r"^log /proc/self/status: a file on proc, a kernel "
                                         r"pseudo filesystem, not storage$"):
        LogWriter.create("/proc/self/status", 512)
