"""The replay engine: start/stop semantics (replay-log's), discards, checks, skipping by header."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from logwrites.format import EntryFlag
from logwrites.logfile import LogReader, LogWriter
from logwrites.replay import (
    MarkNotFound,
    ReplayCheckFailed,
    ReplayError,
    StopNotFound,
    apply_entry,
    find_stop,
    replay,
    resolve_start,
)

IMAGE_BYTES = 1 << 20


def repeated(byte: int, nbytes: int) -> bytes:
    return bytes([byte]) * nbytes


def build_log(path: Path, sectorsize: int, ops: Sequence[tuple],
              fill: Callable[[int, int], bytes] = repeated) -> None:
    """ops: ("w", sector, nr_sectors, seed[, flags]) | ("z", sector, nr) | ("d", sector, nr)
    | ("f",) | ("m", name); a write's payload is `fill(seed, its bytes)`."""
    with LogWriter.create(path, sectorsize) as writer:
        for op in ops:
            if op[0] == "w":
                flags = op[4] if len(op) > 4 else 0
                writer.append_write(op[1], op[2], [fill(op[3], op[2] * sectorsize)], flags)
            elif op[0] == "z":
                writer.append_zeroes(op[1], op[2])
            elif op[0] == "d":
                writer.append_discard(op[1], op[2])
            elif op[0] == "f":
                writer.append_flush()
            else:
                writer.append_mark(op[1])
        writer.commit()


def model(base: bytes, sectorsize: int, ops: Sequence[tuple],
          fill: Callable[[int, int], bytes] = repeated) -> bytes:
    """The image after applying `ops` (as `build_log` takes them) one by one, in order."""
    image = bytearray(base)
    for op in ops:
        if op[0] in "wzd":
            at, n = op[1] * sectorsize, op[2] * sectorsize
            image[at : at + n] = fill(op[3], n) if op[0] == "w" else bytes(n)
    return bytes(image)


OPS = [
    ("w", 0, 2, 0x11),         # 0
    ("w", 1, 3, 0x22),         # 1 overlaps 0
    ("f",),                    # 2
    ("m", "setup-done"),       # 3
    ("w", 8, 1, 0x33, EntryFlag.FUA),  # 4
    ("d", 0, 2),               # 5
    ("z", 2, 1),               # 6
    ("f",),                    # 7
    ("w", 100, 64, 0x44),      # 8 big enough to be copied in the kernel at 4096
    ("m", "end"),              # 9
]


