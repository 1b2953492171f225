"""The dm-log-writes on-disk format: bytes in, entries out; entries in, bytes out.

Pure data and validation, no I/O and no policy (DESIGN.md §2). The log is a sequence of
*log blocks* of `sectorsize` bytes: block 0 is the super block, entries start at block 1, each
entry is one header block followed by `nr_sectors` payload blocks for a write. Every number is
little-endian. Field names keep the kernel's spelling (dm-log-writes.c, replay-log) so that one
grep spans all three.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from logwrites.errors import LogFormatError

MAGIC: Final = 0x6A736677736872
VERSION: Final = 1
END_MARK: Final = "dm-log-writes-end"
SECTOR_SIZES: Final = (512, 4096)  # what we write; readers accept any power of two >= 512

# magic, version, nr_entries, sectorsize; bytes 28..31 are struct padding in the kernel.
SUPER_BLOCK: Final = struct.Struct("<QQQI")
# sector, nr_sectors, flags, data_len; inline data (a mark's name) follows at offset 32.
ENTRY_HEADER: Final = struct.Struct("<QQQQ")
INLINE_OFFSET: Final = ENTRY_HEADER.size


class EntryFlag(enum.IntFlag):
    FLUSH = 1
    FUA = 2
    DISCARD = 4
    MARK = 8
    METADATA = 16


KNOWN_FLAGS: Final = 0x1F
_FLAG_NAMES: Final = (
    (EntryFlag.FLUSH, "flush"),
    (EntryFlag.FUA, "fua"),
    (EntryFlag.DISCARD, "discard"),
    (EntryFlag.MARK, "mark"),
    (EntryFlag.METADATA, "metadata"),
)


def flag_names(flags: int) -> list[str]:
    """The names DESIGN.md §8 uses for `inspect --json`, lowest bit first."""
    return [name for flag, name in _FLAG_NAMES if flags & flag]


def max_mark_len(sectorsize: int) -> int:
    """Longest mark name in bytes: it must fit in the header block after the header."""
    return sectorsize - INLINE_OFFSET - 1


def validate_mark_name(name: str, sectorsize: int) -> bytes:
    """Return the name's bytes, or raise ValueError saying why the name cannot be a mark."""
    if not name:
        raise ValueError("a mark name cannot be empty")
    if any(ch.isspace() for ch in name):
        raise ValueError(f"mark name {name!r} contains whitespace")
    raw = name.encode()
    if len(raw) > max_mark_len(sectorsize):
        raise ValueError(
            f"mark name is {len(raw)} bytes, longer than {max_mark_len(sectorsize)} "
            f"for sectorsize {sectorsize}"
        )
    return raw


@dataclass(frozen=True, slots=True)
class SuperBlock:
    nr_entries: int
    sectorsize: int
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry. `sector`/`nr_sectors` count `sectorsize` units, not 512-byte units.

    `data_offset` is the byte offset in the log of the entry's payload (right after its header
    block); the payload itself is never held here, so entries stay small however big the log.
    """

    index: int
    sector: int
    nr_sectors: int
    flags: EntryFlag
    data_len: int
    data_offset: int
    mark: str | None = None

    @property
    def has_payload(self) -> bool:
        """Writes carry `nr_sectors` blocks of payload; discards, flushes and marks carry none."""
        return self.nr_sectors > 0 and not self.flags & EntryFlag.DISCARD

    def payload_blocks(self) -> int:
        return self.nr_sectors if self.has_payload else 0

    @property
    def is_write(self) -> bool:
        return self.has_payload

    @property
    def is_discard(self) -> bool:
        return bool(self.flags & EntryFlag.DISCARD)

    @property
    def is_flush(self) -> bool:
        return bool(self.flags & EntryFlag.FLUSH)

    @property
    def is_fua(self) -> bool:
        return bool(self.flags & EntryFlag.FUA)

    @property
    def is_mark(self) -> bool:
        return bool(self.flags & EntryFlag.MARK)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def encode_super(nr_entries: int, sectorsize: int) -> bytes:
    """The super block, padded with zeros to one log block."""
    block = bytearray(sectorsize)
    SUPER_BLOCK.pack_into(block, 0, MAGIC, VERSION, nr_entries, sectorsize)
    return bytes(block)


def decode_super(block: bytes | memoryview) -> SuperBlock:
    """:raise LogFormatError: (index -1) for anything that is not a version-1 super block."""
    if len(block) < SUPER_BLOCK.size:
        raise LogFormatError(-1, f"log is {len(block)} bytes, too short for a super block")
    magic, version, nr_entries, sectorsize = SUPER_BLOCK.unpack_from(block)
    if magic != MAGIC:
        raise LogFormatError(-1, f"bad magic {magic:#x} (expected {MAGIC:#x}): not a log")
    if version != VERSION:
        raise LogFormatError(-1, f"unknown version {version} (this reader knows {VERSION})")
    if not is_power_of_two(sectorsize) or sectorsize < 512:
        raise LogFormatError(-1, f"sectorsize {sectorsize} is not a power of two >= 512")
    return SuperBlock(nr_entries=nr_entries, sectorsize=sectorsize, version=version)


def encode_entry_header(
    sector: int, nr_sectors: int, flags: int, sectorsize: int, inline: bytes = b""
) -> bytes:
    """One header block; `inline` (a mark's name) sits at offset 32 and sets `data_len`."""
    block = bytearray(sectorsize)
    ENTRY_HEADER.pack_into(block, 0, sector, nr_sectors, flags, len(inline))
    block[INLINE_OFFSET : INLINE_OFFSET + len(inline)] = inline
    return bytes(block)


def encode_mark_header(name: str, sectorsize: int) -> bytes:
    """:raise ValueError: for a name that cannot be a mark (see validate_mark_name)."""
    raw = validate_mark_name(name, sectorsize)
    return encode_entry_header(0, 0, EntryFlag.MARK, sectorsize, raw)


def decode_entry(header: bytes | memoryview, index: int, data_offset: int) -> Entry:
    """Decode and validate one header block.

    :raise LogFormatError: naming `index` for unknown flag bits, a malformed entry (flags 0 and
        nr_sectors 0), inline data that does not fit, or non-zero padding after a non-mark header.
    """
    sector, nr_sectors, flags, data_len = ENTRY_HEADER.unpack_from(header)
    if flags & ~KNOWN_FLAGS:
        raise LogFormatError(index, f"unknown flag bits {flags:#x}")
    if flags == 0 and nr_sectors == 0:
        raise LogFormatError(index, "malformed entry: no flags and no sectors")
    inline_end = INLINE_OFFSET + data_len
    if inline_end > len(header):
        raise LogFormatError(
            index, f"data_len {data_len} does not fit in a {len(header)}-byte header block"
        )
    mark = None
    if flags & EntryFlag.MARK:
        raw = bytes(header[INLINE_OFFSET:inline_end])
        mark = raw.decode(errors="replace")
    elif any(header[inline_end:]):
        # dm-log-writes and we zero the rest of a header block: bytes here mean the reader is
        # out of step with the writer (wrong sectorsize, a torn or overwritten block).
        raise LogFormatError(index, "non-zero padding after the entry header")
    return Entry(index, sector, nr_sectors, EntryFlag(flags), data_len, data_offset, mark)
