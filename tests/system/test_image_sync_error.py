"""A guest FLUSH whose image sync fails, through the real backend and a real front-end.

The image is a file exported through FUSE by qemu-storage-daemon over QEMU's blkdebug driver,
which fails the first flush that reaches it with EIO: the backend's fdatasync of the image
fails exactly as it would on a disk that lost its cache. The FLUSH must complete with IOERR
and count nothing (its records are not durable on the image); the records wait in the
unflushed list and the next FLUSH that succeeds logs them, each once.
Both ways a FLUSH is served: in C (the default) and in Python (`LOGWRITES_PLAIN_IN_C=0`).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.test_backend_control import Control, kinds
from tests.system.test_log_full import start
from vhost.testing.daemons import qsd_path
from vhost.testing.frontend import BlkFrontend, Status, read_parts

MiB = 1 << 20
BLOCK = 4096


def _mounted(path: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


@pytest.fixture
def failing_flush_image(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB image whose first flush fails with EIO (FUSE export over blkdebug)."""
    if not Path("/dev/fuse").exists():
        raise AssertionError("/dev/fuse is missing: this test needs FUSE (modprobe fuse)")
    data = tmp_path / "data.img"
    with data.open("wb") as f:
        f.truncate(16 * MiB)
    image = tmp_path / "fuse.img"
    image.write_bytes(b"")
    blkdebug = {"driver": "blkdebug", "node-name": "dbg", "image": "file",
                "inject-error": [{"event": "flush_to_disk", "iotype": "flush", "errno": 5,
                                  "once": True}]}
    # A raw node on top: the flush_to_disk event fires on the child of the node flushed.
    with open(tmp_path / "qsd.stderr", "wb") as stderr:
        qsd = subprocess.Popen(
            [qsd_path(), "--blockdev", f"driver=file,node-name=file,filename={data}",
             "--blockdev", json.dumps(blkdebug),
             "--blockdev", "driver=raw,node-name=top,file=dbg",
             "--export", f"fuse,id=exp,node-name=top,mountpoint={image},writable=on"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=stderr)
    try:
        deadline = time.monotonic() + 20
        while not _mounted(image):
            if qsd.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("qemu-storage-daemon's FUSE export did not come up: "
                                     + (tmp_path / "qsd.stderr").read_text()[-500:])
            time.sleep(0.05)
        assert image.stat().st_size == 16 * MiB
        yield image
    finally:
        qsd.terminate()
        qsd.wait(timeout=20)


@pytest.mark.slow
@pytest.mark.parametrize("plain_in_c", ["1", "0"], ids=["flush-in-c", "flush-in-python"])
def test_flush_with_failing_image_sync_is_ioerr_and_counts_nothing(
        tmp_path: Path, failing_flush_image: Path, plain_in_c: str) -> None:
    log = tmp_path / "log"
    d = start(tmp_path, log, image=failing_flush_image, env={"LOGWRITES_PLAIN_IN_C": plain_in_c})
    first, second = b"\x11" * BLOCK, b"\x22" * BLOCK
    try:
        with BlkFrontend(d.socket_path, timeout_s=20) as fe:
            ctl = Control(d.control)
            assert fe.write(0, first).status == Status.OK
            assert fe.flush().status == Status.IOERR
            status = ctl("status")
            assert status["requests"]["failed"] == 1
            assert status["unflushed"] == 1          # the record waits for a good FLUSH
            assert status["log_full"] is None
            assert status["image_error"].startswith("image sync for a FLUSH: "), status
            assert kinds(log) == []                  # nothing counted
            assert fe.write(8, second).status == Status.OK
            assert fe.flush().status == Status.OK
            assert ctl("status")["unflushed"] == 0
            assert kinds(log) == [("write", 0, 8, 0x11), ("write", 8, 8, 0x22), ("flush",)]
            assert fe.run_one(read_parts(0, 2 * BLOCK)).data == first + second
    finally:
        assert d.stop() == 0
    assert kinds(log) == [("write", 0, 8, 0x11), ("write", 8, 8, 0x22), ("flush",),
                          ("mark", "dm-log-writes-end")]
