"""The test front-end's pure parts: guest-memory allocator, ring layout, request layouts."""

from __future__ import annotations

import struct

import pytest

from vhost.testing.frontend import (
    CONFIG,
    OUTHDR,
    BlkConfig,
    Layout,
    ReqType,
    _chain,
    read_parts,
    request_parts,
    write_parts,
)
from vhost.testing.protocol import FrontendError
from vhost.testing.virtqueue import (
    DESC,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    GuestMemory,
    RawDesc,
    SplitQueue,
)


def test_allocator_reuses_and_coalesces() -> None:
    mem = GuestMemory(1 << 16, gpa_base=0x10000)
    try:
        a, b, c = mem.alloc(100), mem.alloc(4096, align=4096), mem.alloc(1)
        assert a >= 0x10000 and b % 4096 == 0 and len({a, b, c}) == 3
        mem.free(b)
        mem.free(a)
        mem.free(c)
        assert mem.free_bytes() == 1 << 16
        assert mem.alloc(1 << 16, align=1) == 0x10000      # one extent again
        with pytest.raises(FrontendError):
            mem.alloc(64)
    finally:
        mem.close()


def test_ring_publish_and_harvest() -> None:
    mem = GuestMemory(1 << 16)
    try:
        q = SplitQueue(mem, 0, 8)
        for head in (3, 5):
            q.publish(head)
        assert struct.unpack("<HHHH", mem.read(q.avail_gpa, 8)) == (0, 2, 3, 5)
        # A device publishing two used entries, the second one first.
        mem.write(q.used_gpa + 4, struct.pack("<IIII", 5, 1, 3, 4097))
        mem.write(q.used_gpa + 2, struct.pack("<H", 2))
        assert q.harvest() == [(5, 1), (3, 4097)]
        assert q.harvest() == []
        q.write_desc(2, RawDesc(2**64 + 5, -1, 0x1_0001, 9))        # values are truncated
        assert DESC.unpack(mem.read(q.desc_gpa + 32, 16)) == (5, 0xFFFFFFFF, 1, 9)
    finally:
        mem.close()


def test_queue_size_must_be_power_of_two() -> None:
    mem = GuestMemory(1 << 16)
    try:
        with pytest.raises(ValueError):
            SplitQueue(mem, 0, 100)
    finally:
        mem.close()


def test_default_layouts_match_linux() -> None:
    parts = write_parts(8, b"x" * 1024)
    assert parts == [OUTHDR.pack(ReqType.OUT, 0, 8), b"x" * 1024, 1]
    assert read_parts(16, 4096) == [OUTHDR.pack(ReqType.IN, 0, 16), 4096, 1]
    assert request_parts(ReqType.FLUSH) == [OUTHDR.pack(ReqType.FLUSH, 0, 0), 1]


def test_custom_layouts_cut_streams() -> None:
    parts = write_parts(0, b"ab" * 8, Layout(out_cuts=(3, 16, 20), writable_first=True))
    assert parts[0] == 1                                   # the status, first (hostile)
    assert [len(p) for p in parts[1:]] == [3, 13, 4, 12]
    merged = read_parts(0, 512, Layout(out_cuts=(), in_cuts=()))
    assert merged == [OUTHDR.pack(ReqType.IN, 0, 0), 513]
    split = read_parts(0, 512, Layout(in_cuts=(100, 512)))
    assert split[1:] == [100, 412, 1]


def test_chain_links_slots() -> None:
    descs = [RawDesc(0x1000, 16), RawDesc(0x2000, 1, VRING_DESC_F_WRITE)]
    chained = _chain(descs, [7, 2])
    assert chained[0] == RawDesc(0x1000, 16, VRING_DESC_F_NEXT, 2)
    assert chained[1] == RawDesc(0x2000, 1, VRING_DESC_F_WRITE, 0)


def test_config_decode() -> None:
    assert CONFIG.size == 60
    raw = bytearray(60)
    struct.pack_into("<Q", raw, 0, 32768)
    struct.pack_into("<I", raw, 20, 4096)
    raw[32] = 1
    struct.pack_into("<H", raw, 34, 2)
    cfg = BlkConfig.decode(bytes(raw))
    assert (cfg.capacity, cfg.blk_size, cfg.wce, cfg.num_queues) == (32768, 4096, 1, 2)
