"""Replay an ext4 filesystem's internal journal (jbd2) onto its image in place, as e2fsck's
journal-only recovery (`e2fsck -E journal_only -y`) leaves it, keeping the pre-image of every
block it changes so that the caller can put the image back byte for byte (`Replay.restore`).

This saves the crash-state checker one e2fsck process per ext4 state. It does the three
passes of the kernel's and e2fsck's recovery (find the end of the log, collect revoke records,
write every descriptor-tagged block that no later revoke covers, escaped blocks un-escaped),
verifies jbd2 checksums (v2/v3) where e2fsck does, and then leaves what e2fsck's recovery
leaves: the journal superblock emptied (`s_start` 0) with its sequence advanced past the last
transaction, and the ext4 superblock without its RECOVER flag, its write time `now`, its
lifetime-writes counter advanced and its checksum set.

Everything outside that well-trodden path is refused with `NotHandled` before a byte is
written (or after the replayed bytes are put back), and the caller runs e2fsck instead: an
external journal, fast commits, v1 (`COMPAT_CHECKSUM`) transaction checksums, unknown features,
a journal superblock e2fsck would rewrite, any checksum mismatch on a block inside the log (the
kernel and e2fsck then judge commit times, mark the filesystem with errors or skip blocks),
and an orphan list after the replay (e2fsck's journal-only run releases orphan inodes too).
`ScanCache` lets the next crash state's scan go on from the last one's last commit when the
journal bytes it read are unchanged (states in log order share most of their journal).
On-disk field names follow the kernel's (fs/jbd2/recovery.c, include/linux/jbd2.h, ext4.h).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from logwrites.imagechanges import ImageChanges

log = logging.getLogger(__name__)

# ext4 superblock (little-endian), at byte 1024 of the image.
SUPERBLOCK_OFFSET: Final = 1024
EXT4_MAGIC: Final = 0xEF53
S_INODES_COUNT: Final = 0x00
S_BLOCKS_COUNT_LO: Final = 0x04
S_FIRST_DATA_BLOCK: Final = 0x14
S_LOG_BLOCK_SIZE: Final = 0x18
S_INODES_PER_GROUP: Final = 0x28
S_WTIME: Final = 0x30
S_MAGIC: Final = 0x38
S_REV_LEVEL: Final = 0x4C
S_INODE_SIZE: Final = 0x58
S_FEATURE_COMPAT: Final = 0x5C
S_FEATURE_INCOMPAT: Final = 0x60
S_FEATURE_RO_COMPAT: Final = 0x64
S_JOURNAL_UUID: Final = 0xD0
S_JOURNAL_INUM: Final = 0xE0
S_JOURNAL_DEV: Final = 0xE4
S_LAST_ORPHAN: Final = 0xE8
S_JNL_BACKUP_TYPE: Final = 0xFD
S_DESC_SIZE: Final = 0xFE
S_JNL_BLOCKS: Final = 0x10C
S_BLOCKS_COUNT_HI: Final = 0x150
S_KBYTES_WRITTEN: Final = 0x178
S_CHECKSUM: Final = 0x3FC

COMPAT_HAS_JOURNAL: Final = 0x4
INCOMPAT_RECOVER: Final = 0x4
INCOMPAT_JOURNAL_DEV: Final = 0x8
INCOMPAT_META_BG: Final = 0x10
INCOMPAT_64BIT: Final = 0x80
INCOMPAT_MMP: Final = 0x100
RO_COMPAT_METADATA_CSUM: Final = 0x400
RO_COMPAT_ORPHAN_PRESENT: Final = 0x10000
EXT3_JNL_BACKUP_BLOCKS: Final = 1
EXT4_EXTENTS_FL: Final = 0x80000
EXTENT_MAGIC: Final = 0xF30A

# jbd2 (big-endian), include/linux/jbd2.h.
JBD2_MAGIC: Final = 0xC03B3998
JBD2_DESCRIPTOR_BLOCK: Final = 1
JBD2_COMMIT_BLOCK: Final = 2
JBD2_SUPERBLOCK_V1: Final = 3
JBD2_SUPERBLOCK_V2: Final = 4
JBD2_REVOKE_BLOCK: Final = 5
JBD2_FEATURE_COMPAT_CHECKSUM: Final = 0x1
JBD2_FEATURE_INCOMPAT_REVOKE: Final = 0x1
JBD2_FEATURE_INCOMPAT_64BIT: Final = 0x2
JBD2_FEATURE_INCOMPAT_ASYNC_COMMIT: Final = 0x4
JBD2_FEATURE_INCOMPAT_CSUM_V2: Final = 0x8
JBD2_FEATURE_INCOMPAT_CSUM_V3: Final = 0x10
JBD2_FEATURE_INCOMPAT_FAST_COMMIT: Final = 0x20
JBD2_KNOWN_INCOMPAT: Final = 0x3F
JBD2_CRC32C_CHKSUM: Final = 4
JBD2_MIN_JOURNAL_BLOCKS: Final = 1024
JBD2_FLAG_ESCAPE: Final = 1
JBD2_FLAG_SAME_UUID: Final = 2
JBD2_FLAG_LAST_TAG: Final = 8
JOURNAL_HEADER: Final = struct.Struct(">III")     # h_magic, h_blocktype, h_sequence
JSB_FIELDS: Final = struct.Struct(">IIIII I III")  # s_blocksize .. s_feature_ro_compat
JSB_SIZE: Final = 1024                             # sizeof(journal_superblock_t)
JSB_SEQUENCE: Final = 0x18
JSB_START: Final = 0x1C
JSB_NR_USERS: Final = 0x40
JSB_CHECKSUM_TYPE: Final = 0x50
JSB_CHECKSUM: Final = 0xFC
COMMIT_CHKSUM0: Final = 0x10                       # commit_header.h_chksum[0]
REVOKE_HEADER: Final = struct.Struct(">IIII")      # header, r_count
BLOCK_TAIL: Final = 4                              # struct jbd2_journal_block_tail
_BE32: Final = struct.Struct(">I")
_BE64: Final = struct.Struct(">Q")
_LE16: Final = struct.Struct("<H")
_LE32: Final = struct.Struct("<I")
_LE64: Final = struct.Struct("<Q")
_EXTENT_HEADER: Final = struct.Struct("<HHHHI")    # magic, entries, max, depth, generation
_EXTENT: Final = struct.Struct("<IHHI")            # ee_block, ee_len, ee_start_hi, ee_start_lo
_EXTENT_INDEX: Final = struct.Struct("<IIHH")      # ei_block, ei_leaf_lo, ei_leaf_hi, unused


class NotHandled(Exception):
    """A journal (or filesystem) this module does not replay: the caller runs e2fsck."""


@functools.cache
def crc32c() -> Callable[[int, bytes], int] | None:
    """libext2fs's crc32c (`ext2fs_crc32c_le`: no final inversion, as jbd2's, ext4's and
    e2fsck undo files' checksums use it), or None if it cannot be loaded or gives a wrong
    answer."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("ext2fs") or "libext2fs.so.2")
        fn = lib.ext2fs_crc32c_le
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]

    def crc(seed: int, data: bytes) -> int:
        return int(fn(seed, data, len(data)))

    # CRC-32C check value: 0xE3069283 for "123456789", before its final inversion.
    return crc if crc(0xFFFFFFFF, b"123456789") == 0x1CF96D7C else None


