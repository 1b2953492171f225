"""`logwrites serve` through the test front-end, compared with qemu-storage-daemon.

The transcript of tests/system/test_frontend.py runs against both; statuses, data and images
must agree, and our log must hold what DESIGN.md section 3 says: each flush carries the writes
completed before it, in completion order; failed requests leave no entry.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.test_frontend import CAPACITY, make_image, pattern, qsd, transcript
from vhost.testing.daemons import Daemon, LogwritesServe
from vhost.testing.frontend import BlkFrontend, Status
from vhost.testing.logcheck import LogRecord, log_records

__all__ = ["qsd"]     # the fixture, imported to share it


@pytest.fixture
def ours(tmp_path: Path) -> Iterator[LogwritesServe]:
    image = tmp_path / "ours.img"
    make_image(image)
    with LogwritesServe(image, tmp_path / "ours.sock", tmp_path / "ours.log", tmp_path) as d:
        d.image = image
        yield d


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_logwrites_serve_answers_like_qemu_storage_daemon(qsd: Daemon,
                                                         ours: LogwritesServe) -> None:
    with BlkFrontend(qsd.socket_path) as fe:
        reference = transcript(fe)
    with BlkFrontend(ours.socket_path) as fe:
        assert fe.capacity == CAPACITY
        steps = transcript(fe)
        serial = fe.get_id()
    assert [s.key() for s in steps] == [s.key() for s in reference]
    assert serial.status == Status.OK and len(serial.data.split(b"\0")[0]) <= 20
    # Same image contents, except the discarded range (its contents are unspecified).
    discarded = slice(4096 * 512, 4160 * 512)
    ref_image, our_image = bytearray(qsd.image.read_bytes()), bytearray(ours.image.read_bytes())
    ref_image[discarded] = our_image[discarded] = b""
    assert our_image == ref_image
    assert ours.stop() == 0                         # SIGTERM: a clean shutdown

    # DESIGN.md section 3: a flush carries the writes completed before it, in completion order;
    # failed requests are not logged; write-zeroes is a write of zeros.
    a, b = pattern(1, 4096), pattern(2, 12288)
    batch = sorted((s for s in steps if s.name.startswith("batch write")), key=lambda s: s.order)
    want = [LogRecord(0, "write", 8 * 512, 4096, sha(a)),
            LogRecord(0, "write", 100 * 512, 12288, sha(b)),
            LogRecord(0, "flush"),
            LogRecord(0, "write", 8 * 512, 4096, sha(bytes(4096))),
            LogRecord(0, "discard", 4096 * 512, 64 * 512)]
    for s in batch:
        i = int(s.name.split()[-1])
        want.append(LogRecord(0, "write", (512 + 8 * i) * 512, 4096, sha(pattern(10 + i, 4096))))
    want.append(LogRecord(0, "flush"))
    sectorsize, records, _payloads = log_records(ours.log_path)
    assert sectorsize == 512
    got = [LogRecord(0, r.kind, r.byte_offset, r.nbytes, r.sha, r.fua, None) for r in records]
    tail = got[len(want):]
    assert got[:len(want)] == want
    assert [r.kind for r in tail] == ["mark"] * len(tail)
    assert records[-1].mark == "dm-log-writes-end"



@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_ends_the_log_cleanly(ours: LogwritesServe, sig: signal.Signals) -> None:
    # A closed terminal (SIGHUP) used to kill serve on the spot: no volatile tail, no end mark.
    with BlkFrontend(ours.socket_path) as fe:
        assert fe.write(8, pattern(1, 4096)).status == Status.OK
        assert fe.flush().status == Status.OK
        assert fe.write(16, pattern(2, 4096)).status == Status.OK
    assert ours.stop(sig) == 0
    _sectorsize, records, _payloads = log_records(ours.log_path)
    assert [r.kind for r in records] == ["write", "flush", "write", "mark"]
    assert records[-1].mark == "dm-log-writes-end"
