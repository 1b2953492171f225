"""The test front-end against real vhost-user-blk backends.

qemu-storage-daemon is the reference nobody here wrote: what it answers is what a correct
backend answers. The same scenario then runs against `logwrites serve`, and the two transcripts
must agree (statuses and data), request by request.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhost.testing.daemons import Daemon, QsdExport
from vhost.testing.frontend import (
    BlkFrontend,
    Layout,
    ReqType,
    Segment,
    Status,
    read_parts,
    request_parts,
    write_parts,
)

IMAGE_BYTES = 16 << 20
CAPACITY = IMAGE_BYTES // 512


def pattern(seed: int, nbytes: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < nbytes:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:nbytes])


PRESET = pattern(7, 8192)          # written into the image file before the backend starts
PRESET_SECTOR = 2048


def make_image(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(IMAGE_BYTES)
        f.seek(PRESET_SECTOR * 512)
        f.write(PRESET)


@dataclass
class Step:
    name: str
    status: int | None
    data_sha: str | None = None
    order: int = -1            # completion order (not compared between backends)

    def key(self) -> tuple[str, int | None, str | None]:
        return self.name, self.status, self.data_sha


def transcript(fe: BlkFrontend) -> list[Step]:
    """A fixed series of requests; each step's status and a digest of what it read."""
    steps: list[Step] = []

    def note(name: str, req, data: bytes | None = None) -> None:
        assert req.violations == [], name
        steps.append(Step(name, req.status,
                          None if data is None else hashlib.sha256(data).hexdigest()[:16],
                          req.order))

    a, b = pattern(1, 4096), pattern(2, 12288)
    note("write 8", fe.write(8, a))
    r = fe.read(8, 4096)
    note("read 8", r, r.data)
    split = Layout(out_cuts=(4, 16, 16 + 512, 16 + 4096), in_cuts=())
    note("write 100 split", fe.write(100, b, split))
    r = fe.read(100, 12288, Layout(indirect=True, in_cuts=(1000, 5000)))
    note("read 100 indirect", r, r.data)
    r = fe.read(100, 12288, Layout(out_cuts=(), in_cuts=()))   # data and status in one buffer
    note("read 100 merged", r, r.data)
    note("flush", fe.flush())
    r = fe.read(PRESET_SECTOR, len(PRESET))
    note("read preset", r, r.data)
    note("write-zeroes 8", fe.write_zeroes([(8, 8)]))
    r = fe.read(8, 4096)
    note("read zeroed 8", r, r.data)
    note("discard 4096+64", fe.discard([(4096, 64)]))
    note("read at capacity", fe.read(CAPACITY, 512))
    note("read across end", fe.read(CAPACITY - 1, 1024))
    note("write across end", fe.write(CAPACITY - 1, bytes(1024)))
    note("write unaligned length", fe.write(16, bytes(100)))
    note("read sector overflow", fe.read(2**64 - 1, 512))
    note("write sector overflow", fe.write(2**64 - 8, bytes(4096)))
    note("unknown type", fe.run_one(request_parts(99, 0, in_len=0)))
    note("get lifetime", fe.run_one(request_parts(ReqType.GET_LIFETIME, in_len=16)))
    note("discard unmap flag", fe.discard([Segment(0, 8, 1)]))
    note("write-zeroes unknown flag", fe.write_zeroes([Segment(0, 8, 2)]))
    note("write-zeroes past end", fe.write_zeroes([(CAPACITY - 4, 8)]))
    note("discard past end", fe.discard([(CAPACITY, 8)]))
    r = fe.get_id()
    steps.append(Step("get id", r.status))

    # Eight writes in flight together, then a flush, then read everything back.
    datas = [pattern(10 + i, 4096) for i in range(8)]
    reqs = fe.run([write_parts(512 + 8 * i, d) for i, d in enumerate(datas)])
    for i, req in enumerate(reqs):
        note(f"batch write {i}", req)
    note("batch flush", fe.flush())
    reads = fe.run([read_parts(512 + 8 * i, 4096) for i in range(8)])
    for i, req in enumerate(reads):
        note(f"batch read {i}", req, req.data)
    return steps


