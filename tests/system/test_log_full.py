"""Full logs and failing images: nothing is silently unlogged (issue 6; vhost/blk.py's docstring
holds the semantics).

- `--log-size` reached, or the log's filesystem full (a small tmpfs): the write whose record
  (or the FLUSH whose entry) does not fit gets IOERR, `status` says `log full` and why, every
  later write and FLUSH gets IOERR without touching the image, reads still work, and the log
  stays valid up to its last counted entry (the writes of every FLUSH that succeeded, nothing
  of the failed one).
- `--on-log-full pause`: the request is held, subscribers get `{"event": "log-full"}`, the user
  makes room and sends `resume`, the request completes and the log misses nothing.
- The data image on a full filesystem: the guest's write gets IOERR and is not logged.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.system.test_backend_control import Control, kinds
from vhost.testing.daemons import LogwritesServe
from vhost.testing.frontend import BlkFrontend, CompletionTimeout, Status, flush_parts, write_parts

MiB = 1 << 20
BLOCK = 4096


def start(tmp_path: Path, log: Path, *extra: str, image: Path | None = None,
          env: dict[str, str] | None = None) -> LogwritesServe:
    if image is None:
        image = tmp_path / "disk.img"
        with image.open("wb") as f:
            f.truncate(16 * MiB)
    daemon = LogwritesServe(image, tmp_path / "s.sock", log, tmp_path, extra_args=list(extra))
    daemon.env.update(env or {})
    daemon.start()
    daemon.image = image
    daemon.control = tmp_path / "s.sock.control"
    return daemon


def fill(i: int) -> bytes:
    return bytes([i % 250 + 1]) * BLOCK


def write_and_flush_until_failure(fe: BlkFrontend, limit: int = 200) -> int:
    """Write block i and flush, i = 0, 1, ...; the index of the first write or FLUSH that
    failed (a write fails when its record does not fit, a FLUSH when its entry does not)."""
    for i in range(limit):
        for status in (fe.write(i * 8, fill(i)).status, fe.flush().status):
            if status != Status.OK:
                assert status == Status.IOERR
                return i
    raise AssertionError(f"the log took {limit} writes and flushes: never full")


def check_refusing(fe: BlkFrontend, d: LogwritesServe, failed: int, *reasons: str) -> None:
    ctl = Control(d.control)
    status = ctl("status")
    assert status["log_full"].startswith("log full")
    assert any(reason in status["log_full"] for reason in reasons), status["log_full"]
    assert status["unlogged"] == 1 and status["log_full_events"] == 1
    # From now on writes and flushes fail without touching the image; reads still work.
    late = failed + 1
    assert fe.write(late * 8, fill(late)).status == Status.IOERR
    assert fe.flush().status == Status.IOERR
    assert fe.read(late * 8, BLOCK).data == bytes(BLOCK)
    assert fe.read(failed * 8, BLOCK).data == fill(failed)   # on the image, not in the log
    # A mark cannot be logged either: an error reply, and the control socket goes on.
    reply = ctl("mark", name="after-full")
    assert reply["ok"] is False and "full" in reply["error"]
    assert ctl("status")["ok"]
    ctl.close()


def check_log(log: Path, flushed: int) -> None:
    want = []
    for i in range(flushed):
        want += [("write", i * 8, 8, fill(i)[0]), ("flush",)]
    assert kinds(log) == want       # valid up to its last entry, no trace of the failed FLUSH


@pytest.mark.slow
def test_log_size_reached_fails_the_flush_and_later_writes(tmp_path: Path) -> None:
    log = tmp_path / "log"
    limit = 32 << 10
    d = start(tmp_path, log, "--log-size", str(limit))
    try:
        with BlkFrontend(d.socket_path, timeout_s=10) as fe:
            failed = write_and_flush_until_failure(fe)
            # 512-byte super block, then 512+4096 bytes per write and 512 per FLUSH entry:
            # the first write whose record, or FLUSH whose entry, does not fit fails.
            used, fits = 512, 0
            while used + BLOCK + 1024 <= limit:
                used, fits = used + BLOCK + 1024, fits + 1
            assert failed == fits
            check_refusing(fe, d, failed, "size limit")
    finally:
        assert d.stop() == 0            # a clean stop even with the end mark not fitting
    assert log.stat().st_size <= limit
    check_log(log, failed)
    print(f"\nlog-full events handled without silent loss: 1/1 (--log-size {limit}: "
          f"{failed} flushes logged, the next one failed)")


@pytest.mark.slow
def test_log_filesystem_full_fails_the_flush(tmp_path: Path, small_fs) -> None:
    log = small_fs("logfs", "64k") / "log"
    d = start(tmp_path, log)
    try:
        with BlkFrontend(d.socket_path, timeout_s=10) as fe:
            failed = write_and_flush_until_failure(fe)
            assert failed > 0
            check_refusing(fe, d, failed, "No space left", "no room left")
    finally:
        assert d.stop() == 0
    check_log(log, failed)


@pytest.mark.slow
def test_on_log_full_pause_holds_the_flush_until_room_and_resume(tmp_path: Path,
                                                                 small_fs) -> None:
    logfs = small_fs("logfs", "256k")
    log = logfs / "log"
    filler = logfs / "filler"
    filler.write_bytes(bytes(200 << 10))
    d = start(tmp_path, log, "--on-log-full", "pause")
    events, ctl = Control(d.control), Control(d.control)
    assert events("subscribe") == {"ok": True}
    pauses = 0
    try:
        with BlkFrontend(d.socket_path, timeout_s=10) as fe:
            i = 0
            while pauses < 2:
                assert i < 200, "the log never filled"
                write = fe.prepare(write_parts(i * 8, fill(i)))
                flush = fe.prepare(flush_parts())
                fe.publish([write, flush])
                fe.kick()
                try:
                    fe.wait([write, flush], timeout_s=1.5)
                    assert write.status == Status.OK and flush.status == Status.OK
                except CompletionTimeout:
                    # Held (the write whose record did not fit, or the FLUSH): the event says
                    # why, status too, nothing else is taken meanwhile.
                    event = events.line()
                    while event.get("event") != "log-full":
                        event = events.line()
                    assert "No space left" in event["reason"] or "no room left" in event["reason"]
                    status = ctl("status")
                    assert "paused" in status["log_full"]
                    later = fe.prepare(write_parts((i + 1) * 8, fill(i + 1)))
                    fe.publish([later])
                    fe.kick()
                    with pytest.raises(CompletionTimeout):
                        fe.wait([later], timeout_s=1.0)
                    # Make room, resume: the held request completes, then the rest.
                    filler.write_bytes(bytes(len(filler.read_bytes()) // 2))
                    assert ctl("resume") == {"ok": True}
                    fe.wait([write, flush, later], timeout_s=10)
                    assert all(r.status == Status.OK for r in (write, flush, later))
                    pauses += 1
                    i += 1      # the held write took block i + 1
                    assert fe.flush().status == Status.OK
                i += 1
            assert ctl("status")["log_full"] is None
            written = i
    finally:
        events.close()
        ctl.close()
        assert d.stop() == 0
    got = kinds(log)
    writes = [k for k in got if k[0] == "write"]
    assert writes == [("write", n * 8, 8, fill(n)[0]) for n in range(written)]
    assert got[-1] == ("mark", "dm-log-writes-end")
    print(f"\nlog-full events handled without silent loss: {pauses}/{pauses} "
          f"(--on-log-full pause, {written} writes all logged)")


@pytest.mark.slow
def test_image_write_error_is_ioerr_and_not_logged(tmp_path: Path, small_fs) -> None:
    imgfs = small_fs("imgfs", "256k")
    image = imgfs / "disk.img"
    with image.open("wb") as f:
        f.truncate(4 * MiB)              # sparse: most of it has no room behind it
        f.write(b"\xee" * BLOCK)         # block 0 is allocated
    fd = os.open(imgfs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            while True:
                os.write(fd, bytes(BLOCK))
    finally:
        os.close(fd)
    log = tmp_path / "log"
    d = start(tmp_path, log, image=image)
    try:
        with BlkFrontend(d.socket_path, timeout_s=10) as fe:
            assert fe.write(0, fill(0)).status == Status.OK          # allocated: fine
            assert fe.write(1024, fill(1)).status == Status.IOERR    # ENOSPC on the image
            # A big write is logged while the image is written: the failed one is taken back.
            big = bytes([7]) * (256 << 10)
            assert fe.write(2048, big).status == Status.IOERR
            assert fe.write(0, fill(2)).status == Status.OK          # allocated: fine
            assert fe.flush().status == Status.OK
            status = Control(d.control)("status")
            assert status["requests"]["failed"] == 2 and status["log_full"] is None
    finally:
        assert d.stop() == 0
    assert kinds(log) == [("write", 0, 8, fill(0)[0]), ("write", 0, 8, fill(2)[0]), ("flush",),
                          ("mark", "dm-log-writes-end")]