def tid_gt(x: int, y: int) -> bool:
    """jbd2's wrapping comparison of transaction ids: x after y."""
    diff = (x - y) & 0xFFFFFFFF
    return 0 < diff < 0x80000000


@dataclass(frozen=True, slots=True)
class JournalSuper:
    """What recovery needs from the journal superblock."""

    blocksize: int
    maxlen: int
    first: int
    sequence: int
    start: int
    errno: int
    compat: int
    incompat: int
    ro_compat: int
    version: int

    @property
    def csum_v2or3(self) -> bool:
        return bool(self.incompat & (JBD2_FEATURE_INCOMPAT_CSUM_V2 |
                                     JBD2_FEATURE_INCOMPAT_CSUM_V3))

    @property
    def tag_bytes(self) -> int:
        """journal_tag_bytes(): the size of one block tag in a descriptor block."""
        if self.incompat & JBD2_FEATURE_INCOMPAT_CSUM_V3:
            return 16
        size = 12 + (2 if self.incompat & JBD2_FEATURE_INCOMPAT_CSUM_V2 else 0)
        return size if self.incompat & JBD2_FEATURE_INCOMPAT_64BIT else size - 4


def parse_journal_super(block: bytes, fs_blocksize: int, journal_blocks: int,
                        crc: Callable[[int, bytes], int]) -> JournalSuper:
    """The journal superblock, checked as e2fsck's journal load checks it; anything e2fsck
    would fix or refuse raises NotHandled."""
    magic, blocktype, _ = JOURNAL_HEADER.unpack_from(block)
    if magic != JBD2_MAGIC:
        raise NotHandled("no jbd2 magic in the journal superblock")
    (blocksize, maxlen, first, sequence, start, errno, compat, incompat,
     ro_compat) = JSB_FIELDS.unpack_from(block, 12)
    if blocktype == JBD2_SUPERBLOCK_V1:
        if compat or incompat or ro_compat or _BE32.unpack_from(block, JSB_NR_USERS)[0]:
            raise NotHandled("v1 journal superblock with v2 fields (e2fsck clears them)")
    elif blocktype == JBD2_SUPERBLOCK_V2:
        if _BE32.unpack_from(block, JSB_NR_USERS)[0] > 1:
            raise NotHandled("journal shared by several filesystems")
    else:
        raise NotHandled(f"journal superblock type {blocktype}")
    jsb = JournalSuper(blocksize, maxlen, first, sequence, start, errno, compat, incompat,
                       ro_compat, 1 if blocktype == JBD2_SUPERBLOCK_V1 else 2)
    if incompat & ~JBD2_KNOWN_INCOMPAT or ro_compat:
        raise NotHandled(f"unknown journal features {incompat:#x}/{ro_compat:#x}")
    if incompat & JBD2_FEATURE_INCOMPAT_FAST_COMMIT:
        raise NotHandled("fast commits")
    if compat & JBD2_FEATURE_COMPAT_CHECKSUM:
        raise NotHandled("v1 transaction checksums")
    both = JBD2_FEATURE_INCOMPAT_CSUM_V2 | JBD2_FEATURE_INCOMPAT_CSUM_V3
    if incompat & both == both:
        raise NotHandled("journal checksum v2 and v3 both set")
    if jsb.csum_v2or3:
        if block[JSB_CHECKSUM_TYPE] != JBD2_CRC32C_CHKSUM:
            raise NotHandled("journal checksum type")
        if _checksum_at(block[:JSB_SIZE], JSB_CHECKSUM, 0xFFFFFFFF, crc) != \
                _BE32.unpack_from(block, JSB_CHECKSUM)[0]:
            raise NotHandled("journal superblock checksum")
    if blocksize != fs_blocksize:
        raise NotHandled(f"journal block size {blocksize}, filesystem {fs_blocksize}")
    if maxlen > journal_blocks:
        raise NotHandled("journal too short")
    if not 0 < first < maxlen or (start and not first <= start < maxlen):
        raise NotHandled(f"journal bounds: first {first}, start {start}, maxlen {maxlen}")
    if errno:
        raise NotHandled(f"journal errno {errno} (e2fsck marks the filesystem with errors)")
    return jsb


