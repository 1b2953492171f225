"""Writer → reader round trips, property-based: random writes, discards, flushes, FUA writes,
write-zeroes and marks at both sector sizes come back exactly, payloads included, and a replay
of the log equals a model of the image."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logwrites.format import EntryFlag
from logwrites.logfile import LogReader, LogWriter
from logwrites.replay import replay

SECTORS = 2048  # the model image, in sectorsize units

write = st.tuples(st.just("w"), st.integers(0, SECTORS - 1), st.integers(1, 80),
                  st.booleans(), st.integers(0, 255))
big_write = st.tuples(st.just("w"), st.integers(0, SECTORS - 1), st.integers(500, 700),
                      st.booleans(), st.integers(0, 255))
discard = st.tuples(st.just("d"), st.integers(0, SECTORS - 1), st.integers(1, 300))
zeroes = st.tuples(st.just("z"), st.integers(0, SECTORS - 1), st.integers(1, 40))
flush = st.tuples(st.just("f"))
mark = st.tuples(st.just("m"), st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                       min_size=1, max_size=40))
commit = st.tuples(st.just("c"))
ops_strategy = st.lists(st.one_of(write, write, write, big_write, discard, zeroes, flush, mark,
                                  commit), max_size=40)


def _clip(sector: int, nr: int) -> tuple[int, int]:
    return sector, min(nr, SECTORS - sector)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, sectorsize=st.sampled_from([512, 4096]), split=st.integers(0, 40))
def test_round_trip(ops: list[tuple], sectorsize: int, split: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        expected: list[tuple] = []
        image = bytearray(SECTORS * sectorsize)
        writer = LogWriter.create(log, sectorsize)
        try:
            for n, op in enumerate(ops):
                if n == split:  # continue the log from another writer, as a restart does
                    writer.commit()
                    writer.close()
                    writer = LogWriter.resume(log)
                kind = op[0]
                if kind == "w":
                    sector, nr = _clip(op[1], op[2])
                    flags = EntryFlag.FUA if op[3] else EntryFlag(0)
                    payload = bytes([op[4], n % 256]) * (nr * sectorsize // 2)
                    writer.append_write(sector, nr, [payload], flags)
                    expected.append((sector, nr, flags, 0, None, payload))
                    image[sector * sectorsize : (sector + nr) * sectorsize] = payload
                elif kind == "z":
                    sector, nr = _clip(op[1], op[2])
                    writer.append_zeroes(sector, nr)
                    expected.append((sector, nr, EntryFlag(0), 0, None, bytes(nr * sectorsize)))
                    image[sector * sectorsize : (sector + nr) * sectorsize] = bytes(nr * sectorsize)
                elif kind == "d":
                    sector, nr = _clip(op[1], op[2])
                    writer.append_discard(sector, nr)
                    expected.append((sector, nr, EntryFlag.DISCARD, 0, None, None))
                    image[sector * sectorsize : (sector + nr) * sectorsize] = bytes(nr * sectorsize)
                elif kind == "f":
                    writer.append_flush()
                    expected.append((0, 0, EntryFlag.FLUSH, 0, None, None))
                elif kind == "m":
                    writer.append_mark(op[1])
                    expected.append((0, 0, EntryFlag.MARK, len(op[1]), op[1], None))
                else:
                    writer.commit()
            # Entries appended after the last commit are on the file but not counted.
            writer.commit()
            writer.append_write(0, 1, [b"\xee" * sectorsize])
        finally:
            writer.close()

        with LogReader(log) as reader:
            assert reader.sectorsize == sectorsize and reader.nr_entries == len(expected)
            got = []
            for entry, view in reader.entries_with_payload():
                payload = reader.read_payload(entry) if entry.has_payload else None
                if view is not None:
                    assert bytes(view) == payload
                got.append((entry.sector, entry.nr_sectors, entry.flags, entry.data_len,
                            entry.mark, payload))
            assert got == expected
            assert [e.index for e in reader.entries()] == list(range(len(expected)))

        target = Path(tmp) / "target"
        with open(target, "wb") as f:
            f.truncate(len(image))
        result = replay(log, target)
        assert result.entries == len(expected)
        assert target.read_bytes() == bytes(image)
