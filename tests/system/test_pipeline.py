"""Big writes in flight together, through the real backend and a real front-end: records in
pop order, FLUSH ordering, a failing image write and a full log in the middle of a batch. Each
test runs on both pipelines, C's (vhost/_lvu_glue.c, the default) and vhost/pipeline.py's
(`LOGWRITES_PLAIN_IN_C=0`), with the same expectations; `big_writes_in_c` and `served_in_c`
show which one served.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from logwrites.logfile import LogReader
from tests.system.test_backend_control import Control, kinds
from tests.system.test_log_full import start
from vhost.testing.frontend import (
    BlkFrontend,
    Layout,
    Status,
    flush_parts,
    read_parts,
    write_parts,
)

KiB = 1 << 10
BIG = 256 * KiB                     # at least PARALLEL_MIN: the pipeline takes it


def big(i: int) -> bytes:
    return bytes([i % 250 + 1]) * BIG


@pytest.fixture(params=[True, False], ids=["in-c", "in-python"])
def in_c(request: pytest.FixtureRequest) -> bool:
    return request.param


def env(in_c: bool) -> dict[str, str]:
    return {"LOGWRITES_PLAIN_IN_C": "1" if in_c else "0"}


def served_by(d: object, in_c: bool, big_writes: int) -> None:
    """The big writes went through the pipeline asked for: at least `big_writes` of them were
    logged and completed by C's, or C served nothing at all."""
    status = Control(d.control)("status")  # type: ignore[attr-defined]
    if in_c:
        assert status["big_writes_in_c"] >= big_writes
    else:
        assert status["served_in_c"] == 0 and status["big_writes_in_c"] == 0


