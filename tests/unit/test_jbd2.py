"""logwrites.jbd2: the pure parsing pieces, and hand-made journals replayed against e2fsck.

The hand-made journals cover what a short real workload may never produce: escaped blocks,
revoke records (and a block journalled again after its revoke), two transactions writing the
same block, an uncommitted transaction at the end, and the refusals (a damaged data block
checksum, fast commits, orphans). e2fsck's `-E journal_only` is the oracle.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from logwrites import jbd2
from tests.conftest import require_tool

BE32 = struct.Struct(">I")
V3_64 = jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V3 | jbd2.JBD2_FEATURE_INCOMPAT_64BIT


def _crc():
    crc = jbd2.crc32c()
    assert crc is not None, "libext2fs's crc32c did not load: apt-get install e2fsprogs"
    return crc


def test_tid_gt_wraps() -> None:
    assert jbd2.tid_gt(5, 4) and not jbd2.tid_gt(4, 5) and not jbd2.tid_gt(7, 7)
    assert jbd2.tid_gt(1, 0xFFFFFFFF)        # 1 comes after the wrap
    assert not jbd2.tid_gt(0xFFFFFFFF, 1)


def _jsb(incompat: int = 0, **fields: int) -> jbd2.JournalSuper:
    base = dict(blocksize=1024, maxlen=1024, first=1, sequence=7, start=1, errno=0, compat=0,
                incompat=incompat, ro_compat=0, version=2)
    base.update(fields)
    return jbd2.JournalSuper(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("incompat", "size"), [
    (0, 8), (jbd2.JBD2_FEATURE_INCOMPAT_64BIT, 12), (jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V2, 10),
    (jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V2 | jbd2.JBD2_FEATURE_INCOMPAT_64BIT, 14),
    (jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V3, 16), (V3_64, 16)])
def test_tag_bytes_as_journal_tag_bytes(incompat: int, size: int) -> None:
    assert _jsb(incompat).tag_bytes == size


def _descriptor(tags: list[tuple[int, int, int]], incompat: int, bs: int = 1024) -> bytes:
    """A descriptor block; tags (blocknr, flags, csum); a UUID after the first tag only."""
    out = bytearray(bs)
    BE32.pack_into(out, 0, jbd2.JBD2_MAGIC)
    BE32.pack_into(out, 4, jbd2.JBD2_DESCRIPTOR_BLOCK)
    at = 12
    for k, (blocknr, flags, csum) in enumerate(tags):
        flags |= (jbd2.JBD2_FLAG_SAME_UUID if k else 0)
        flags |= jbd2.JBD2_FLAG_LAST_TAG if k == len(tags) - 1 else 0
        BE32.pack_into(out, at, blocknr & 0xFFFFFFFF)
        if incompat & jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V3:
            BE32.pack_into(out, at + 4, flags)
            BE32.pack_into(out, at + 8, blocknr >> 32)
            BE32.pack_into(out, at + 12, csum)
        else:
            out[at + 4:at + 6] = (csum & 0xFFFF).to_bytes(2, "big")
            out[at + 6:at + 8] = flags.to_bytes(2, "big")
            if incompat & jbd2.JBD2_FEATURE_INCOMPAT_64BIT:
                BE32.pack_into(out, at + 8, blocknr >> 32)
        at += _jsb(incompat).tag_bytes + (0 if k else 16)
    return bytes(out)


@pytest.mark.parametrize("incompat", [0, jbd2.JBD2_FEATURE_INCOMPAT_64BIT, V3_64,
                                      jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V2])
def test_parse_tags_walks_uuids_and_stops_at_the_last_tag(incompat: int) -> None:
    big = 5 << 32 | 9 if incompat & jbd2.JBD2_FEATURE_INCOMPAT_64BIT else 9
    tags = [(100, 0, 0xBEEF), (big, jbd2.JBD2_FLAG_ESCAPE, 0x1234), (300, 0, 7)]
    block = bytearray(_descriptor(tags, incompat))
    got = jbd2.parse_tags(bytes(block), _jsb(incompat))
    want_csum = [c if incompat & jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V3 else c & 0xFFFF
                 for _, _, c in tags]
    assert [b for b, _, _ in got] == [100, big, 300]
    assert [f & jbd2.JBD2_FLAG_ESCAPE for _, f, _ in got] == [0, 1, 0]
    if incompat & (jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V2 | jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V3):
        assert [c for _, _, c in got] == want_csum
    # Garbage after the last tag is never read as a tag.
    block[-200:-4] = b"\xff" * 196
    assert len(jbd2.parse_tags(bytes(block), _jsb(incompat))) == 3


def test_parse_tags_stops_at_the_block_tail_without_a_last_tag() -> None:
    # A descriptor filled with tags and no LAST_TAG: the walk ends where the tail begins.
    jsb = _jsb(V3_64)
    block = bytearray(1024)
    BE32.pack_into(block, 0, jbd2.JBD2_MAGIC)
    for at in range(12, 1024 - 4 - 15, 16):
        BE32.pack_into(block, at + 4, jbd2.JBD2_FLAG_SAME_UUID)
    assert len(jbd2.parse_tags(bytes(block), jsb)) == (1024 - 4 - 12) // 16


def test_parse_revoke_32_and_64_bit_and_a_bad_count() -> None:
    block = bytearray(1024)
    struct.pack_into(">IIII", block, 0, jbd2.JBD2_MAGIC, jbd2.JBD2_REVOKE_BLOCK, 3, 16 + 12)
    struct.pack_into(">III", block, 16, 10, 11, 12)
    assert jbd2.parse_revoke(bytes(block), _jsb()) == [10, 11, 12]
    struct.pack_into(">IIII", block, 0, jbd2.JBD2_MAGIC, jbd2.JBD2_REVOKE_BLOCK, 3, 16 + 16)
    struct.pack_into(">QQ", block, 16, 1 << 33, 42)
    assert jbd2.parse_revoke(bytes(block), _jsb(V3_64)) == [1 << 33, 42]
    struct.pack_into(">I", block, 12, 1022)  # past the checksum tail
    with pytest.raises(jbd2.NotHandled, match="r_count"):
        jbd2.parse_revoke(bytes(block), _jsb(V3_64))


def _journal_super_block(incompat: int = 0, *, compat: int = 0, errno: int = 0,
                         nr_users: int = 1, blocktype: int = jbd2.JBD2_SUPERBLOCK_V2,
                         bs: int = 1024) -> bytearray:
    block = bytearray(bs)
    struct.pack_into(">III IIIII I III", block, 0, jbd2.JBD2_MAGIC, blocktype, 0,
                     bs, 1024, 1, 7, 1, errno, compat, incompat, 0)
    block[0x30:0x40] = bytes(range(16))
    BE32.pack_into(block, jbd2.JSB_NR_USERS, nr_users)
    if incompat & (jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V2 | jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V3):
        block[jbd2.JSB_CHECKSUM_TYPE] = jbd2.JBD2_CRC32C_CHKSUM
        sb = bytes(block[:jbd2.JSB_CHECKSUM]) + bytes(4) + bytes(block[jbd2.JSB_CHECKSUM + 4:1024])
        BE32.pack_into(block, jbd2.JSB_CHECKSUM, _crc()(0xFFFFFFFF, sb))
    return block


def test_parse_journal_super_accepts_v3_and_refuses_what_e2fsck_would_fix() -> None:
    crc = _crc()
    jsb = jbd2.parse_journal_super(bytes(_journal_super_block(V3_64)), 1024, 1024, crc)
    assert (jsb.sequence, jsb.start, jsb.first, jsb.maxlen, jsb.csum_v2or3) == (
        7, 1, 1, 1024, True)
    damaged = _journal_super_block(V3_64)
    damaged[0x20] ^= 1  # s_errno changed after the checksum was set
    refusals = {
        "superblock checksum": damaged,
        "fast commits": _journal_super_block(jbd2.JBD2_FEATURE_INCOMPAT_FAST_COMMIT),
        "unknown journal features": _journal_super_block(0x100),
        "v1 transaction checksums": _journal_super_block(
            compat=jbd2.JBD2_FEATURE_COMPAT_CHECKSUM),
        "errno": _journal_super_block(errno=5),
        "several filesystems": _journal_super_block(nr_users=2),
        "v2 fields": _journal_super_block(jbd2.JBD2_FEATURE_INCOMPAT_REVOKE,
                                          blocktype=jbd2.JBD2_SUPERBLOCK_V1),
        "journal superblock type": _journal_super_block(blocktype=jbd2.JBD2_DESCRIPTOR_BLOCK),
    }
    for why, block in refusals.items():
        with pytest.raises(jbd2.NotHandled, match=why):
            jbd2.parse_journal_super(bytes(block), 1024, 1024, crc)
    with pytest.raises(jbd2.NotHandled, match="block size"):
        jbd2.parse_journal_super(bytes(_journal_super_block()), 4096, 1024, crc)
    with pytest.raises(jbd2.NotHandled, match="too short"):
        jbd2.parse_journal_super(bytes(_journal_super_block()), 1024, 512, crc)


def test_extent_map_follows_index_nodes() -> None:
    bs = 1024
    leaf = bytearray(bs)
    struct.pack_into("<HHHHI", leaf, 0, jbd2.EXTENT_MAGIC, 2, 84, 0, 0)
    struct.pack_into("<IHHI", leaf, 12, 0, 100, 0, 5000)
    struct.pack_into("<IHHI", leaf, 24, 100, 32768 + 28, 1, 7)  # unwritten, block 1<<32|7
    root = bytearray(60)
    struct.pack_into("<HHHHI", root, 0, jbd2.EXTENT_MAGIC, 1, 4, 1, 0)
    struct.pack_into("<IIHH", root, 12, 0, 77, 0, 0)
    reads = []

    def read(offset: int, length: int) -> bytes:
        reads.append(offset)
        assert (offset, length) == (77 * bs, bs)
        return bytes(leaf)

    assert jbd2.extent_map(read, bytes(root), bs) == [(0, 5000, 100), (100, 1 << 32 | 7, 28)]
    root[0] = 0
    with pytest.raises(jbd2.NotHandled, match="extent tree"):
        jbd2.extent_map(read, bytes(root), bs)


def test_block_map_reads_indirect_blocks_and_merges_runs() -> None:
    bs = 1024
    i_block = struct.pack("<15I", *range(200, 212), 300, 0, 0)
    indirect = struct.pack("<256I", *range(212, 468))

    def read(offset: int, length: int) -> bytes:
        assert offset == 300 * bs
        return indirect

    assert jbd2.block_map(read, i_block, bs, 20) == [(0, 200, 20)]
    holey = struct.pack("<15I", 200, 0, *range(202, 212), 300, 0, 0)
    with pytest.raises(jbd2.NotHandled, match="hole"):
        jbd2.block_map(read, holey, bs, 20)


# --- hand-made journals on a real mkfs'd image, e2fsck as the oracle -------------------------

class Image:
    """A fresh ext4 image (no checksums, 1 KiB blocks) whose journal the test writes."""

    def __init__(self, path: Path, mkfs_opts: tuple[str, ...] = ()) -> None:
        mkfs = require_tool("mkfs.ext4", "e2fsprogs")
        require_tool("e2fsck", "e2fsprogs")
        self.path = path
        with open(path, "wb") as f:
            f.truncate(8 << 20)
        subprocess.run([mkfs, "-q", "-F", "-b", "1024", *mkfs_opts, str(path)], check=True)
        with open(path, "r+b") as f:
            fs, runs, _nblocks, _ = jbd2._open_journal(f.fileno())
        self.bs, self.runs = fs.blocksize, runs
        raw = path.read_bytes()
        self.jsb = bytearray(raw[self.offset(0):self.offset(0) + self.bs])
        self.blocks_count = fs.blocks_count
        self.incompat = 0
        self.seed = 0

    def offset(self, jblock: int) -> int:
        for lblk, pblk, length in self.runs:
            if lblk <= jblock < lblk + length:
                return (pblk + jblock - lblk) * self.bs
        raise AssertionError(jblock)

    def set_features(self, incompat: int) -> None:
        """As the kernel does at mount: journal features, crc32c, the superblock checksum."""
        self.incompat = incompat
        BE32.pack_into(self.jsb, 0x28, incompat)
        self.jsb[jbd2.JSB_CHECKSUM_TYPE] = jbd2.JBD2_CRC32C_CHKSUM if incompat & V3_64 else 0
        self.seed = _crc()(0xFFFFFFFF, bytes(self.jsb[0x30:0x40]))

    def write(self, transactions: list[list], start: int = 1, sequence: int = 100,
              damage_tag: int | None = None) -> None:
        """Each transaction: list of ("data", fs block, bytes) or ("revoke", [blocks]) or
        "nocommit" (leave it uncommitted). Writes the log from journal block `start`."""
        crc = _crc()
        csum = bool(self.incompat & jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V3)
        jblock = start
        with open(self.path, "r+b") as f:
            maxlen = BE32.unpack_from(self.jsb, 0x10)[0]

            def put(data: bytes) -> None:
                nonlocal jblock
                f.seek(self.offset(jblock))
                f.write(data)
                jblock = jblock + 1 if jblock + 1 < maxlen else 1  # s_first

            def tail(block: bytearray, at: int) -> bytes:
                if csum:
                    block[at:at + 4] = bytes(4)
                    BE32.pack_into(block, at, crc(self.seed, bytes(block)))
                return bytes(block)

            n = 0
            for k, items in enumerate(transactions):
                seq = (sequence + k) & 0xFFFFFFFF
                revokes = [x for x in items if x[0] == "revoke"]
                for _, blocks in revokes:
                    r = bytearray(self.bs)
                    size = 8 if self.incompat & jbd2.JBD2_FEATURE_INCOMPAT_64BIT else 4
                    struct.pack_into(">IIII", r, 0, jbd2.JBD2_MAGIC, jbd2.JBD2_REVOKE_BLOCK,
                                     seq, 16 + size * len(blocks))
                    for k, b in enumerate(blocks):
                        r[16 + size * k:16 + size * (k + 1)] = b.to_bytes(size, "big")
                    put(tail(r, self.bs - 4))
                data = [x for x in items if x[0] == "data"]
                if data:
                    tags = []
                    payloads = []
                    for _, fsblock, payload in data:
                        flags = 0
                        if payload[:4] == BE32.pack(jbd2.JBD2_MAGIC):
                            payload = bytes(4) + payload[4:]
                            flags = jbd2.JBD2_FLAG_ESCAPE
                        tag_csum = crc(crc(self.seed, seq.to_bytes(4, "big")), payload)
                        if damage_tag == n:
                            tag_csum ^= 1
                        n += 1
                        tags.append((fsblock, flags, tag_csum))
                        payloads.append(payload)
                    d = bytearray(_descriptor(tags, self.incompat, self.bs))
                    BE32.pack_into(d, 8, seq)
                    put(tail(d, self.bs - 4))
                    for payload in payloads:
                        put(payload)
                if "nocommit" in items:
                    continue
                c = bytearray(self.bs)
                struct.pack_into(">III", c, 0, jbd2.JBD2_MAGIC, jbd2.JBD2_COMMIT_BLOCK, seq)
                put(tail(c, jbd2.COMMIT_CHKSUM0))
            BE32.pack_into(self.jsb, jbd2.JSB_SEQUENCE, sequence)
            BE32.pack_into(self.jsb, jbd2.JSB_START, start)
            if csum:
                self.jsb[jbd2.JSB_CHECKSUM:jbd2.JSB_CHECKSUM + 4] = bytes(4)
                BE32.pack_into(self.jsb, jbd2.JSB_CHECKSUM,
                               crc(0xFFFFFFFF, bytes(self.jsb[:jbd2.JSB_SIZE])))
            f.seek(self.offset(0))
            f.write(self.jsb)
            # The superblock's RECOVER flag, as a mounted filesystem has it (and its checksum).
            f.seek(1024)
            sb = bytearray(f.read(1024))
            incompat = struct.unpack_from("<I", sb, jbd2.S_FEATURE_INCOMPAT)[0]
            struct.pack_into("<I", sb, jbd2.S_FEATURE_INCOMPAT, incompat | jbd2.INCOMPAT_RECOVER)
            struct.pack_into("<I", sb, jbd2.S_CHECKSUM, crc(0xFFFFFFFF, bytes(sb[:0x3FC])))
            f.seek(1024)
            f.write(sb)

    def replay_both(self, tmp: Path) -> tuple[bytes, bytes, bytes, jbd2.Replay | None]:
        """(state, after e2fsck -E journal_only -y, after ours or b"" if refused, replay)."""
        want = self.path.read_bytes()
        theirs, ours = tmp / "theirs.img", tmp / "ours.img"
        shutil.copyfile(self.path, theirs)
        shutil.copyfile(self.path, ours)
        subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(theirs)],
                       capture_output=True, check=False)
        fd = os.open(ours, os.O_RDWR)
        try:
            try:
                done = jbd2.replay(fd, now=0)
            except jbd2.NotHandled:
                assert ours.read_bytes() == want, "refused, yet the image changed"
                return want, theirs.read_bytes(), b"", None
            got = ours.read_bytes()
            done.restore()
            assert ours.read_bytes() == want, "restore left a difference"
        finally:
            os.close(fd)
        return want, theirs.read_bytes(), got, done


def _same_but_sb_stamps(ours: bytes, theirs: bytes) -> bool:
    """Equal once ours has e2fsck's s_wtime and s_kbytes_written (and the checksum they
    give): the two fields e2fsck stamps from its clock and its I/O counters."""
    sb = bytearray(ours[1024:2048])
    for at, size in ((jbd2.S_WTIME, 4), (jbd2.S_KBYTES_WRITTEN, 8)):
        sb[at:at + size] = theirs[1024 + at:1024 + at + size]
    if int.from_bytes(sb[jbd2.S_FEATURE_RO_COMPAT:jbd2.S_FEATURE_RO_COMPAT + 4],
                      "little") & jbd2.RO_COMPAT_METADATA_CSUM:
        sb[jbd2.S_CHECKSUM:] = _crc()(0xFFFFFFFF, bytes(sb[:jbd2.S_CHECKSUM])).to_bytes(4,
                                                                                      "little")
    return ours[:1024] + bytes(sb) + ours[2048:] == theirs


def _payload(tag: int, bs: int = 1024, magic: bool = False) -> bytes:
    head = BE32.pack(jbd2.JBD2_MAGIC) if magic else b"LW"
    return (head + bytes([tag]) * bs)[:bs]


@pytest.mark.parametrize("features", [0, V3_64 | jbd2.JBD2_FEATURE_INCOMPAT_REVOKE],
                         ids=["plain", "csum_v3"])
def test_escapes_revokes_and_rewrites_replay_as_e2fsck_does(tmp_path: Path,
                                                           features: int) -> None:
    image = Image(tmp_path / "fs.img", () if features else ("-O", "^metadata_csum,^64bit"))
    image.set_features(features)
    far = image.blocks_count - 10  # free blocks near the end of the filesystem
    image.write([
        [("data", far, _payload(1)), ("data", far + 1, _payload(2, magic=True)),
         ("data", far + 2, _payload(3))],
        [("revoke", [far + 2]), ("data", far + 3, _payload(4))],
        [("data", far, _payload(5)), ("data", far + 4, _payload(6))],
        [("revoke", [far + 4])],
        [("data", far + 4, _payload(7))],           # journalled again after its revoke
        [("data", far + 5, _payload(8)), "nocommit"],  # never committed: not replayed
    ])
    want, theirs, ours, done = image.replay_both(tmp_path)
    assert done is not None, "refused a well-formed journal"
    assert (done.transactions, done.blocks) == (5, 4)
    assert theirs != want and _same_but_sb_stamps(ours, theirs)
    bs = image.bs
    assert ours[(far + 1) * bs:(far + 1) * bs + 4] == BE32.pack(jbd2.JBD2_MAGIC)  # unescaped
    assert ours[far * bs:(far + 1) * bs] == _payload(5)
    assert ours[(far + 2) * bs:(far + 3) * bs] == want[(far + 2) * bs:(far + 3) * bs]  # revoked
    assert ours[(far + 4) * bs:(far + 5) * bs] == _payload(7)
    assert ours[(far + 5) * bs:(far + 6) * bs] == want[(far + 5) * bs:(far + 6) * bs]


def test_a_wrapped_log_replays_as_e2fsck_does(tmp_path: Path) -> None:
    image = Image(tmp_path / "fs.img")
    image.set_features(V3_64 | jbd2.JBD2_FEATURE_INCOMPAT_REVOKE)
    maxlen = BE32.unpack_from(image.jsb, 0x10)[0]
    far = image.blocks_count - 10
    # Start three blocks before the end: the second transaction wraps to s_first.
    image.write([[("data", far, _payload(1))], [("data", far + 1, _payload(2)),
                                                 ("data", far + 2, _payload(3))]],
                start=maxlen - 3, sequence=0xFFFFFFFF)  # the sequence wraps too
    _want, theirs, ours, done = image.replay_both(tmp_path)
    assert done is not None and (done.transactions, done.blocks) == (2, 3)
    assert _same_but_sb_stamps(ours, theirs)
    assert BE32.unpack_from(ours, image.offset(0) + jbd2.JSB_SEQUENCE)[0] == 2


def test_a_bad_data_block_checksum_is_left_to_e2fsck(tmp_path: Path) -> None:
    image = Image(tmp_path / "fs.img")
    image.set_features(V3_64 | jbd2.JBD2_FEATURE_INCOMPAT_REVOKE)
    far = image.blocks_count - 10
    image.write([[("data", far, _payload(1)), ("data", far + 1, _payload(2))]], damage_tag=1)
    _want, theirs, ours, done = image.replay_both(tmp_path)
    assert done is None and ours == b""
    # e2fsck skipped the block and marked the filesystem: not a path to imitate.
    assert theirs[(far + 1) * image.bs:(far + 2) * image.bs] != _payload(2)


def _with_orphan(sb: bytes) -> bytes:
    """A superblock whose orphan list starts at inode 12, its checksum set."""
    block = bytearray(sb)
    struct.pack_into("<I", block, jbd2.S_LAST_ORPHAN, 12)
    struct.pack_into("<I", block, jbd2.S_CHECKSUM, _crc()(0xFFFFFFFF, bytes(block[:0x3FC])))
    return bytes(block)


def test_an_orphan_list_after_the_replay_is_left_to_e2fsck(tmp_path: Path) -> None:
    image = Image(tmp_path / "fs.img")
    image.set_features(V3_64 | jbd2.JBD2_FEATURE_INCOMPAT_REVOKE)
    # 1 KiB blocks: block 1 is the superblock.
    image.write([[("data", 1, _with_orphan(image.path.read_bytes()[1024:2048]))]])
    _want, _, ours, done = image.replay_both(tmp_path)
    assert done is None and ours == b""


def test_scan_cache_resumes_and_notices_a_changed_byte(tmp_path: Path) -> None:
    image = Image(tmp_path / "fs.img")
    image.set_features(V3_64 | jbd2.JBD2_FEATURE_INCOMPAT_REVOKE)
    far = image.blocks_count - 10
    image.write([[("data", far, _payload(1))], [("data", far + 1, _payload(2))]])
    cache = jbd2.ScanCache()
    fd = os.open(image.path, os.O_RDWR)
    try:
        for _ in range(2):
            jbd2.replay(fd, now=0, cache=cache).restore()
        assert cache.hits == 1
        # A replayed block changed in the journal: the cached checksums must not be trusted.
        os.pwrite(fd, b"X", image.offset(2) + 100)  # the first transaction's data block
        with pytest.raises(jbd2.NotHandled, match="checksum of journalled block"):
            jbd2.replay(fd, now=0, cache=cache)
        assert cache.hits == 1
    finally:
        os.close(fd)


def test_a_journal_inode_e2fsck_would_rebuild_is_left_to_e2fsck(tmp_path: Path) -> None:
    image = Image(tmp_path / "fs.img")
    image.set_features(V3_64 | jbd2.JBD2_FEATURE_INCOMPAT_REVOKE)
    image.write([[("data", image.blocks_count - 10, _payload(1))]])
    subprocess.run([require_tool("debugfs", "e2fsprogs"), "-w", "-R", "sif <8> links_count 0",
                    str(image.path)], check=True, capture_output=True)
    _, _, ours, done = image.replay_both(tmp_path)
    assert done is None and ours == b""


def test_fsck_replays_in_process_or_falls_back_to_e2fsck_and_leaves_the_image(
        tmp_path: Path) -> None:
    from logwrites.check import FsckChecker

    image = Image(tmp_path / "fs.img")
    image.set_features(V3_64 | jbd2.JBD2_FEATURE_INCOMPAT_REVOKE)
    image.write([[("data", image.blocks_count - 10, _payload(1))]])
    before = image.path.read_bytes()
    ours, old = FsckChecker("ext4"), FsckChecker("ext4", in_process_replay=False)
    got, want = ours.check(image.path, expect_fs=True), old.check(image.path, expect_fs=True)
    assert image.path.read_bytes() == before
    assert (got.verdict, want.verdict) == ("pass", "pass"), got.output
    assert "in-process journal replay" in got.output
    assert (ours.journal_replays_in_process, old.journal_replays_in_process) == (1, 0)
    # A state jbd2 refuses (an orphan list after the replay) goes to e2fsck, unchanged.
    image.write([[("data", 1, _with_orphan(before[1024:2048]))]])
    before = image.path.read_bytes()
    fallback = ours.check(image.path, expect_fs=True)
    assert image.path.read_bytes() == before
    assert "in-process journal replay" not in fallback.output
    assert (ours.journal_replays_in_process, ours.undo_in_process) == (1, 2)


def test_a_plan_says_what_it_was_made_from_and_where_the_scan_stopped(
        tmp_path: Path) -> None:
    image = Image(tmp_path / "fs.img")
    image.set_features(V3_64 | jbd2.JBD2_FEATURE_INCOMPAT_REVOKE)
    far = image.blocks_count - 10
    committed = [[("data", far, _payload(1))], [("data", far + 1, _payload(2))]]
    image.write([*committed, [("data", far + 2, _payload(3)), "nocommit"]])
    before = image.path.read_bytes()
    fd = os.open(image.path, os.O_RDWR)
    try:
        plan = jbd2.plan(fd, now=0)
        assert image.path.read_bytes() == before  # a plan writes nothing
        done = plan.apply()
        replayed = image.path.read_bytes()
        done.restore()
    finally:
        os.close(fd)
    assert image.path.read_bytes() == before
    assert replayed[far * image.bs:(far + 2) * image.bs] == _payload(1) + _payload(2)
    assert all(before[at:at + len(data)] == data for at, data in plan.reads)
    covered = set()
    for at, data in plan.reads:
        covered.update(range(at // image.bs, (at + len(data) + image.bs - 1) // image.bs))
    # The superblock, the journal superblock and blocks 1-6 (two transactions: descriptor,
    # copy, commit); not the uncommitted third (7-8), whose only part in the plan is that
    # the scan stopped after block 6, which the outcome says.
    assert 1 in covered and image.offset(0) // image.bs in covered
    assert {image.offset(j) // image.bs for j in range(1, 7)} <= covered
    assert image.offset(7) // image.bs not in covered
    assert plan.outcome == (len(before), 102, 7) == done.outcome
    assert (plan.transactions, plan.blocks) == (2, 2)


def test_scan_cache_with_a_record_of_writes_compares_only_what_was_written(
        tmp_path: Path) -> None:
    from logwrites.imagechanges import ImageChanges

    image = Image(tmp_path / "fs.img")
    image.set_features(V3_64 | jbd2.JBD2_FEATURE_INCOMPAT_REVOKE)
    far = image.blocks_count - 10
    image.write([[("data", far, _payload(1))], [("data", far + 1, _payload(2))]])
    changes, cache = ImageChanges(), jbd2.ScanCache()
    data_block = image.offset(2) + 100  # the first transaction's journalled copy
    fd = os.open(image.path, os.O_RDWR)
    try:
        for _ in range(2):
            jbd2.replay(fd, now=0, cache=cache, changes=changes).restore()
        assert cache.hits == 1
        # Written with the same byte: compared, equal, still a hit.
        old = os.pread(fd, 1, data_block)
        changes.wrote(data_block, 1)
        os.pwrite(fd, old, data_block)
        jbd2.replay(fd, now=0, cache=cache, changes=changes).restore()
        assert cache.hits == 2
        # Written with another byte: compared, the cached scan is not trusted.
        changes.wrote(data_block, 1)
        os.pwrite(fd, b"X", data_block)
        with pytest.raises(jbd2.NotHandled, match="checksum of journalled block"):
            jbd2.replay(fd, now=0, cache=cache, changes=changes)
        assert cache.hits == 2
        os.pwrite(fd, old, data_block)
        changes.forget()  # rebuilt: everything is compared
        jbd2.replay(fd, now=0, cache=cache, changes=changes).restore()
        jbd2.replay(fd, now=0, cache=cache, changes=changes).restore()
        assert cache.hits == 3
    finally:
        os.close(fd)


def test_scan_cache_keeps_one_map_per_file_and_size(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(b"A" * 8192)
    b.write_bytes(b"B" * 8192)
    cache = jbd2.ScanCache()
    with open(a, "r+b") as fa, open(b, "rb") as fb:
        with cache.view(fa.fileno(), 8192) as first:
            assert first[:1] == b"A"
        with cache.view(fa.fileno(), 8192) as again:
            assert again is first  # kept: no fresh map and page faults per state
        fa.write(b"Z")
        fa.flush()
        with cache.view(fa.fileno(), 8192) as again:
            assert again is first and again[:1] == b"Z"  # a shared map sees every write
        with cache.view(fb.fileno(), 8192) as other:
            assert other is not first and other[:1] == b"B" and first.closed
        fa.truncate(4096)
        with cache.view(fa.fileno(), 4096) as shorter:
            assert len(shorter) == 4096
