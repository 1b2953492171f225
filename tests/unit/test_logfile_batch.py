"""The writer's batched flush path: `append_batch` (one pwritev per IOV_MAX buffers) writes the
same bytes as entry-by-entry appends; a deferred count sync still counts every committed entry
for a reader (a killed process keeps the page cache); a preallocated tail is never read (readers
trust nr_entries) and `close()` gives it back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from logwrites.format import EntryFlag
from logwrites.logfile import IOV_MAX, ZERO_PIECE, LogFullError, LogReader, LogWriter

DISCARD = int(EntryFlag.DISCARD)


def _records(n: int, sectorsize: int) -> list[tuple[int, int, int, bytes | None]]:
    out: list[tuple[int, int, int, bytes | None]] = []
    for i in range(n):
        if i % 5 == 3:
            out.append((i, 2, DISCARD, None))
        elif i % 5 == 4:
            out.append((i, 1, 0, None))  # write-zeroes
        else:
            out.append((i, 1 + i % 3, 0, bytes([i % 251]) * ((1 + i % 3) * sectorsize)))
    return out


@pytest.mark.parametrize("sectorsize", [512, 4096])
@pytest.mark.parametrize("n", [0, 7, IOV_MAX + 5])
def test_batch_writes_the_same_log_as_single_appends(tmp_path: Path, sectorsize: int,
                                                     n: int) -> None:
    records = _records(n, sectorsize)
    single, batched = tmp_path / "single", tmp_path / "batched"
    with LogWriter.create(single, sectorsize) as writer:
        for sector, nr, flags, payload in records:
            if flags & DISCARD:
                writer.append_discard(sector, nr)
            elif payload is None:
                writer.append_zeroes(sector, nr)
            else:
                writer.append_write(sector, nr, [payload])
        writer.append_flush()
        writer.commit()
    with LogWriter.create(batched, sectorsize) as writer:
        assert writer.append_batch(records, flush=True) == 0
        assert writer.next_index == n + 1
        writer.commit(sync_count=False)
    assert batched.read_bytes() == single.read_bytes()
    with LogReader(batched) as reader:
        assert reader.nr_entries == n + 1
        assert [e.index for e in reader.entries()] == list(range(n + 1))


def test_deferred_count_is_visible_without_close(tmp_path: Path) -> None:
    # A process killed after commit(sync_count=False) leaves its writes in the page cache:
    # a reader opened while the writer is still open (never closed) sees the count.
    log = tmp_path / "log"
    writer = LogWriter.create(log, 512, preallocate=1 << 20)
    try:
        writer.append_batch(_records(3, 512), flush=True)
        writer.commit(sync_count=False)
        writer.append_write(0, 1, [b"\xee" * 512])  # appended, not counted
        assert log.stat().st_size == 1 << 20  # the preallocated tail
        with LogReader(log) as reader:
            assert reader.nr_entries == 4
            assert [e.flags for e in reader.entries()][-1] == EntryFlag.FLUSH
        with LogWriter.resume(log) as resumed:  # as a restart after a kill does
            assert (resumed.nr_entries, resumed.next_block) == (4, writer.next_block - 2)
    finally:
        writer.close()
    # The resumed writer dropped the uncounted entry; the first one's close then found nothing
    # beyond its own entries to give back.
    assert log.stat().st_size <= writer.bytes_used
    with LogReader(log) as reader:
        assert reader.nr_entries == 4


def test_close_gives_back_the_preallocated_room(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with LogWriter.create(log, 512, preallocate=1 << 20) as writer:
        writer.append_batch(_records(2, 512), flush=True)
        writer.commit(sync_count=False)
        assert log.stat().st_size == 1 << 20
    assert log.stat().st_size == writer.bytes_used


def test_batch_past_the_limit_appends_nothing(tmp_path: Path) -> None:
    with LogWriter.create(tmp_path / "log", 512, max_bytes=8 * 512) as writer:
        with pytest.raises(LogFullError):
            writer.append_batch([(0, 4, 0, bytes(4 * 512))] * 2, flush=True)
        assert (writer.next_index, writer.next_block) == (0, 1)
        writer.append_batch([(0, 4, 0, bytes(4 * 512))], flush=True)
        writer.commit()
        assert writer.nr_entries == 2


def test_room_is_zeroed_ahead_of_small_entries_only(tmp_path: Path) -> None:
    # Small entries land in blocks the file already holds (written zeros, not holes or
    # unwritten extents), so a commit's fdatasync does not have to write the inode back; a
    # big entry goes direct and is not doubled by zeros ahead of it.
    log = tmp_path / "log"
    with LogWriter.create(log, 512, preallocate=1 << 20) as writer:
        writer.append_write(0, 512, [b"\x5a" * (256 << 10)])       # 256 KiB: direct
        assert log.stat().st_size == writer.bytes_used
        writer.append_write(0, 1, [b"\xa5" * 512])
        st = log.stat()
        assert st.st_size == 1 << 20
        assert st.st_blocks * 512 >= st.st_size                     # allocated, not sparse
        writer.commit()
    assert log.stat().st_size == writer.bytes_used
    with LogReader(log) as reader:
        assert [e.nr_sectors for e in reader.entries()] == [512, 1]


def test_room_is_zeroed_in_aligned_pieces(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Zeros start where the last entry ended (anywhere), go in pieces that end on
    # ZERO_PIECE boundaries (small folios, see ZERO_PIECE), and reach exactly the next
    # preallocation boundary.
    log = tmp_path / "log"
    with LogWriter.create(log, 512, preallocate=1 << 20) as writer:
        writes: list[tuple[int, int]] = []
        real_pwritev = os.pwritev

        def pwritev(fd: int, buffers: list, at: int) -> int:
            writes.append((at, sum(map(len, buffers))))
            return real_pwritev(fd, buffers, at)

        monkeypatch.setattr(os, "pwritev", pwritev)
        writer.append_write(0, 2, [b"\xa5" * 1024])
        monkeypatch.undo()
    *zeros, entry = writes                              # room first, then the entry
    assert entry == (512, 1536)                         # after the super block
    assert zeros[0] == (2048, ZERO_PIECE - 2048)
    assert all(at % ZERO_PIECE == 0 and n == ZERO_PIECE for at, n in zeros[1:])
    assert zeros[-1][0] + zeros[-1][1] == 1 << 20
    with log.open("rb") as f:
        f.seek(512)
        assert f.read(512)[:8] == (0).to_bytes(8, "little")          # header: sector 0
        assert f.read(1024) == b"\xa5" * 1024