def _checksum_at(block: bytes, at: int, seed: int, crc: Callable[[int, bytes], int]) -> int:
    """crc32c of `block` with its 4-byte checksum field at `at` taken as zero."""
    return crc(seed, block[:at] + bytes(4) + block[at + 4:])


def parse_tags(block: bytes, jsb: JournalSuper) -> list[tuple[int, int, int]]:
    """A descriptor block's tags: (fs block number, tag flags, tag checksum), in log order;
    each describes the next journal block after the descriptor (jbd2's count_tags walk)."""
    tag_bytes = jsb.tag_bytes
    v3 = jsb.incompat & JBD2_FEATURE_INCOMPAT_CSUM_V3
    is64 = jsb.incompat & JBD2_FEATURE_INCOMPAT_64BIT
    end = len(block) - (BLOCK_TAIL if jsb.csum_v2or3 else 0)
    tags = []
    at = JOURNAL_HEADER.size
    while at + tag_bytes <= end:
        blocknr = _BE32.unpack_from(block, at)[0]
        flags = int.from_bytes(block[at + 6:at + 8], "big")
        if is64:
            blocknr |= _BE32.unpack_from(block, at + 8)[0] << 32
        if v3:
            csum = _BE32.unpack_from(block, at + 12)[0]
        else:
            csum = int.from_bytes(block[at + 4:at + 6], "big")
        tags.append((blocknr, flags, csum))
        at += tag_bytes + (0 if flags & JBD2_FLAG_SAME_UUID else 16)
        if flags & JBD2_FLAG_LAST_TAG:
            break
    return tags


def parse_revoke(block: bytes, jsb: JournalSuper) -> list[int]:
    """A revoke block's fs block numbers (scan_revoke_records)."""
    rcount = REVOKE_HEADER.unpack_from(block)[3]
    if rcount > len(block) - (BLOCK_TAIL if jsb.csum_v2or3 else 0):
        raise NotHandled(f"revoke block r_count {rcount}")
    if jsb.incompat & JBD2_FEATURE_INCOMPAT_64BIT:
        return [_BE64.unpack_from(block, at)[0] for at in range(16, rcount - 7, 8)]
    return [_BE32.unpack_from(block, at)[0] for at in range(16, rcount - 3, 4)]


def extent_map(read: Callable[[int, int], bytes], i_block: bytes, blocksize: int
               ) -> list[tuple[int, int, int]]:
    """(logical block, physical block, length) runs of an extent-mapped inode, sorted."""
    runs: list[tuple[int, int, int]] = []

    def walk(node: bytes, depth_left: int) -> None:
        magic, entries, _, depth, _ = _EXTENT_HEADER.unpack_from(node)
        if magic != EXTENT_MAGIC or depth > depth_left or 12 + 12 * entries > len(node):
            raise NotHandled("journal inode: damaged extent tree")
        for k in range(entries):
            if depth == 0:
                lblk, length, hi, lo = _EXTENT.unpack_from(node, 12 + 12 * k)
                if length > 32768:  # an unwritten extent: its length is biased
                    length -= 32768
                runs.append((lblk, (hi << 32) | lo, length))
            else:
                _, lo, hi, _ = _EXTENT_INDEX.unpack_from(node, 12 + 12 * k)
                walk(read(((hi << 32) | lo) * blocksize, blocksize), depth - 1)

    walk(i_block, 5)
    return sorted(runs)


def block_map(read: Callable[[int, int], bytes], i_block: bytes, blocksize: int,
              nblocks: int) -> list[tuple[int, int, int]]:
    """(logical, physical, 1) runs of a block-mapped (ext2/3 style) inode, merged."""
    per = blocksize // 4
    physical: list[int] = []

    def walk(block: int, level: int) -> None:
        if len(physical) >= nblocks:
            return
        if block == 0:
            raise NotHandled("journal inode: a hole in its block map")
        if level == 0:
            physical.append(block)
            return
        table = struct.unpack(f"<{per}I", read(block * blocksize, blocksize))
        for child in table:
            walk(child, level - 1)
            if len(physical) >= nblocks:
                return

    direct = struct.unpack("<15I", i_block)
    for k in range(12):
        walk(direct[k], 0)
    for level, k in ((1, 12), (2, 13), (3, 14)):
        walk(direct[k], level)
    runs: list[tuple[int, int, int]] = []
    for lblk, pblk in enumerate(physical):
        if runs and runs[-1][1] + runs[-1][2] == pblk:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((lblk, pblk, 1))
    return runs


