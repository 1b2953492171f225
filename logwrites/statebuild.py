"""Building crash-state images incrementally, without copying images on the common path.

The common path is `StateBuilder.view(state)`: one *cursor* image walks the log forward; a state
is the cursor at its checkpoint plus its few local entries, applied *in place* after saving the
pre-images of the byte ranges they touch, and undone (pre-images written back) when the caller
is done with it. So building state i costs one epoch of entries plus reading and rewriting the
blocks they touch — no image copy, whatever i and whatever the host filesystem (ext4 has no
reflink; a sparse copy of a 64 MiB image costs about as much as replaying 2,600 entries).
A state whose local entries touch more than `UNDO_LIMIT` bytes (a whole-device discard inside
the window, say) is built on a copy instead, as below. The cursor lives in a tmpfs when one has
room (`memory_dir`): it is scratch, and checkers that fsync it (e2fsck's journal replay, a
score of times per state) then pay nothing for durability nobody needs. `ImageKeys` proves two
states' images equal (the same data entries applied in the same order) without building them.

The older path, kept for callers that need an image of their own:

A *cursor* image walks the log once, from the base image forwards, applying whole entries. At
each durability point where states begin it leaves a *checkpoint*: a copy of itself (reflinked
where the filesystem can, else a sparse copy). A state is built from the checkpoint at its
epoch's opening flush: copy it, apply the few entries after it (minus dropped records, plus the
torn part of a write). So building state i costs one copy and one epoch of entries whatever i
is — never a replay from entry 0, which is what xfstests' generic/482 pattern does for every
flush point (`build_from_zero`, kept for comparison in bench/crashloop.py).

Entry effects (a write's payload, a discard's zeros) come from `logwrites.replay.apply_entry`;
only the torn part of a write, which no whole-entry replay has, is written here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final

from logwrites.crashstates import CrashState, LogMap, state_from_id
from logwrites.format import Entry
from logwrites.imagechanges import ImageChanges, merge_spans
from logwrites.logfile import LogReader

log = logging.getLogger(__name__)

FICLONE: Final = 0x40049409  # linux/fs.h _IOW(0x94, 9, int)
_COPY_CHUNK: Final = 1 << 30
UNDO_LIMIT: Final = 64 << 20  # bytes of pre-images held in memory for one state; past it, copy

ApplyEntry = Callable[..., None]


def _apply_entry() -> ApplyEntry:
    from logwrites.replay import apply_entry  # the one implementation of an entry's effect

    return apply_entry


def clone_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy `src` to `dst` cheaply: a reflink where the filesystem shares extents, else a
    sparse copy that reads only the data regions (holes stay holes)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return
        size = os.fstat(fin.fileno()).st_size
        fdi, fdo = fin.fileno(), fout.fileno()
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fdi, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            hole = os.lseek(fdi, data, os.SEEK_HOLE)
            at = data
            while at < hole:
                try:
                    copied = os.copy_file_range(fdi, fdo, min(hole - at, _COPY_CHUNK), at, at)
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    # Across filesystems (a disk to a tmpfs) the kernel may refuse.
                    chunk = os.pread(fdi, min(hole - at, 8 << 20), at)
                    copied = os.pwrite(fdo, chunk, at) if chunk else 0
                if copied == 0:
                    break
                at += copied
            pos = hole
        os.ftruncate(fdo, size)


def apply_torn(reader: LogReader, entry: Entry, sectors: int, fd: int,
               written: ImageChanges | None = None) -> None:
    """Write only the first `sectors` sectorsize units of the write `entry`."""
    sectorsize = reader.sectorsize
    data = os.pread(reader.fileno(), sectors * sectorsize, entry.data_offset)
    if written is not None:
        written.wrote(entry.sector * sectorsize, len(data))
    os.pwrite(fd, data, entry.sector * sectorsize)


def apply_entries(reader: LogReader, logmap: LogMap, fd: int, indexes: Iterable[int],
                  skip: Iterable[int] = (), *, discard_zeroes: bool = True,
                  written: ImageChanges | None = None) -> int:
    """Apply entries `indexes` (in order) except `skip` onto `fd`; return how many applied.
    `written` is told every range written."""
    apply_entry, skipped, applied = _apply_entry(), set(skip), 0
    sectorsize = logmap.sectorsize
    for index in indexes:
        if index in skipped:
            continue
        entry = logmap.entries[index]
        if entry.nr_sectors == 0:  # flushes and marks change no data
            continue
        if written is not None:  # before the write: a failed one may have written part
            written.wrote(entry.sector * sectorsize, entry.nr_sectors * sectorsize)
        apply_entry(reader, entry, fd, discard_zeroes=discard_zeroes)
        applied += 1
    return applied


def apply_state_local(reader: LogReader, logmap: LogMap, state: CrashState, fd: int,
                      *, discard_zeroes: bool = True,
                      written: ImageChanges | None = None) -> int:
    """Apply what `state` adds to its checkpoint: entries after it minus dropped, then the torn
    part of a write. Returns the number of entries touched."""
    n = apply_entries(reader, logmap, fd, state.local_entries(), state.dropped,
                      discard_zeroes=discard_zeroes, written=written)
    if state.torn is not None:
        index, sectors = state.torn
        apply_torn(reader, logmap.entries[index], sectors, fd, written)
        n += 1
    return n


def state_extents(logmap: LogMap, state: CrashState) -> list[tuple[int, int]]:
    """The byte ranges (offset, length), merged and sorted, that building `state` on its
    checkpoint writes: its local entries minus dropped ones, and the torn part of a write."""
    sectorsize, dropped = logmap.sectorsize, set(state.dropped)
    spans = []
    for index in state.local_entries():
        entry = logmap.entries[index]
        if entry.nr_sectors and index not in dropped:
            spans.append((entry.sector, entry.sector + entry.nr_sectors))
    if state.torn is not None:
        entry = logmap.entries[state.torn[0]]
        spans.append((entry.sector, entry.sector + state.torn[1]))
    return [(s * sectorsize, (e - s) * sectorsize) for s, e in merge_spans(spans)]


def memory_dir(image_size: int) -> Path | None:
    """`/dev/shm` when it is a tmpfs with room for a scratch image of `image_size` bytes
    (at most a quarter of its free space), else None.

    The cursor is a scratch image: nothing needs it after a crash, yet e2fsck's journal
    replay fsyncs it a score of times per state (about 23 ms of a 28 ms replay on this disk,
    against 5 ms on a tmpfs). In memory those fsyncs cost nothing and no byte changes."""
    shm = Path("/dev/shm")
    try:
        with open("/proc/self/mounts") as mounts:
            if not any(line.split()[1:3] == [str(shm), "tmpfs"] for line in mounts):
                return None
        st = os.statvfs(shm)
    except OSError:
        return None
    if not os.access(shm, os.W_OK) or image_size * 4 > st.f_bavail * st.f_frsize:
        return None
    return shm


class ImageKeys:
    """Proof that two crash states have the same image, cheaply: `key(state)` names the
    sequence of data entries (writes, discards) the state applies, in log order, plus its torn
    part. Entries that change no data (flushes, marks) do not count, so consecutive prefix
    states with no write between them (a mark right after a flush, two flushes) share a key.
    Equal keys mean byte-identical images (same base, same entries applied in the same order);
    different keys prove nothing either way."""

    def __init__(self, logmap: LogMap) -> None:
        self.logmap = logmap
        last, self._last_data = -1, []
        for entry in logmap.entries:
            if entry.nr_sectors:
                last = entry.index
            self._last_data.append(last)  # the last data entry at or before each index

    def key(self, state: CrashState) -> tuple[int, tuple[int, ...], tuple[int, int] | None]:
        """(last data entry of the longest run applied whole from entry 0, the data entries
        applied after a gap, the torn write)."""
        whole = self._last_data[state.checkpoint] if state.checkpoint >= 0 else -1
        dropped, after_gap = set(state.dropped), []
        for index in state.local_entries():
            if not self.logmap.entries[index].nr_sectors:
                continue
            if index in dropped:
                after_gap.append(-1)  # a gap: what follows is no longer a prefix
            elif after_gap:
                after_gap.append(index)
            else:
                whole = index
        return whole, tuple(i for i in after_gap if i >= 0), state.torn


class StateBuilder:
    """Builds crash-state images from checkpoints left by one forward walk of the log.

    `view(state)` (states in `enumerate_states` order) is the common path: the cursor itself
    becomes the state for the time of a with-block. One builder per thread; several threads
    each with a builder of their own walk the log independently.

    Or call `checkpoint(i)` with non-decreasing i (states come sorted by checkpoint from
    `enumerate_states`); `build(state, dest)` may then run in worker threads while the cursor
    moves on, as long as the state's checkpoint is held (`release` when its states are done).
    """

    def __init__(self, reader: LogReader, logmap: LogMap, base_image: Path, workdir: Path,
                 *, discard_zeroes: bool = True, in_memory: bool | None = None) -> None:
        """`in_memory`: keep the cursor in a tmpfs (`memory_dir`); None: when one has room."""
        self.reader, self.logmap, self.workdir = reader, logmap, workdir
        self.discard_zeroes = discard_zeroes
        workdir.mkdir(parents=True, exist_ok=True)
        self.base_image = base_image
        shm = memory_dir(os.path.getsize(base_image)) if in_memory is not False else None
        if in_memory and shm is None:
            raise OSError(errno.ENOSPC, "no tmpfs with room for the cursor image")
        self._cursor_dir = Path(tempfile.mkdtemp(prefix="logwrites-cursor-", dir=shm)) \
            if shm is not None else None
        self.cursor = (self._cursor_dir or workdir) / "cursor.img"
        clone_file(base_image, self.cursor)
        # Every write to the cursor, so that checkers compare only what changed since they
        # last read it (`changes_of`).
        self.changes = ImageChanges()
        self.resets = 0  # times the cursor was rebuilt because a checker left it changed
        self.copies = 0  # states too large to undo, built on a copy
        self.at = -1  # entries <= at are applied to the cursor
        self._checkpoints: dict[int, tuple[Path, int]] = {}  # index -> (image, holders)
        self._lock = threading.Lock()
        self.entries_applied = 0  # by the cursor and by builds: the cost of the whole loop

    def advance(self, index: int) -> None:
        """Move the cursor forward to just after entry `index`."""
        if index < self.at:
            raise ValueError(f"the cursor is at entry {self.at}, cannot go back to {index}")
        fd = os.open(self.cursor, os.O_RDWR | os.O_CLOEXEC)
        try:
            n = apply_entries(self.reader, self.logmap, fd, range(self.at + 1, index + 1),
                              discard_zeroes=self.discard_zeroes, written=self.changes)
        finally:
            os.close(fd)
        with self._lock:
            self.entries_applied += n
        self.at = index

    def reset(self) -> None:
        """Start the cursor again from the base image: for when something (a checker that
        could not undo its writes) may have changed it. The next state replays from entry 0."""
        self.changes.forget()
        clone_file(self.base_image, self.cursor)
        self.at = -1
        self.resets += 1
        log.warning("cursor image reset to the base image (a checker left it changed)")

    @contextlib.contextmanager
    def view(self, state: CrashState, scratch: Path | None = None) -> Iterator[Path]:
        """The image of `state`, for the time of the with-block: the cursor, moved to the
        state's checkpoint, with the state's local entries applied in place; on exit their
        pre-images are written back, so the cursor is again the image at the checkpoint.

        The caller must not change the image (checkers that write get a copy, see
        `logwrites.check.check_state`). States must come in checkpoint order. A state whose
        local writes exceed `UNDO_LIMIT` bytes is built on `scratch` (default: next to the
        cursor) instead, a copy removed on exit.
        """
        self.advance(state.checkpoint)
        extents = state_extents(self.logmap, state)
        if sum(length for _, length in extents) > UNDO_LIMIT:
            dest = scratch or self.workdir / "large-state.img"
            self.copies += 1
            try:
                yield self._build_from(self.cursor, state, dest)
            finally:
                dest.unlink(missing_ok=True)
            return
        fd = os.open(self.cursor, os.O_RDWR | os.O_CLOEXEC)
        try:
            saved = [(offset, os.pread(fd, length, offset)) for offset, length in extents]
            try:
                n = apply_state_local(self.reader, self.logmap, state, fd,
                                      discard_zeroes=self.discard_zeroes,
                                      written=self.changes)
                with self._lock:
                    self.entries_applied += n
                yield self.cursor
            finally:
                # Merged ranges do not overlap: each pre-image goes back whole, in any order.
                for offset, data in saved:
                    self.changes.wrote(offset, len(data))
                    os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def changes_of(self, image: Path) -> ImageChanges | None:
        """The record of writes to `image` when it is this builder's cursor (a state built
        on a copy has none)."""
        return self.changes if image == self.cursor else None

    def _build_from(self, src: Path, state: CrashState, dest: Path) -> Path:
        clone_file(src, dest)
        fd = os.open(dest, os.O_RDWR | os.O_CLOEXEC)
        try:
            n = apply_state_local(self.reader, self.logmap, state, fd,
                                  discard_zeroes=self.discard_zeroes)
        finally:
            os.close(fd)
        with self._lock:
            self.entries_applied += n
        return dest

    def checkpoint(self, index: int, holders: int = 1) -> Path:
        """The image after entry `index` (-1: the base), held by `holders` until released."""
        with self._lock:
            if index in self._checkpoints:
                path, held = self._checkpoints[index]
                self._checkpoints[index] = (path, held + holders)
                return path
        self.advance(index)
        path = self.workdir / f"ckpt-{index + 1}.img"
        clone_file(self.cursor, path)
        with self._lock:
            self._checkpoints[index] = (path, holders)
        log.debug("checkpoint after entry %d: %s", index, path)
        return path

    def release(self, index: int) -> None:
        with self._lock:
            path, held = self._checkpoints[index]
            if held > 1:
                self._checkpoints[index] = (path, held - 1)
                return
            del self._checkpoints[index]
        path.unlink(missing_ok=True)

    def build_at_cursor(self, state: CrashState, dest: Path) -> Path:
        """Move the cursor to the state's checkpoint and build the state from the cursor itself:
        one copy, no checkpoint image (states must come in checkpoint order). For a state
        image of one's own; `view` is the copy-free path."""
        self.advance(state.checkpoint)
        return self._build_from(self.cursor, state, dest)

    def build(self, state: CrashState, dest: Path) -> Path:
        """Write the image of `state` to `dest`; its checkpoint must be held."""
        with self._lock:
            ckpt = self._checkpoints[state.checkpoint][0]
        return self._build_from(ckpt, state, dest)

    def close(self) -> None:
        for path, _ in self._checkpoints.values():
            path.unlink(missing_ok=True)
        self._checkpoints.clear()
        self.cursor.unlink(missing_ok=True)
        if self._cursor_dir is not None:
            shutil.rmtree(self._cursor_dir, ignore_errors=True)


