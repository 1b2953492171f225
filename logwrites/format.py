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
# The largest logical block size Linux knows (64 KiB pages); a larger `sectorsize` is damage,
# and trusting it would make a reader allocate absurd header blocks.
# A file offset is a signed 64-bit number: no device, and no image, reaches past it.
MAX_BYTE_OFFSET: Final = (1 << 63) - 1
MAX_SECTORSIZE: Final = 1 << 16

# magic, version, nr_entries, sectorsize; bytes 28..31 are struct padding in the kernel.
SUPER_BLOCK: Final = struct.Struct("<QQQI")
# sector, nr_sectors, flags, data_len; inline data (a mark's name) follows at offset 32.
ENTRY_HEADER: Final = struct.Struct("<QQQQ")
INLINE_OFFSET: Final = ENTRY_HEADER.size
# The zeros after a header without inline data, for each sector size we write.
_HEADER_TAILS: Final = {size: bytes(size - ENTRY_HEADER.size) for size in SECTOR_SIZES}


class EntryFlag(enum.IntFlag):
    FLUSH = 1
    FUA = 2
    DISCARD = 4
    MARK = 8
    METADATA = 16


KNOWN_FLAGS: Final = 0x1F
# EntryFlag(value) goes through the enum machinery (about a microsecond); decoding is on the
# replay hot path, so look the members up by value instead.
_FLAGS_BY_VALUE: Final = tuple(EntryFlag(value) for value in range(KNOWN_FLAGS + 1))
# Plain ints for hot loops: `int & IntFlag` goes through enum's __and__ (also ~1 µs).
FLUSH: Final = 1
FUA: Final = 2
DISCARD: Final = 4
MARK: Final = 8
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

    def next_block(self, sectorsize: int) -> int:
        """The log block where the next entry's header sits (replay-log's `--find` prints it)."""
        return self.data_offset // sectorsize + self.payload_blocks()

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
    if sectorsize > MAX_SECTORSIZE:
        raise LogFormatError(-1, f"sectorsize {sectorsize} is larger than {MAX_SECTORSIZE}")
    return SuperBlock(nr_entries=nr_entries, sectorsize=sectorsize, version=version)


def encode_entry_header(
    sector: int, nr_sectors: int, flags: int, sectorsize: int, inline: bytes = b""
) -> bytes:
    """One header block; `inline` (a mark's name) sits at offset 32 and sets `data_len`."""
    if not inline:
        # Every logged write takes this path: one allocation instead of three.
        tail = _HEADER_TAILS.get(sectorsize)
        if tail is not None:
            return ENTRY_HEADER.pack(sector, nr_sectors, flags, 0) + tail
    block = bytearray(sectorsize)
    ENTRY_HEADER.pack_into(block, 0, sector, nr_sectors, flags, len(inline))
    block[INLINE_OFFSET : INLINE_OFFSET + len(inline)] = inline
    return bytes(block)


def encode_mark_header(name: str, sectorsize: int) -> bytes:
    """:raise ValueError: for a name that cannot be a mark (see validate_mark_name)."""
    raw = validate_mark_name(name, sectorsize)
    return encode_entry_header(0, 0, EntryFlag.MARK, sectorsize, raw)


def decode_entry(header: bytes | memoryview, index: int, data_offset: int) -> Entry:
    """Decode and validate one header block (`header` is exactly one log block).

    :raise LogFormatError: naming `index` for unknown flag bits, a malformed entry (flags 0 and
        nr_sectors 0), inline data that does not fit, or non-zero padding after a non-mark header.
    """
    block = header if isinstance(header, bytes | bytearray) else bytes(header)
    return decode_entry_at(block, 0, len(block), index, data_offset)


def decode_entry_at(buf: bytes | bytearray, pos: int, sectorsize: int, index: int,
                    data_offset: int) -> Entry:
    """`decode_entry` for the header block at `buf[pos:pos + sectorsize]`, without copying it.

    The streaming reader decodes straight out of its read buffer with this.
    """
    sector, nr_sectors, flags, data_len = _unpack_header(buf, pos)
    if flags & ~KNOWN_FLAGS:
        raise LogFormatError(index, f"unknown flag bits {flags:#x}")
    if flags == 0 and nr_sectors == 0:
        raise LogFormatError(index, "malformed entry: no flags and no sectors")
    if data_len > sectorsize - INLINE_OFFSET:
        raise LogFormatError(
            index, f"data_len {data_len} does not fit in a {sectorsize}-byte header block"
        )
    if nr_sectors and (sector + nr_sectors) * sectorsize > MAX_BYTE_OFFSET:
        raise LogFormatError(index, f"sectors {sector}+{nr_sectors} end beyond any device "
                                    f"(past byte 2^63)")
    start = pos + INLINE_OFFSET
    if flags & MARK:
        mark = bytes(buf[start : start + data_len]).decode(errors="replace")
    else:
        # dm-log-writes, QEMU and we zero a header block after its 32 bytes (replay-log checks
        # the first of them): anything else means the reader is out of step with the writer
        # (wrong sectorsize, a torn or overwritten block). startswith() is a memcmp, no copy.
        if not buf.startswith(zero_padding(sectorsize), start, pos + sectorsize):
            raise LogFormatError(index, "non-zero padding after the entry header")
        mark = None
    return Entry(index, sector, nr_sectors, _FLAGS_BY_VALUE[flags], data_len, data_offset, mark)


_unpack_header: Final = ENTRY_HEADER.unpack_from
_ZERO_PADDING: dict[int, bytes] = {}


def zero_padding(sectorsize: int) -> bytes:
    """What follows the 32 header bytes in a non-mark header block: zeros."""
    padding = _ZERO_PADDING.get(sectorsize)
    if padding is None:
        padding = _ZERO_PADDING[sectorsize] = bytes(sectorsize - INLINE_OFFSET)
    return padding