@dataclass(slots=True)
class Plan:
    """A journal recovery worked out and not yet made: `writes` (image byte offset, bytes),
    in order; `apply` makes them. `transactions` to replay, `blocks` of them to write.
    `reads` (byte offset, the bytes there): what the plan was made from (the superblock, the
    journal inode and its map, the journal superblock, the committed journal); `outcome`
    (image size, first transaction not committed, the journal block after the last commit)
    says where the scan stopped. Two images with the same outcome and the same bytes at
    `reads` get the same plan: the journal past the last commit only decides whether the
    scan goes on, which the outcome tells."""

    fd: int
    writes: list[tuple[int, bytes]]
    transactions: int
    blocks: int
    reads: list[tuple[int, bytes]]
    outcome: tuple[int, int, int]

    def apply(self) -> Replay:
        """Make the writes, keeping what they overwrite.
        :raise OSError: a write failed; what had been written was put back first, but if that
          failed too the image is not what it was."""
        done = Replay(self.fd, transactions=self.transactions, blocks=self.blocks,
                      reads=self.reads, outcome=self.outcome)
        try:
            for offset, data in self.writes:
                done.write(offset, data)
        except BaseException:
            done.restore()
            raise
        return done


@dataclass(slots=True)
class Replay:
    """What a replay wrote: `pre_images` (byte offset, the bytes that were there), in write
    order; `restore` puts them back. `transactions` replayed, `blocks` written; `reads` and
    `outcome` as its `Plan` had them."""

    fd: int
    pre_images: list[tuple[int, bytes]] = field(default_factory=list)
    transactions: int = 0
    blocks: int = 0
    reads: list[tuple[int, bytes]] = field(default_factory=list)
    outcome: tuple[int, int, int] = (0, 0, 0)

    def write(self, offset: int, data: bytes) -> None:
        self.pre_images.append((offset, _pread(self.fd, len(data), offset)))
        _pwrite(self.fd, data, offset)

    def restore(self) -> None:
        """Put every pre-image back, last write first. :raise OSError: on a failed write."""
        for offset, data in reversed(self.pre_images):
            _pwrite(self.fd, data, offset)
        self.pre_images.clear()


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise NotHandled(f"short read of {length} bytes at byte {offset}")
    return data


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    if os.pwrite(fd, data, offset) != len(data):
        raise OSError(f"short write of {len(data)} bytes at byte {offset}")


class _Filesystem:
    """The ext4 facts recovery needs, read from the image's superblock."""

    def __init__(self, sb: bytes) -> None:
        if _LE16.unpack_from(sb, S_MAGIC)[0] != EXT4_MAGIC:
            raise NotHandled("no ext4 superblock")
        self.compat = _LE32.unpack_from(sb, S_FEATURE_COMPAT)[0]
        self.incompat = _LE32.unpack_from(sb, S_FEATURE_INCOMPAT)[0]
        self.ro_compat = _LE32.unpack_from(sb, S_FEATURE_RO_COMPAT)[0]
        log_bs = _LE32.unpack_from(sb, S_LOG_BLOCK_SIZE)[0]
        if log_bs > 6:
            raise NotHandled(f"s_log_block_size {log_bs}")
        self.blocksize = 1024 << log_bs
        self.blocks_count = _LE32.unpack_from(sb, S_BLOCKS_COUNT_LO)[0]
        self.is64 = bool(self.incompat & INCOMPAT_64BIT)
        if self.is64:
            self.blocks_count |= _LE32.unpack_from(sb, S_BLOCKS_COUNT_HI)[0] << 32
        self.first_data_block = _LE32.unpack_from(sb, S_FIRST_DATA_BLOCK)[0]
        self.inodes_per_group = _LE32.unpack_from(sb, S_INODES_PER_GROUP)[0]
        rev = _LE32.unpack_from(sb, S_REV_LEVEL)[0]
        self.inode_size = _LE16.unpack_from(sb, S_INODE_SIZE)[0] if rev else 128
        desc_size = _LE16.unpack_from(sb, S_DESC_SIZE)[0]
        self.desc_size = desc_size if self.is64 and desc_size else 32
        self.journal_inum = _LE32.unpack_from(sb, S_JOURNAL_INUM)[0]
        if not self.compat & COMPAT_HAS_JOURNAL:
            raise NotHandled("needs_recovery without has_journal")
        if (self.incompat & (INCOMPAT_JOURNAL_DEV | INCOMPAT_MMP) or self.journal_inum == 0
                or _LE32.unpack_from(sb, S_JOURNAL_DEV)[0]
                or any(sb[S_JOURNAL_UUID:S_JOURNAL_UUID + 16])):
            raise NotHandled("external journal, journal device or MMP")
        if self.inodes_per_group == 0 or self.inode_size < 128:
            raise NotHandled("inode geometry")