def build_from_zero(reader: LogReader, logmap: LogMap, base_image: Path, state: CrashState,
                    dest: Path, *, discard_zeroes: bool = True) -> int:
    """The xfstests generic/482 pattern, for comparison: copy the base and replay every entry
    from 0 up to the state. Returns the number of entries applied."""
    clone_file(base_image, dest)
    fd = os.open(dest, os.O_RDWR | os.O_CLOEXEC)
    try:
        n = apply_entries(reader, logmap, fd, range(state.checkpoint + 1),
                          discard_zeroes=discard_zeroes)
        return n + apply_state_local(reader, logmap, state, fd, discard_zeroes=discard_zeroes)
    finally:
        os.close(fd)


def build_state(log_path: str | os.PathLike[str], target: str | os.PathLike[str],
                state_id: str, *, discard_zeroes: bool = True) -> CrashState:
    """Rebuild the crash state `state_id` onto `target`, which holds the base image (what
    `logwrites replay LOG TARGET --state ID` does). One pass: no checkpoints exist yet.

    :raise UsageError: for an id this log cannot have. :raise LogFormatError: for a bad log.
    """
    from logwrites.replay import open_target

    logmap = LogMap.read(log_path)
    state = state_from_id(logmap, state_id)
    with LogReader(log_path) as reader:
        fd = open_target(target, reader, os.O_RDWR)
        try:
            apply_entries(reader, logmap, fd, range(state.checkpoint + 1),
                          discard_zeroes=discard_zeroes)
            apply_state_local(reader, logmap, state, fd, discard_zeroes=discard_zeroes)
            os.fsync(fd)
        finally:
            os.close(fd)
    return state


__all__ = ["UNDO_LIMIT", "ImageKeys", "StateBuilder", "apply_state_local", "build_from_zero",
           "build_state", "clone_file", "memory_dir", "state_extents"]
