"""Guest memory (a memfd the backend maps) and split virtqueues laid out in it.

Layout follows the virtio 1.x split ring: descriptor table (16 bytes each, 16-aligned), avail
ring (flags, idx, ring[num], used_event; 2-aligned), used ring (flags, idx, {id, len}[num],
avail_event; 4-aligned). All fields little-endian. Addresses handed to the backend are guest
physical addresses (`gpa`): offsets into the memfd plus `gpa_base`. We write ring entries before
the index that publishes them; on x86 stores are not reordered with stores, and the kick is a
syscall (a full barrier), so no explicit fence is needed from Python.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Final

from vhost.testing.protocol import FrontendError

DESC: Final = struct.Struct("<QIHH")          # addr, len, flags, next
U16: Final = struct.Struct("<H")
USED_ELEM: Final = struct.Struct("<II")       # id, len

VRING_DESC_F_NEXT: Final = 1
VRING_DESC_F_WRITE: Final = 2
VRING_DESC_F_INDIRECT: Final = 4

ALLOC_ALIGN: Final = 64


@dataclass(frozen=True, slots=True)
class RawDesc:
    """One descriptor exactly as it will sit in a table (any values, valid or not)."""

    addr: int
    length: int
    flags: int = 0
    next: int = 0


class GuestMemory:
    """A memfd mapped here and shared with the backend; a first-fit allocator over it."""

    def __init__(self, size: int = 64 << 20, gpa_base: int = 0) -> None:
        self.size = size
        self.gpa_base = gpa_base
        self.fd = os.memfd_create("logwrites-guest-memory", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._free: list[tuple[int, int]] = [(0, size)]     # (offset, length), sorted
        self._used: dict[int, int] = {}                     # offset -> length

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def alloc(self, nbytes: int, align: int = ALLOC_ALIGN) -> int:
        """Reserve `nbytes` and return their gpa. :raise FrontendError: if memory is full."""
        length = max(ALLOC_ALIGN, -(-nbytes // ALLOC_ALIGN) * ALLOC_ALIGN)
        for i, (start, free_len) in enumerate(self._free):
            offset = -(-start // align) * align
            if offset + length <= start + free_len:
                del self._free[i]
                if offset > start:
                    self._free.insert(i, (start, offset - start))
                    i += 1
                if offset + length < start + free_len:
                    self._free.insert(i, (offset + length, start + free_len - offset - length))
                self._used[offset] = length
                return offset + self.gpa_base
        raise FrontendError(f"guest memory full: no {nbytes} free bytes in {self.size}")

    def free(self, gpa: int) -> None:
        offset = gpa - self.gpa_base
        length = self._used.pop(offset)
        i = bisect.bisect(self._free, (offset, 0))
        self._free.insert(i, (offset, length))
        # Coalesce with the neighbours so long fuzz runs do not fragment memory.
        if i + 1 < len(self._free) and offset + length == self._free[i + 1][0]:
            self._free[i] = (offset, length + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]

    def allocated_length(self, gpa: int) -> int:
        """How many bytes `alloc` really reserved at `gpa` (rounded up)."""
        return self._used[gpa - self.gpa_base]

    def free_bytes(self) -> int:
        return sum(length for _start, length in self._free)

    def contains(self, gpa: int, nbytes: int) -> bool:
        return self.gpa_base <= gpa and gpa + nbytes <= self.gpa_base + self.size

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        offset = gpa - self.gpa_base
        self.map[offset:offset + len(data)] = data

    def read(self, gpa: int, nbytes: int) -> bytes:
        offset = gpa - self.gpa_base
        return self.map[offset:offset + nbytes]

    def fill(self, gpa: int, nbytes: int, byte: int) -> None:
        self.write(gpa, bytes([byte]) * nbytes)


class SplitQueue:
    """One split virtqueue in guest memory: descriptor slots, avail and used rings."""

    def __init__(self, memory: GuestMemory, index: int, num: int) -> None:
        if num & (num - 1) or not 0 < num <= 32768:
            raise ValueError(f"queue size {num} is not a power of two up to 32768")
        self.memory, self.index, self.num = memory, index, num
        self.desc_gpa = memory.alloc(16 * num, align=4096)
        self.avail_gpa = memory.alloc(6 + 2 * num, align=4096)
        self.used_gpa = memory.alloc(6 + 8 * num, align=4096)
        memory.fill(self.desc_gpa, 16 * num, 0)
        memory.fill(self.avail_gpa, 6 + 2 * num, 0)
        memory.fill(self.used_gpa, 6 + 8 * num, 0)
        self.avail_idx = 0            # next free avail slot (free-running, mod 2**16)
        self.last_used_idx = 0        # next used entry we have not read yet
        self._free_slots = list(range(num - 1, -1, -1))

    # Descriptor slots --------------------------------------------------------------------
    def free_slot_count(self) -> int:
        return len(self._free_slots)

    def take_slots(self, count: int) -> list[int]:
        if count > len(self._free_slots):
            raise FrontendError(
                f"queue {self.index}: {count} descriptors wanted, {len(self._free_slots)} free")
        return [self._free_slots.pop() for _ in range(count)]

    def take_specific_slots(self, slots: set[int]) -> None:
        """Reserve named slots (raw layouts); :raise FrontendError: if one is in use."""
        busy = slots - set(self._free_slots)
        if busy:
            raise FrontendError(f"queue {self.index}: descriptor slots {sorted(busy)} in use")
        self._free_slots = [s for s in self._free_slots if s not in slots]

    def free_slots(self) -> list[int]:
        """The descriptor slots not in use, in the order `take_slots` would hand them out."""
        return self._free_slots[::-1]

    def release_slots(self, slots: list[int]) -> None:
        self._free_slots.extend(slots)

    def write_desc(self, slot: int, desc: RawDesc) -> None:
        self.memory.write(self.desc_gpa + 16 * slot,
                          DESC.pack(desc.addr & (2**64 - 1), desc.length & 0xFFFFFFFF,
                                    desc.flags & 0xFFFF, desc.next & 0xFFFF))

    # Rings -------------------------------------------------------------------------------
    def publish(self, head: int) -> None:
        """Put `head` in the avail ring and move avail.idx past it (the backend may now see it)."""
        ring_at = self.avail_gpa + 4 + 2 * (self.avail_idx % self.num)
        self.memory.write(ring_at, U16.pack(head & 0xFFFF))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(self.avail_gpa + 2, U16.pack(self.avail_idx))

    def set_avail_idx(self, value: int) -> None:
        """Write avail.idx directly (hostile tests: claim entries that were never placed)."""
        self.memory.write(self.avail_gpa + 2, U16.pack(value & 0xFFFF))

    def used_idx(self) -> int:
        return U16.unpack(self.memory.read(self.used_gpa + 2, 2))[0]

    def harvest(self) -> list[tuple[int, int]]:
        """Used-ring entries (id, len) published since the last call, in ring order."""
        out = []
        end = self.used_idx()
        while self.last_used_idx != end:
            at = self.used_gpa + 4 + 8 * (self.last_used_idx % self.num)
            out.append(USED_ELEM.unpack(self.memory.read(at, 8)))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        return out