def _journal_runs(fd: int, fs: _Filesystem, sb: bytes, reads: list[tuple[int, bytes]]
                  ) -> tuple[list[tuple[int, int, int]], int]:
    """The journal inode's block runs and its length in blocks; what it read is appended to
    `reads` as (byte offset, bytes)."""
    bs = fs.blocksize
    group, index = divmod(fs.journal_inum - 1, fs.inodes_per_group)
    per_block = bs // fs.desc_size
    if fs.incompat & INCOMPAT_META_BG and group // per_block:
        raise NotHandled("journal inode's group descriptor in a meta_bg")
    def read(offset: int, length: int) -> bytes:
        data = _pread(fd, length, offset)
        reads.append((offset, data))
        return data

    gd = read((fs.first_data_block + 1) * bs + group * fs.desc_size, fs.desc_size)
    table = _LE32.unpack_from(gd, 8)[0]
    if fs.desc_size >= 64:
        table |= _LE32.unpack_from(gd, 0x28)[0] << 32
    inode = read(table * bs + index * fs.inode_size, 128)
    i_block = inode[0x28:0x28 + 60]
    if sb[S_JNL_BACKUP_TYPE] == EXT3_JNL_BACKUP_BLOCKS and \
            i_block != sb[S_JNL_BLOCKS:S_JNL_BLOCKS + 60]:
        raise NotHandled("journal inode differs from its superblock backup")
    size = _LE32.unpack_from(inode, 0x4)[0] | (_LE32.unpack_from(inode, 0x6C)[0] << 32)
    nblocks = size // bs
    # e2fsck's journal inode checks: failing one, e2fsck -y would rebuild or drop the journal.
    mode, links = _LE16.unpack_from(inode, 0x0)[0], _LE16.unpack_from(inode, 0x1A)[0]
    if not links or mode & 0xF000 != 0x8000 or _LE32.unpack_from(inode, 0x20)[0] & 0x800:
        raise NotHandled("journal inode is not a plain regular file")
    if nblocks < JBD2_MIN_JOURNAL_BLOCKS:
        raise NotHandled(f"journal of {nblocks} blocks")
    if _LE32.unpack_from(inode, 0x20)[0] & EXT4_EXTENTS_FL:
        runs = extent_map(read, i_block, bs)
    else:
        runs = block_map(read, i_block, bs, nblocks)
    mapped = 0
    for lblk, _, length in runs:  # sorted: the journal's blocks must be mapped without holes
        if lblk != mapped:
            break
        mapped += length
    if mapped < nblocks:
        raise NotHandled("journal inode has holes or is shorter than its size")
    return runs, nblocks


class _Journal:
    """Journal block number -> image byte offset, reading through a read-only mmap."""

    def __init__(self, view: mmap.mmap, runs: list[tuple[int, int, int]], blocksize: int,
                 fs_blocks: int) -> None:
        if not runs:
            raise NotHandled("journal inode maps no blocks")
        self.view, self.runs, self.bs = view, runs, blocksize
        self.starts = [r[0] for r in runs]
        # Most journals are one extent from logical block 0: offsets without a search.
        self.contiguous = runs[0][2] if runs[0][0] == 0 else 0
        self.first = self.last = 0  # the log's bounds, once the journal superblock is read
        for _, pblk, length in runs:
            if pblk + length > fs_blocks or (pblk + length) * blocksize > len(view):
                raise NotHandled("journal block beyond the filesystem")

    def offset(self, jblock: int) -> int:
        if 0 <= jblock < self.contiguous:
            return (self.runs[0][1] + jblock) * self.bs
        k = bisect.bisect_right(self.starts, jblock) - 1
        if k < 0:
            raise NotHandled(f"journal block {jblock} not mapped")
        lblk, pblk, length = self.runs[k]
        if jblock >= lblk + length:
            raise NotHandled(f"journal block {jblock} not mapped")
        return (pblk + jblock - lblk) * self.bs

    def block(self, jblock: int) -> bytes:
        at = self.offset(jblock)
        return self.view[at:at + self.bs]

    def physical_blocks(self) -> list[tuple[int, int]]:
        return [(pblk, pblk + length) for _, pblk, length in self.runs]

    def ranges(self, start: int, count: int) -> list[tuple[int, int]]:
        """(image byte offset, length) runs holding `count` journal blocks from `start`,
        wrapping from s_maxlen back to s_first as the log does."""
        out: list[tuple[int, int]] = []
        jblock = start
        while count > 0:
            seg = min(count, self.last - jblock)
            count -= seg
            while seg > 0:
                k = bisect.bisect_right(self.starts, jblock) - 1
                if k < 0 or jblock >= self.starts[k] + self.runs[k][2]:
                    raise NotHandled(f"journal block {jblock} not mapped")
                lblk, pblk, length = self.runs[k]
                n = min(seg, lblk + length - jblock)
                at = (pblk + jblock - lblk) * self.bs
                if out and out[-1][0] + out[-1][1] == at:
                    out[-1] = (out[-1][0], out[-1][1] + n * self.bs)
                else:
                    out.append((at, n * self.bs))
                jblock += n
                seg -= n
            jblock = self.first
        return out


def _open_journal(fd: int, reads: list[tuple[int, bytes]] | None = None
                  ) -> tuple[_Filesystem, list[tuple[int, int, int]], int, int]:
    """(filesystem, journal runs, journal length in blocks, image size in bytes); what it
    read is appended to `reads` as (byte offset, bytes)."""
    reads = [] if reads is None else reads
    sb = _pread(fd, 1024, SUPERBLOCK_OFFSET)
    reads.append((SUPERBLOCK_OFFSET, sb))
    fs = _Filesystem(sb)
    size = os.fstat(fd).st_size
    if size < (fs.first_data_block + 2) * fs.blocksize:
        raise NotHandled("image shorter than its superblock says")
    runs, nblocks = _journal_runs(fd, fs, sb, reads)
    return fs, runs, nblocks, size


def journal_super_of(fd: int) -> JournalSuper:
    """The journal superblock of the ext4 image open on `fd` (for tools and tests).
    :raise NotHandled: no internal journal this module reads."""
    crc = crc32c()
    if crc is None:
        raise NotHandled("no crc32c (libext2fs)")
    fs, runs, nblocks, _ = _open_journal(fd)
    with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as view:
        journal = _Journal(view, runs, fs.blocksize, fs.blocks_count)
        return parse_journal_super(journal.block(0), fs.blocksize, nblocks, crc)