@pytest.fixture(params=[512, 4096])
def sectorsize(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture
def base(tmp_path: Path) -> bytes:
    data = bytes(range(256)) * (IMAGE_BYTES // 256)
    return data


def fresh_target(tmp_path: Path, base: bytes, name: str = "target.img") -> Path:
    target = tmp_path / name
    target.write_bytes(base)
    return target


def test_every_limit_reproduces_the_prefix(tmp_path: Path, sectorsize: int, base: bytes) -> None:
    log_path = tmp_path / "log"
    build_log(log_path, sectorsize, OPS)
    for n in range(len(OPS) + 2):
        target = fresh_target(tmp_path, base)
        result = replay(log_path, target, limit=n)
        assert result.entries == min(n, len(OPS))
        assert target.read_bytes() == model(base, sectorsize, OPS[:n]), n


def test_resume_from_a_result_equals_one_replay(tmp_path: Path, sectorsize: int,
                                                base: bytes) -> None:
    log_path = tmp_path / "log"
    build_log(log_path, sectorsize, OPS)
    target = fresh_target(tmp_path, base)
    first = replay(log_path, target, limit=5)
    assert (first.next_index, first.last_index) == (5, 4)
    second = replay(log_path, target, start_entry=first.next_index, start_block=first.next_block)
    assert second.start_index == 5 and second.next_index == len(OPS)
    assert target.read_bytes() == model(base, sectorsize, OPS)
    # Without the block, the start is found by walking headers: same place.
    with LogReader(log_path) as reader:
        assert resolve_start(reader, start_entry=5) == (5, first.next_block)


def test_start_mark_starts_after_the_mark_and_limit_counts_from_there(
        tmp_path: Path, sectorsize: int, base: bytes) -> None:
    log_path = tmp_path / "log"
    build_log(log_path, sectorsize, OPS)
    target = fresh_target(tmp_path, base)
    result = replay(log_path, target, start_mark="setup-done", limit=2)
    assert (result.start_index, result.last_index) == (4, 5)
    assert target.read_bytes() == model(base, sectorsize, OPS[4:6])


def test_end_mark_replays_through_the_mark(tmp_path: Path, sectorsize: int, base: bytes) -> None:
    log_path = tmp_path / "log"
    build_log(log_path, sectorsize, OPS)
    target = fresh_target(tmp_path, base)
    result = replay(log_path, target, end_mark="setup-done")
    assert result.last_index == 3 and result.marks == 1 and result.flushes == 1
    assert target.read_bytes() == model(base, sectorsize, OPS[:4])


def test_missing_mark_is_an_error_and_leaves_the_target_alone(
        tmp_path: Path, sectorsize: int, base: bytes) -> None:
    log_path = tmp_path / "log"
    build_log(log_path, sectorsize, OPS)
    target = fresh_target(tmp_path, base)
    with pytest.raises(MarkNotFound, match="no-such-mark"):
        replay(log_path, target, end_mark="no-such-mark")
    with pytest.raises(MarkNotFound):
        replay(log_path, target, start_mark="no-such-mark")
    assert target.read_bytes() == base


def test_next_flush_and_next_fua(tmp_path: Path, sectorsize: int, base: bytes) -> None:
    log_path = tmp_path / "log"
    build_log(log_path, sectorsize, OPS)
    target = fresh_target(tmp_path, base)
    assert replay(log_path, target, next_flush=True).last_index == 2
    assert replay(log_path, target, start_entry=3, next_flush=True).last_index == 7
    assert replay(log_path, target, next_fua=True).last_index == 4
    # limit and a stop condition: whichever comes first
    assert replay(log_path, target, next_flush=True, limit=2).last_index == 1
    with pytest.raises(StopNotFound):
        replay(log_path, target, start_entry=8, next_flush=True)


def test_find_stop_is_inclusive_and_gives_the_next_block(tmp_path: Path, sectorsize: int) -> None:
    log_path = tmp_path / "log"
    build_log(log_path, sectorsize, OPS)
    with LogReader(log_path) as reader:
        stop = find_stop(reader, 0, 1, end_mark="end")
        assert stop.index == 9 and stop.next_block(sectorsize) * sectorsize == reader.size
        assert find_stop(reader, 3, resolve_start(reader, start_entry=3)[1], limit=3).index == 5


def test_start_entry_out_of_range(tmp_path: Path, base: bytes) -> None:
    log_path = tmp_path / "log"
    build_log(log_path, 512, OPS)
    with pytest.raises(ReplayError, match="not in the log"):
        replay(log_path, fresh_target(tmp_path, base), start_entry=len(OPS) + 1)
    assert replay(log_path, fresh_target(tmp_path, base), start_entry=len(OPS)).entries == 0


def test_check_stops_at_the_first_failure(tmp_path: Path, sectorsize: int, base: bytes) -> None:
    log_path = tmp_path / "log"
    build_log(log_path, sectorsize, OPS)
    target = fresh_target(tmp_path, base)
    seen: list[int] = []

    def checker(entry) -> str | None:
        seen.append(entry.index)
        # the target is durable and holds exactly entries 0..index when we are called
        assert target.read_bytes() == model(base, sectorsize, OPS[: entry.index + 1])
        return "fsck said no" if entry.index == 7 else None

    with pytest.raises(ReplayCheckFailed, match="after log entry 7: fsck said no") as failed:
        replay(log_path, target, check="flush", checker=checker)
    assert failed.value.index == 7 and seen == [2, 7]
    seen.clear()
    replay(log_path, fresh_target(tmp_path, base), check=3, checker=lambda e: seen.append(e.index))
    assert seen == [2, 5, 8]


def test_a_huge_discard_leaves_zeros_and_keeps_the_size(tmp_path: Path) -> None:
    # replay-log skips zeroing discards over 128 MiB on files; we punch the hole.
    size = 300 << 20
    target = tmp_path / "big.img"
    with open(target, "wb") as f:
        f.truncate(size)
        f.seek(size - 4096)
        f.write(b"\xff" * 4096)
        f.seek(0)
        f.write(b"\xff" * 4096)
    log_path = tmp_path / "log"
    build_log(log_path, 4096, [("d", 0, size // 4096)])
    replay(log_path, target)
    assert os.path.getsize(target) == size
    with open(target, "rb") as f:
        assert f.read(4096) == bytes(4096)
        f.seek(size - 4096)
        assert f.read() == bytes(4096)


def test_skipped_payloads_are_never_read(tmp_path: Path, base: bytes) -> None:
    log_path = tmp_path / "log"
    big = 64 << 20
    with LogWriter.create(log_path, 4096) as writer:
        # A sparse 64 MiB payload: the file holds it, nobody needs to read it.
        writer.append_write(0, 1, [bytes(4096)])
        at = writer.bytes_used
        os.pwrite(writer._fd, bytes(4096), at)  # header placeholder, rewritten below
        writer.next_block += 1 + big // 4096
        writer.next_index += 1
        from logwrites.format import encode_entry_header
        os.pwrite(writer._fd, encode_entry_header(0, big // 4096, 0, 4096), at)
        os.truncate(log_path, writer.bytes_used)
        writer.append_write(3, 1, [b"\x77" * 4096])
        writer.commit()
    with LogReader(log_path) as reader:
        assert [e.index for e in reader.entries(0, 1)] == [0, 1, 2]
        assert reader.bytes_read < (4 << 20)
    target = fresh_target(tmp_path, base)
    with LogReader(log_path) as reader:
        index, block = resolve_start(reader, start_entry=2)
        entry = next(reader.entries(index, block))
        fd = os.open(target, os.O_WRONLY)
        try:
            apply_entry(reader, entry, fd)
        finally:
            os.close(fd)
        assert reader.bytes_read < (4 << 20)
    assert target.read_bytes()[3 * 4096 : 4 * 4096] == b"\x77" * 4096


def test_apply_entry_one_by_one_equals_replay(tmp_path: Path, sectorsize: int,
                                              base: bytes) -> None:
    log_path = tmp_path / "log"
    build_log(log_path, sectorsize, OPS)
    target = fresh_target(tmp_path, base)
    fd = os.open(target, os.O_WRONLY)
    try:
        with LogReader(log_path) as reader:
            for entry in reader.entries():
                apply_entry(reader, entry, fd)
    finally:
        os.close(fd)
    assert target.read_bytes() == model(base, sectorsize, OPS)


def test_target_is_created_when_missing(tmp_path: Path) -> None:
    log_path = tmp_path / "log"
    build_log(log_path, 512, [("w", 2, 1, 0x5A)])
    target = tmp_path / "new.img"
    replay(log_path, target)
    assert target.read_bytes() == bytes(1024) + b"\x5a" * 512


def test_discard_writes_zeros_where_holes_cannot_be_punched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes
    import errno

    import logwrites.replay as replay_module

    def no_holes(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(replay_module, "_fallocate", no_holes)
    target = tmp_path / "target.img"
    target.write_bytes(b"\xff" * (3 << 20))
    log_path = tmp_path / "log"
    # 2 MiB from 2 MiB: half of it lies past the end of the 3 MiB target
    build_log(log_path, 4096, [("d", 512, 512), ("d", 1, 1)])
    replay(log_path, target)
    data = target.read_bytes()
    assert len(data) == 3 << 20  # zeros written instead of a hole do not grow the file
    assert data[: 4096] == b"\xff" * 4096 and data[4096:8192] == bytes(4096)
    assert data[2 << 20 :] == bytes(1 << 20) and data[8192 : 2 << 20].count(0) == 0


def test_replay_entries_in_steps_on_an_open_target(tmp_path: Path, sectorsize: int,
                                                   base: bytes) -> None:
    from logwrites.replay import replay_entries

    log_path = tmp_path / "log"
    build_log(log_path, sectorsize, OPS)
    target = fresh_target(tmp_path, base)
    fd = os.open(target, os.O_WRONLY)
    try:
        with LogReader(log_path) as reader:
            index, block = 0, 1
            for step in (3, 0, 4, 100):
                result = replay_entries(reader, fd, index, block, step)
                assert result.entries == min(step, len(OPS) - index)
                index, block = result.next_index, result.next_block
                assert target.read_bytes() == model(base, sectorsize, OPS[:index])
    finally:
        os.close(fd)
    assert index == len(OPS)


def test_plain_writes_and_flushes_are_applied_in_c(tmp_path: Path, sectorsize: int,
                                                    base: bytes) -> None:
    """The fast path's common case runs in logwrites._replay (no silent Python fallback); the
    entries it leaves to Python (discards, marks) are the only ones that are not."""
    log_path = tmp_path / "log"
    build_log(log_path, sectorsize, OPS)
    target = fresh_target(tmp_path, base)
    result = replay(log_path, target)
    with LogReader(log_path) as reader:
        entries = list(reader.entries())
    leftover = [e for e in entries if e.flags & (EntryFlag.DISCARD | EntryFlag.MARK)]
    assert result.native_entries == len(entries) - len(leftover) > 0
    assert (result.writes, result.discards, result.flushes, result.fuas, result.marks) == (
        sum(1 for e in entries if e.nr_sectors and not e.flags & EntryFlag.DISCARD),
        1, 2, 1, 2)
    assert result.bytes_written == sum(e.nr_sectors for e in entries
                                       if not e.flags & EntryFlag.DISCARD) * sectorsize
    assert target.read_bytes() == model(base, sectorsize, OPS)


def test_a_run_of_small_writes_never_leaves_c(tmp_path: Path, base: bytes) -> None:
    ops: list[tuple] = [("w", (i * 7) % 200, 1 + i % 3, i % 251) for i in range(3000)]
    ops[1500:1500] = [("f",)]
    log_path = tmp_path / "log"
    build_log(log_path, 512, ops)
    target = fresh_target(tmp_path, base)
    result = replay(log_path, target)
    assert result.native_entries == result.entries == len(ops)
    assert result.writes == len(ops) - 1 and result.flushes == 1
    assert target.read_bytes() == model(base, 512, ops)


def test_c_reports_a_target_error_as_python_would(tmp_path: Path) -> None:
    from logwrites.replay import replay_entries

    log_path = tmp_path / "log"
    build_log(log_path, 512, [("f",), ("w", 0, 1, 0x11)])
    target = tmp_path / "target.img"
    target.write_bytes(bytes(4096))
    fd = os.open(target, os.O_RDONLY)  # pwrite fails with EBADF
    try:
        with pytest.raises(OSError) as raised:
            os.pwrite(fd, b"x", 0)
        with LogReader(log_path) as reader, pytest.raises(OSError) as from_c:
            replay_entries(reader, fd, 0, 1, 2)
    finally:
        os.close(fd)
    assert str(from_c.value) == str(raised.value)
    assert from_c.value.errno == raised.value.errno


def test_big_payloads_fall_back_to_reads_where_the_kernel_cannot_copy(tmp_path: Path) -> None:
    """copy_file_range to /dev/null fails (EINVAL): C copies through its buffer instead, which
    then no longer holds headers; the walk goes on from the right place."""
    from logwrites.replay import replay_entries

    ops: list[tuple] = [("w", 0, 64, 0x44), ("w", 1, 1, 0x55), ("w", 64, 32, 0x66),
                        ("f",), ("w", 2, 1, 0x77)]
    log_path = tmp_path / "log"
    build_log(log_path, 4096, ops)
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        with LogReader(log_path) as reader:
            result = replay_entries(reader, fd, 0, 1, len(ops))
            last = list(reader.entries())[-1]
    finally:
        os.close(fd)
    assert result.native_entries == result.entries == len(ops)
    assert result.next_block == last.next_block(4096)
    assert result.bytes_written == (64 + 1 + 32 + 1) * 4096