@pytest.mark.slow
def test_big_writes_in_flight_are_logged_in_pop_order(tmp_path: Path, in_c: bool) -> None:
    log = tmp_path / "log"
    d = start(tmp_path, log, env=env(in_c))
    # Twelve big writes at once (more than the pipeline's depth), two of them onto the same
    # sectors, a small write and a FLUSH among them, and a big write after the FLUSH.
    sectors = [i * (BIG // 512) for i in range(10)] + [0, 512]
    batch = [write_parts(s, big(i)) for i, s in enumerate(sectors[:6])]
    batch.append(write_parts(4096, bytes([0xAA]) * 4096))
    batch += [write_parts(s, big(i + 6)) for i, s in enumerate(sectors[6:])]
    batch.append(flush_parts())
    batch.append(write_parts(8192, big(99)))
    try:
        with BlkFrontend(d.socket_path, timeout_s=20) as fe:
            done = fe.run(batch)
            assert [r.status for r in done] == [Status.OK] * len(batch)
            # The later write onto sectors 0.. wins on the image, as on a disk.
            assert fe.run_one(read_parts(0, BIG)).data == big(10)
            assert fe.run_one(read_parts(512, BIG)).data == big(11)
            served_by(d, in_c, 13)
    finally:
        assert d.stop() == 0
    nr = BIG // 512
    want = [("write", s, nr, big(i)[0]) for i, s in enumerate(sectors[:6])]
    want.append(("write", 4096, 8, 0xAA))
    want += [("write", s, nr, big(i + 6)[0]) for i, s in enumerate(sectors[6:])]
    want += [("flush",), ("write", 8192, nr, big(99)[0]), ("mark", "dm-log-writes-end")]
    assert kinds(log) == want


@pytest.mark.slow
def test_failed_image_write_in_flight_is_ioerr_and_not_logged(
        tmp_path: Path, small_fs, in_c: bool) -> None:
    imgfs = small_fs("imgfs", "2m")
    image = imgfs / "disk.img"
    with image.open("wb") as f:
        f.write(b"\xee" * (4 * BIG))    # the first 1 MiB is allocated
        f.truncate(64 << 20)             # the rest is sparse: no room behind it
    fd = os.open(imgfs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            while True:
                os.write(fd, bytes(4096))
    finally:
        os.close(fd)
    log = tmp_path / "log"
    d = start(tmp_path, log, image=image, env=env(in_c))
    nr = BIG // 512
    sectors = [0, 16 << 11, nr, 32 << 11, 2 * nr]   # 2nd and 4th land where there is no room
    try:
        with BlkFrontend(d.socket_path, timeout_s=20) as fe:
            done = fe.run([write_parts(s, big(i)) for i, s in enumerate(sectors)]
                          + [flush_parts()])
            assert [r.status for r in done] == [Status.OK, Status.IOERR, Status.OK,
                                                Status.IOERR, Status.OK, Status.OK]
            status = Control(d.control)("status")
            assert status["requests"]["failed"] == 2 and status["log_full"] is None
            # The first failure stays for `status`: the guest itself only saw an I/O error.
            assert status["image_error"].startswith(
                f"image write of {BIG} bytes at byte {(16 << 11) * 512}: "), status
            served_by(d, in_c, 1)
    finally:
        assert d.stop() == 0
    assert kinds(log) == [("write", 0, nr, 1), ("write", nr, nr, 3), ("write", 2 * nr, nr, 5),
                          ("flush",), ("mark", "dm-log-writes-end")]


@pytest.mark.slow
def test_log_full_in_flight_fails_that_write_and_the_rest(tmp_path: Path, in_c: bool) -> None:
    log = tmp_path / "log"
    # Room for the super block and three big entries (header + payload each), not four.
    d = start(tmp_path, log, "--log-size", str(512 + 3 * (512 + BIG) + 4096), env=env(in_c))
    nr = BIG // 512
    try:
        with BlkFrontend(d.socket_path, timeout_s=20) as fe:
            done = fe.run([write_parts(i * nr, big(i)) for i in range(6)])
            statuses = [r.status for r in done]
            assert statuses[:3] == [Status.OK] * 3
            assert statuses[3:] == [Status.IOERR] * 3
            status = Control(d.control)("status")
            assert status["log_full"] is not None and status["log_full"].startswith("log full")
            # Unlogged: the three records waiting for a flush, the one that did not fit, and
            # the two in flight behind it (on the image, never logged, none completed OK;
            # served one at a time, those two would not have touched the image: 4).
            assert status["unlogged"] == 6 and status["log_full_events"] == 1
            assert status["requests"]["failed"] == 3
            served_by(d, in_c, 3)
            assert fe.flush().status == Status.IOERR
            assert fe.write(0, big(9)).status == Status.IOERR
            assert fe.run_one(read_parts(0, BIG)).data == big(0)   # untouched since
    finally:
        d.stop()
    # The three that fitted are the volatile tail logged at stop; nothing of the others, and
    # no end mark (the log is full).
    assert kinds(log) == [("write", i * nr, nr, i + 1) for i in range(3)]


@pytest.mark.slow
def test_big_writes_from_unaligned_buffers_are_logged_whole(tmp_path: Path, in_c: bool) -> None:
    """Buffers O_DIRECT cannot take as they are (a driver may cut a request anywhere): the
    records go through the page cache instead, every byte in place."""
    log = tmp_path / "log"
    d = start(tmp_path, log, env=env(in_c))
    odd = Layout(out_cuts=(16, 16 + 1000, 16 + 5000, 16 + BIG - 24))
    payloads = [os.urandom(BIG) for _ in range(5)]
    sectors = [i * (BIG // 512) for i in range(5)]
    try:
        with BlkFrontend(d.socket_path, timeout_s=20) as fe:
            done = fe.run([write_parts(s, p, odd) for s, p in zip(sectors, payloads, strict=True)]
                          + [flush_parts()])
            assert [r.status for r in done] == [Status.OK] * 6
            assert fe.run_one(read_parts(sectors[3], BIG)).data == payloads[3]
            served_by(d, in_c, 5)
    finally:
        assert d.stop() == 0
    logged = []
    with LogReader(log) as reader:
        for e in reader.entries():
            if not (e.is_flush or e.is_mark):
                logged.append((e.sector, reader.read_payload(e)))
    assert logged == list(zip(sectors, payloads, strict=True))