EXPECTED_STATUS = {
    "read at capacity": Status.IOERR,
    "read across end": Status.IOERR,
    "write across end": Status.IOERR,
    "write unaligned length": Status.IOERR,
    "read sector overflow": Status.IOERR,
    "write sector overflow": Status.IOERR,
    "unknown type": Status.UNSUPP,
    "get lifetime": Status.UNSUPP,
    "discard unmap flag": Status.UNSUPP,
    "write-zeroes unknown flag": Status.UNSUPP,
    "write-zeroes past end": Status.IOERR,
    "discard past end": Status.IOERR,
}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def expected_data() -> dict[str, str]:
    a, b = pattern(1, 4096), pattern(2, 12288)
    out = {"read 8": digest(a), "read 100 indirect": digest(b), "read 100 merged": digest(b),
           "read preset": digest(PRESET), "read zeroed 8": digest(bytes(4096))}
    for i in range(8):
        out[f"batch read {i}"] = digest(pattern(10 + i, 4096))
    return out


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[Daemon]:
    image = tmp_path / "qsd.img"
    make_image(image)
    with QsdExport(image, tmp_path / "qsd.sock", tmp_path) as daemon:
        daemon.image = image
        yield daemon


@pytest.mark.slow
def test_qemu_storage_daemon_answers_as_expected(qsd: Daemon) -> None:
    with BlkFrontend(qsd.socket_path) as fe:
        assert fe.capacity == CAPACITY
        assert fe.config is not None and fe.config.blk_size == 512
        steps = transcript(fe)
        serial = fe.get_id()
    got_status = {s.name: s.status for s in steps}
    want_status = {s.name: EXPECTED_STATUS.get(s.name, Status.OK) for s in steps}
    assert got_status == want_status
    got_data = {s.name: s.data_sha for s in steps if s.data_sha is not None}
    assert got_data == expected_data()
    assert serial.data.split(b"\0")[0] == b"vhost_user_blk"
    # What the device said it wrote is in the image file.
    image = qsd.image.read_bytes()
    assert image[100 * 512:100 * 512 + 12288] == pattern(2, 12288)
    assert image[8 * 512:16 * 512] == bytes(4096)
    assert qsd.alive()


@pytest.mark.slow
def test_completion_order_and_queue_state(qsd: Daemon) -> None:
    """Requests published together complete once each; GET_VRING_BASE reports what was used."""
    fe = BlkFrontend(qsd.socket_path, queue_size=16)
    free_at_start = fe.memory.free_bytes()
    reqs = [fe.prepare(write_parts(8 * i, pattern(i, 4096)), indirect=True) for i in range(10)]
    assert fe.queues[0].free_slot_count() == 6
    assert fe.poll_completions() == []          # prepared but not published: nothing happens
    fe.publish(reqs[:4])
    fe.kick()
    fe.wait(reqs[:4])
    assert all(r.done for r in reqs[:4]) and not any(r.done for r in reqs[4:])
    fe.publish(reqs[4:])
    fe.kick()
    fe.wait(reqs[4:])
    assert sorted(r.order for r in reqs) == list(range(10))
    assert {r.status for r in reqs} == {Status.OK}
    assert fe.queues[0].free_slot_count() == 16
    assert fe.memory.free_bytes() == free_at_start      # every buffer was given back
    bases = fe.close()
    assert bases == {0: 10}


@pytest.mark.slow
def test_reconnect_after_disconnect(qsd: Daemon) -> None:
    """A front-end that vanishes without stopping its queues leaves the backend serving."""
    fe = BlkFrontend(qsd.socket_path)
    assert fe.write(0, pattern(3, 512)).status == Status.OK
    fe.close(graceful=False)
    with BlkFrontend(qsd.socket_path) as again:
        assert again.read(0, 512).data == pattern(3, 512)


def test_image_helper_is_sparse_sized(tmp_path: Path) -> None:
    make_image(tmp_path / "x.img")
    assert os.path.getsize(tmp_path / "x.img") == IMAGE_BYTES


@pytest.mark.slow
def test_two_queues_and_4k_blocks(tmp_path: Path) -> None:
    """Multiqueue negotiation and a 4096-byte logical block: a misaligned sector is refused."""
    image = tmp_path / "4k.img"
    make_image(image)
    with (QsdExport(image, tmp_path / "4k.sock", tmp_path, num_queues=2,
                    logical_block_size=4096) as qsd,
          BlkFrontend(qsd.socket_path, num_queues=2) as fe):
        assert fe.backend_queues == 2 and fe.config.num_queues == 2
        assert fe.config.blk_size == 4096
        on_q1 = fe.run([write_parts(16, pattern(5, 4096))], queue=1)[0]
        assert on_q1.status == Status.OK
        assert fe.read(16, 4096).data == pattern(5, 4096)       # queue 0 sees it
        assert fe.write(1, bytes(4096)).status == Status.IOERR   # sector not 4k-aligned
        # qemu-storage-daemon checks the sector's alignment, not the length's
        # (virtio_blk_sect_range_ok): the block layer does read-modify-write.
        assert fe.write(8, bytes(512)).status == Status.OK