def replay(fd: int, now: int | None = None, cache: ScanCache | None = None,
           changes: ImageChanges | None = None) -> Replay:
    """Recover the journal of the ext4 image open (read-write) on `fd`, as `e2fsck -E
    journal_only -y` does, and return what was written so the caller can `restore()` it
    (`plan`, then `Plan.apply`).
    :raise NotHandled: nothing was changed; run e2fsck instead.
    :raise OSError: reading or writing failed; what had been written was put back first, but
      if that failed too the image is not what it was (the caller rebuilds it).
    """
    return plan(fd, now, cache, changes).apply()


def plan(fd: int, now: int | None = None, cache: ScanCache | None = None,
         changes: ImageChanges | None = None) -> Plan:
    """Work out the recovery of the journal of the ext4 image open on `fd` as `e2fsck -E
    journal_only -y` would make it, writing nothing.

    `now` is the write time stamped in the superblock (default: the clock); `cache` (one
    per caller, shared by its threads) lets consecutive crash states skip re-verifying the
    journal they share; `changes` (the record of writes to this image, when the caller has
    one) lets it compare only the journal bytes written since the cached scan.
    :raise NotHandled: a journal this module does not recover; run e2fsck instead.
    :raise OSError: reading failed.
    """
    crc = crc32c()
    if crc is None:
        raise NotHandled("no crc32c (libext2fs)")
    reads: list[tuple[int, bytes]] = []
    fs, runs, nblocks, size = _open_journal(fd, reads)
    if not fs.incompat & INCOMPAT_RECOVER:
        raise NotHandled("the filesystem does not need recovery")
    with _image_view(fd, size, cache) as view:
        journal = _Journal(view, runs, fs.blocksize, fs.blocks_count)
        jsb = parse_journal_super(journal.block(0), fs.blocksize, nblocks, crc)
        journal.first, journal.last = jsb.first, jsb.maxlen
        reads.append((journal.offset(0), journal.block(0)))
        committed, end_transaction, scanned, resume = _scan(journal, jsb, crc, cache, changes)
        reads.extend(scanned)
        blocks = _resolve(journal, committed, fs, size)
        writes = [(fsblock * fs.blocksize, data) for fsblock, data in blocks]
        jsb_block = bytearray(journal.block(0))
        _BE32.pack_into(jsb_block, JSB_SEQUENCE, (end_transaction + 1) & 0xFFFFFFFF)
        _BE32.pack_into(jsb_block, JSB_START, 0)
        if jsb.csum_v2or3:
            _BE32.pack_into(jsb_block, JSB_CHECKSUM, _checksum_at(
                bytes(jsb_block[:JSB_SIZE]), JSB_CHECKSUM, 0xFFFFFFFF, crc))
        writes.append((journal.offset(0), bytes(jsb_block)))
    # The superblock as the replay leaves it (a journalled copy of its block, if any, wins).
    sb = reads[0][1]
    for offset, data in writes:
        if offset <= SUPERBLOCK_OFFSET < offset + len(data):
            sb = data[SUPERBLOCK_OFFSET - offset:SUPERBLOCK_OFFSET - offset + 1024]
    writes.append((SUPERBLOCK_OFFSET, _finished_superblock(sb, fs, len(blocks), now, crc)))
    return Plan(fd, writes, committed.transactions, len(blocks), reads,
                (size, end_transaction, resume))


@dataclass(slots=True)
class _Committed:
    """What the committed transactions ask PASS_REPLAY to do, gathered transaction by
    transaction (so a scan can go on from a cached one)."""

    transactions: int = 0
    # fs block -> (sequence, journal block, tag flags) of its last journalled copy
    last_copy: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    revokes: dict[int, int] = field(default_factory=dict)  # fs block -> latest revoking seq
    bad: list[tuple[int, int]] = field(default_factory=list)  # (seq, fs block): bad checksum

    def copy(self) -> _Committed:
        return _Committed(self.transactions, dict(self.last_copy), dict(self.revokes),
                          list(self.bad))


@dataclass(frozen=True, slots=True)
class _Scanned:
    """A scan's result up to its last commit block, and the bytes it was read from."""

    jsb_block: bytes
    runs: list[tuple[int, int, int]]      # the journal inode's block map it was read through
    ranges: list[tuple[int, bytes]]       # (image byte offset, the journal bytes there)
    committed: _Committed
    resume: tuple[int, int, int]          # next journal block, next sequence, blocks read
    seen: tuple[ImageChanges, int] | None  # the image's record of writes, its generation then


CACHE_MAX_BYTES: Final = 64 << 20  # journal bytes a ScanCache keeps a copy of, at most


class ScanCache:
    """The last scan of a journal, so the next state's scan reads on from its last commit
    instead of verifying every earlier transaction again. Crash states in log order share
    most of their journal; the cached result is used only when every journal byte it was
    made from is still the same (compared whole, not hashed). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: _Scanned | None = None
        self.hits = 0
        # The last image's read-only map, kept: mapping a file afresh for every state costs
        # a page fault per journal page read.
        self._view: tuple[tuple[int, int, int], mmap.mmap] | None = None

    @contextlib.contextmanager
    def view(self, fd: int, size: int) -> Iterator[mmap.mmap]:
        """A read-only map of the whole file open on `fd` (`size` bytes), held by one
        thread at a time."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, size)
        with self._lock:
            held, self._view = self._view, None  # another thread maps its own meanwhile
        if held is None or held[0] != key:
            if held is not None:
                held[1].close()
            held = (key, mmap.mmap(fd, 0, prot=mmap.PROT_READ))
        try:
            yield held[1]
        finally:
            with self._lock:
                if self._view is None:
                    self._view, held = held, None
            if held is not None:
                held[1].close()

    def get(self) -> _Scanned | None:
        with self._lock:
            return self._last

    def put(self, scanned: _Scanned, hit: bool) -> None:
        with self._lock:
            self._last = scanned
            self.hits += hit


