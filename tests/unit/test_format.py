"""The pure format: super block and entry headers, byte for byte as DESIGN.md §2 says."""

from __future__ import annotations

import struct

import pytest

from logwrites.errors import LogFormatError
from logwrites.format import (
    END_MARK,
    MAGIC,
    EntryFlag,
    decode_entry,
    decode_super,
    encode_entry_header,
    encode_mark_header,
    encode_super,
    flag_names,
    max_mark_len,
    validate_mark_name,
)


@pytest.mark.parametrize("sectorsize", [512, 4096])
def test_super_block_layout(sectorsize: int) -> None:
    block = encode_super(7, sectorsize)
    assert len(block) == sectorsize
    assert struct.unpack_from("<QQQI", block) == (MAGIC, 1, 7, sectorsize)
    assert block[28:] == bytes(sectorsize - 28)
    # The kernel leaves struct padding in bytes 28..31: readers ignore it.
    kernelish = block[:28] + b"\xde\xad\xbe\xef" + block[32:]
    assert decode_super(kernelish).nr_entries == 7


@pytest.mark.parametrize("sectorsize", [512, 4096])
def test_entry_headers(sectorsize: int) -> None:
    header = encode_entry_header(10, 3, EntryFlag.FUA, sectorsize)
    assert struct.unpack_from("<QQQQ", header) == (10, 3, 2, 0)
    entry = decode_entry(header, 4, 12345)
    assert (entry.index, entry.sector, entry.nr_sectors, entry.flags, entry.data_offset) == (
        4, 10, 3, EntryFlag.FUA, 12345)
    assert entry.is_fua and entry.is_write and entry.payload_blocks() == 3
    mark = decode_entry(encode_mark_header(END_MARK, sectorsize), 0, 0)
    assert mark.mark == END_MARK and mark.data_len == len(END_MARK) and mark.payload_blocks() == 0
    discard = decode_entry(encode_entry_header(0, 99, EntryFlag.DISCARD, sectorsize), 0, 0)
    assert discard.payload_blocks() == 0 and discard.next_block(sectorsize) == 0


def test_flag_names_and_marks() -> None:
    assert flag_names(EntryFlag.FLUSH | EntryFlag.FUA | EntryFlag.METADATA) == [
        "flush", "fua", "metadata"]
    assert max_mark_len(512) == 479
    validate_mark_name("x" * 479, 512)
    for bad in ("", "a b", "x" * 480):
        with pytest.raises(ValueError):
            validate_mark_name(bad, 512)


@pytest.mark.parametrize(("header", "problem"), [
    (struct.pack("<QQQQ", 0, 1, 0x20, 0), "unknown flag bits 0x20"),
    (struct.pack("<QQQQ", 5, 0, 0, 0), "malformed entry"),
    (struct.pack("<QQQQ", 0, 0, 8, 600), "does not fit"),
    (struct.pack("<QQQQ", 0, 1, 0, 0) + b"\0" * 10 + b"x", "non-zero padding"),
])
def test_bad_headers_name_the_entry(header: bytes, problem: str) -> None:
    block = header.ljust(512, b"\0")
    with pytest.raises(LogFormatError, match=f"log entry 3: .*{problem}"):
        decode_entry(block, 3, 0)


@pytest.mark.parametrize(("fields", "problem"), [
    ((1, 1, 0, 512), "bad magic"),
    ((MAGIC, 3, 0, 512), "unknown version 3"),
    ((MAGIC, 1, 0, 768), "not a power of two"),
    ((MAGIC, 1, 0, 256), "not a power of two >= 512"),
    ((MAGIC, 1, 0, 1 << 24), "larger than"),
])
def test_bad_super_blocks(fields: tuple, problem: str) -> None:
    with pytest.raises(LogFormatError, match=f"log super block: .*{problem}"):
        decode_super(struct.pack("<QQQI", *fields).ljust(512, b"\0"))