_PIECES_MAX: Final = 16  # cached journal pieces before adjacent ones are joined


def _coalesced(ranges: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """`ranges` as they are while there are few pieces, else with adjacent ones joined (a
    scan that goes on from a cached one adds a piece per state; comparing them one by one
    costs more than copying them together now and then)."""
    if len(ranges) <= _PIECES_MAX:
        return ranges
    out: list[tuple[int, list[bytes]]] = []
    for at, data in ranges:
        if out and out[-1][0] + sum(map(len, out[-1][1])) == at:
            out[-1][1].append(data)
        else:
            out.append((at, [data]))
    return [(at, b"".join(parts)) for at, parts in out]


@contextlib.contextmanager
def _image_view(fd: int, size: int, cache: ScanCache | None) -> Iterator[mmap.mmap]:
    if cache is not None:
        with cache.view(fd, size) as view:
            yield view
        return
    with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as view:
        yield view


def _still_there(view: mmap.mmap, known: _Scanned, changes: ImageChanges | None) -> bool:
    """Whether the journal bytes `known` was read from are still in the image: only those
    written since, when the image's record of writes says which; else all of them."""
    written = None
    if changes is not None and known.seen is not None and known.seen[0] is changes:
        written = changes.since(known.seen[1])
    if written is None:
        return all(view[at:at + len(data)] == data for at, data in known.ranges)
    return written.kept(known.ranges, lambda at, n: view[at:at + n])


def _scan(journal: _Journal, jsb: JournalSuper, crc: Callable[[int, bytes], int],
          cache: ScanCache | None, changes: ImageChanges | None = None
          ) -> tuple[_Committed, int, list[tuple[int, bytes]], int]:
    """PASS_SCAN with what PASS_REVOKE and PASS_REPLAY need from each committed transaction
    (its copies, their checksums, its revoke records): (that, the first transaction id not
    committed, the journal from s_start to its last commit as (image byte offset, bytes), the
    journal block after that commit)."""
    last, first, bs = jsb.maxlen, jsb.first, journal.bs
    if not jsb.start:  # a clean journal: nothing to replay, the sequence still advances
        return _Committed(), jsb.sequence, [], 0
    jsb_block = journal.block(0)
    csum = jsb.csum_v2or3
    v3 = jsb.incompat & JBD2_FEATURE_INCOMPAT_CSUM_V3
    csum_seed = crc(0xFFFFFFFF, jsb_block[0x30:0x40]) if csum else 0  # s_uuid
    committed = _Committed()
    next_block, sequence, visited = jsb.start, jsb.sequence, 0
    known = cache.get() if cache is not None else None
    hit = bool(known and known.jsb_block == jsb_block and known.runs == journal.runs
               and _still_there(journal.view, known, changes))
    if hit:
        assert known is not None
        committed = known.committed.copy()
        next_block, sequence, visited = known.resume
    view, offset = journal.view, journal.offset
    last_copy, revokes, bad = committed.last_copy, committed.revokes, committed.bad
    resume = (next_block, sequence, visited)
    tags: list[tuple[int, int, int, int]] = []
    revoked: list[int] = []
    while True:
        visited += 1
        if visited > 2 * last:
            raise NotHandled("journal scan does not end")
        at = offset(next_block)
        block = view[at:at + bs]
        next_block += 1
        if next_block >= last:
            next_block -= last - first
        magic, blocktype, seq = JOURNAL_HEADER.unpack_from(block)
        if magic != JBD2_MAGIC or seq != sequence:
            break
        if blocktype == JBD2_DESCRIPTOR_BLOCK:
            if csum and _checksum_at(block, bs - 4, csum_seed, crc) != \
                    _BE32.unpack_from(block, bs - 4)[0]:
                raise NotHandled(f"descriptor block checksum in transaction {seq}")
            for blocknr, flags, tag_csum in parse_tags(block, jsb):
                tags.append((next_block, blocknr, flags, tag_csum))
                next_block += 1
                if next_block >= last:
                    next_block -= last - first
        elif blocktype == JBD2_COMMIT_BLOCK:
            if csum and _checksum_at(block, COMMIT_CHKSUM0, csum_seed, crc) != \
                    _BE32.unpack_from(block, COMMIT_CHKSUM0)[0]:
                raise NotHandled(f"commit block checksum in transaction {seq}")
            seq_seed = crc(csum_seed, seq.to_bytes(4, "big")) if csum else 0
            for jblock, blocknr, flags, tag_csum in tags:
                if csum:
                    at = offset(jblock)
                    got = crc(seq_seed, view[at:at + bs])
                    if (got if v3 else got & 0xFFFF) != tag_csum:
                        bad.append((seq, blocknr))
                last_copy[blocknr] = (seq, jblock, flags)
            for blocknr in revoked:  # jbd2_journal_set_revoke keeps the latest sequence
                old = revokes.get(blocknr)
                if old is None or tid_gt(seq, old):
                    revokes[blocknr] = seq
            committed.transactions += 1
            tags, revoked = [], []
            sequence = (sequence + 1) & 0xFFFFFFFF
            resume = (next_block, sequence, visited)
        elif blocktype == JBD2_REVOKE_BLOCK:
            if csum and _checksum_at(block, bs - 4, csum_seed, crc) != \
                    _BE32.unpack_from(block, bs - 4)[0]:
                raise NotHandled(f"revoke block checksum in transaction {seq}")
            revoked.extend(parse_revoke(block, jsb))
        else:
            break
    count = (resume[0] - jsb.start) % (last - first) if committed.transactions else 0
    if resume[0] == jsb.start and committed.transactions:
        count = last - first  # a journal full to the block
    ranges: list[tuple[int, bytes]] = []
    if cache is not None:
        if count * bs <= CACHE_MAX_BYTES:
            if hit:  # what the cached scan read is still there: copy only what follows it
                assert known is not None
                old = (known.resume[0] - jsb.start) % (last - first)
                if known.resume[0] == jsb.start and known.committed.transactions:
                    old = last - first
                ranges = _coalesced(known.ranges + [
                    (at, view[at:at + length])
                    for at, length in journal.ranges(known.resume[0], count - old)])
            else:
                ranges = [(at, view[at:at + length])
                          for at, length in journal.ranges(jsb.start, count)]
            seen = (changes, changes.generation) if changes is not None else None
            cache.put(_Scanned(jsb_block, journal.runs, ranges, committed, resume, seen), hit)
    if not ranges and count:  # else the cached copies are those bytes: shared, not copied
        ranges = [(at, view[at:at + length]) for at, length in journal.ranges(jsb.start, count)]
    return committed, sequence, ranges, resume[0]


def _resolve(journal: _Journal, committed: _Committed, fs: _Filesystem, size: int
             ) -> list[tuple[int, bytes]]:
    """PASS_REPLAY's outcome: (fs block, bytes) for each block's last unrevoked copy, in
    block order (a revoke record at sequence r skips every copy from transactions up to r;
    the last copy wins). A replayed copy whose checksum is wrong, even one a later copy
    overwrites, is refused (e2fsck skips it and marks the filesystem with errors)."""
    revokes = committed.revokes
    for seq, blocknr in committed.bad:
        rseq = revokes.get(blocknr)
        if rseq is None or tid_gt(seq, rseq):
            raise NotHandled(f"checksum of journalled block {blocknr} (transaction {seq})")
    journal_extents = journal.physical_blocks()
    writes = []
    for blocknr in sorted(committed.last_copy):
        seq, jblock, flags = committed.last_copy[blocknr]
        rseq = revokes.get(blocknr)
        if rseq is not None and not tid_gt(seq, rseq):
            continue
        if blocknr >= fs.blocks_count or (blocknr + 1) * fs.blocksize > size:
            raise NotHandled(f"journalled block {blocknr} beyond the filesystem")
        if any(lo <= blocknr < hi for lo, hi in journal_extents):
            raise NotHandled(f"journalled block {blocknr} inside the journal")
        data = journal.block(jblock)
        if flags & JBD2_FLAG_ESCAPE:
            data = _BE32.pack(JBD2_MAGIC) + data[4:]
        writes.append((blocknr, data))
    return writes


def _finished_superblock(replayed_sb: bytes, fs: _Filesystem, replayed: int, now: int | None,
                         crc: Callable[[int, bytes], int]) -> bytes:
    """The ext4 superblock as e2fsck leaves it after its recovery, from the one the replay
    leaves: RECOVER cleared, write time stamped, written kilobytes counted, checksum set.
    Refuses states whose superblock (perhaps replayed just now) carries an orphan list:
    e2fsck's journal-only run would release those inodes as well."""
    sb = bytearray(replayed_sb)
    if _LE16.unpack_from(sb, S_MAGIC)[0] != EXT4_MAGIC:
        raise NotHandled("the replayed superblock has no ext4 magic")
    ro_compat = _LE32.unpack_from(sb, S_FEATURE_RO_COMPAT)[0]
    if _LE32.unpack_from(sb, S_LAST_ORPHAN)[0] or ro_compat & RO_COMPAT_ORPHAN_PRESENT:
        raise NotHandled("orphan inodes to release")
    if _LE32.unpack_from(sb, S_FEATURE_INCOMPAT)[0] & ~fs.incompat & ~INCOMPAT_RECOVER:
        raise NotHandled("the replayed superblock has other features")
    incompat = _LE32.unpack_from(sb, S_FEATURE_INCOMPAT)[0] & ~INCOMPAT_RECOVER
    _LE32.pack_into(sb, S_FEATURE_INCOMPAT, incompat)
    # closefs.c stamps the low 32 bits of the write time only.
    _LE32.pack_into(sb, S_WTIME, (int(time.time()) if now is None else now) & 0xFFFFFFFF)
    kbytes = _LE64.unpack_from(sb, S_KBYTES_WRITTEN)[0]
    if kbytes:  # e2fsck counts only when the kernel has been counting (non-zero)
        # An estimate (the replayed blocks, the journal superblock, this one): e2fsck adds
        # what its I/O layer wrote, which its write cache makes hard to predict exactly.
        kbytes += (replayed + 2) * fs.blocksize >> 10
        _LE64.pack_into(sb, S_KBYTES_WRITTEN, kbytes & 0xFFFFFFFFFFFFFFFF)
    if ro_compat & RO_COMPAT_METADATA_CSUM:
        _LE32.pack_into(sb, S_CHECKSUM, crc(0xFFFFFFFF, bytes(sb[:S_CHECKSUM])))
    return bytes(sb)
