"""The replay engine: apply a log's entries onto a target image or block device.

This is replay-log's model (xfstests `src/log-writes`): a replay starts at an entry (or just
after a mark), stops after a number of entries or at the first entry that meets a stop
condition (a mark, the next FLUSH, the next FUA), and may check the target along the way.
Writes copy their payload to `entry.sector * sectorsize`; discards always leave zeros, whatever
their size (replay-log silently skips zeroing discards over 128 MiB on files: we don't);
flushes and marks change nothing on the target. Entries before the start point are passed over
by their headers only. The crash-replay loop builds its states on `apply_entry`, `replay` and
`replay_entries` (the fast path on an already open log and target).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from logwrites._replay import ffi as _ffi
from logwrites._replay import lib as _lib
from logwrites.errors import CheckFailed, LogFormatError, LogwritesError, UsageError
from logwrites.format import (
    DISCARD,
    ENTRY_HEADER,
    FLUSH,
    FUA,
    INLINE_OFFSET,
    KNOWN_FLAGS,
    MARK,
    MAX_BYTE_OFFSET,
    Entry,
    EntryFlag,
    decode_entry_at,
    zero_padding,
)
from logwrites.logfile import (
    BUFFERED_PAYLOAD,
    CHUNK,
    LogReader,
    header_past_end,
    payload_past_end,
)
from logwrites.storagepaths import same_storage, storage_stat

if TYPE_CHECKING:
    import subprocess  # shell_checker imports it when it runs

log = logging.getLogger(__name__)

# <linux/fs.h>: _IO(0x12, 119) and _IO(0x12, 127); both take u64 {start, length} in bytes.
BLKDISCARD: Final = 0x1277
BLKZEROOUT: Final = 0x127F
# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

_ZEROS: Final = bytes(1 << 20)
_RANGE: Final = struct.Struct("=QQ")
# Payloads at least this big go log fd → target fd with copy_file_range (no copy through
# Python); smaller ones are cheaper as pread/pwrite (measured: 4 KiB copy_file_range is ~2x
# slower than pread + pwrite here).
_KERNEL_COPY_MIN: Final = 64 << 10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

CheckWhen = int | Literal["flush", "fua"]
"""After every N replayed entries (counted from the start point), or after every FLUSH/FUA."""


class ReplayError(LogwritesError):
    """A replay cannot be done as asked (a start or stop point that the log does not have)."""


class MarkNotFound(ReplayError):
    def __init__(self, name: str, after: int) -> None:
        super().__init__(name, after)
        self.name, self.after = name, after

    def __str__(self) -> str:
        where = f" at or after entry {self.after}" if self.after else ""
        return f"mark {self.name!r} is not in the log{where}"


class StopNotFound(ReplayError):
    def __init__(self, what: str, after: int) -> None:
        super().__init__(what, after)
        self.what, self.after = what, after

    def __str__(self) -> str:
        return f"no {self.what} at or after entry {self.after}"


class ReplayCheckFailed(CheckFailed):
    """The check command said no after `index` was replayed (the target holds 0..index)."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(index, detail)
        self.index, self.detail = index, detail

    def __str__(self) -> str:
        return f"check failed after log entry {self.index}: {self.detail}"


@dataclass(slots=True)
class ReplayResult:
    """What a replay did. `next_index`/`next_block` say where a later replay may resume."""

    start_index: int
    next_index: int          # one past the last entry consumed
    next_block: int          # the log block of entry `next_index`'s header
    entries: int = 0         # entries consumed (replayed, including flushes and marks)
    writes: int = 0
    discards: int = 0
    flushes: int = 0
    fuas: int = 0
    marks: int = 0
    bytes_written: int = 0   # payload bytes copied onto the target
    bytes_zeroed: int = 0    # bytes discarded (left zero)
    checks: int = 0
    native_entries: int = 0  # of `entries`, those applied in C (the fast path's plain writes)
    seconds: float = 0.0

    @property
    def last_index(self) -> int | None:
        return self.next_index - 1 if self.entries else None


# ---- applying one entry -------------------------------------------------------------------


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        if written <= 0:
            raise OSError(errno.EIO, f"short write at byte {offset} of the target")
        data = data[written:]
        offset += written


def _copy_payload(src_fd: int, dst_fd: int, length: int, src_at: int, dst_at: int) -> None:
    """length bytes from the log to the target: in the kernel if it can, else through a buffer."""
    if length >= _KERNEL_COPY_MIN:
        try:
            while length:
                copied = os.copy_file_range(src_fd, dst_fd, length, src_at, dst_at)
                if copied <= 0:
                    break  # not expected for a regular log; finish through a buffer
                length -= copied
                src_at += copied
                dst_at += copied
        except OSError as err:
            # EXDEV on old kernels across filesystems, EINVAL for block devices and special
            # files: fall back to plain reads and writes.
            if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                                 errno.EBADF):
                raise
    while length:
        chunk = os.pread(src_fd, min(length, 8 << 20), src_at)
        if not chunk:
            raise OSError(errno.EIO, f"the log ended while reading a payload at byte {src_at}")
        _pwrite_all(dst_fd, chunk, dst_at)
        length -= len(chunk)
        src_at += len(chunk)
        dst_at += len(chunk)


def _write_zeros(fd: int, offset: int, length: int) -> None:
    view = memoryview(_ZEROS)
    while length:
        take = min(length, len(_ZEROS))
        _pwrite_all(fd, view[:take], offset)
        offset += take
        length -= take


def zero_range(target_fd: int, offset: int, length: int, *, discard_zeroes: bool = True) -> None:
    """Leave zeros on `length` bytes at `offset` of the target, whatever the size.

    Regular file: punch a hole (the file keeps its size). Block device: BLKZEROOUT (zeros
    guaranteed) — or BLKDISCARD when `discard_zeroes` is False and the caller accepts what the
    device returns after a discard — falling back to writing zeros.
    """
    if length <= 0:
        return
    mode = os.fstat(target_fd).st_mode
    if stat.S_ISBLK(mode):
        request = BLKZEROOUT if discard_zeroes else BLKDISCARD
        try:
            fcntl.ioctl(target_fd, request, _RANGE.pack(offset, length))
            return
        except OSError as err:
            log.debug("block device %s failed (%s): writing zeros instead",
                      "BLKZEROOUT" if discard_zeroes else "BLKDISCARD", err)
    elif stat.S_ISREG(mode):
        if _fallocate(target_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        err_no = ctypes.get_errno()
        if err_no not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err_no, f"punching a hole in the target: {os.strerror(err_no)}")
        log.debug("punching a hole failed (%s): writing zeros instead", os.strerror(err_no))
        # A hole would not have grown the file: neither do the zeros we write instead.
        length = max(0, min(length, os.fstat(target_fd).st_size - offset))
    _write_zeros(target_fd, offset, length)


def apply_entry(reader: LogReader, entry: Entry, target_fd: int, *,
                discard_zeroes: bool = True) -> None:
    """Apply one entry to the target: write its payload at `entry.sector * sectorsize`; leave
    zeros over a discard's range; nothing for a flush or a mark.

    :raise OSError: if the target cannot be written.
    """
    sectorsize = reader.sectorsize
    if not entry.nr_sectors:
        return
    offset = entry.sector * sectorsize
    length = entry.nr_sectors * sectorsize
    if entry.flags & EntryFlag.DISCARD:
        zero_range(target_fd, offset, length, discard_zeroes=discard_zeroes)
    else:
        _copy_payload(reader.fileno(), target_fd, length, entry.data_offset, offset)


# ---- finding start and stop points --------------------------------------------------------


def find_mark(reader: LogReader, name: str, start_index: int = 0,
              start_block: int = 1) -> Entry:
    """The first mark called `name` at or after `start_index`.

    :raise MarkNotFound: if there is none. :raise LogFormatError: for a damaged log.
    """
    for entry in reader.entries(start_index, start_block):
        if entry.mark == name and entry.flags & EntryFlag.MARK:
            return entry
    raise MarkNotFound(name, start_index)


def resolve_start(reader: LogReader, *, start_entry: int = 0, start_block: int | None = None,
                  start_mark: str | None = None) -> tuple[int, int]:
    """(index, block) of the first entry to replay.

    `start_mark` starts just after that mark (replay-log consumes the mark while seeking);
    `start_entry` with a known `start_block` (from a previous ReplayResult) costs nothing,
    without one the headers before it are walked (payloads are stepped over).
    """
    if start_mark is not None:
        mark = find_mark(reader, start_mark)
        return mark.index + 1, mark.next_block(reader.sectorsize)
    if not 0 <= start_entry <= reader.nr_entries:
        raise ReplayError(f"start entry {start_entry} is not in the log "
                          f"(it has {reader.nr_entries} entries)")
    if start_block is not None:
        return start_entry, start_block
    block = 1
    for entry in reader.entries(0, 1):
        if entry.index == start_entry:
            return start_entry, block
        block = entry.next_block(reader.sectorsize)
    return start_entry, block  # start_entry == nr_entries: nothing left to replay


def _stop_flags(next_flush: bool, next_fua: bool, end_mark: str | None) -> int:
    return ((EntryFlag.FLUSH if next_flush else 0) | (EntryFlag.FUA if next_fua else 0)
            | (EntryFlag.MARK if end_mark is not None else 0))


def find_stop(reader: LogReader, start_index: int, start_block: int, *,
              limit: int | None = None, end_mark: str | None = None,
              next_flush: bool = False, next_fua: bool = False) -> Entry:
    """The entry where a replay from `start_index` stops (inclusive): the `limit`-th entry, or
    the first one that meets a stop condition (the named mark, a FLUSH, a FUA), whichever
    comes first — replay-log's `--find`.

    :raise MarkNotFound, StopNotFound: if the log has no such entry.
    """
    stop_flags = _stop_flags(next_flush, next_fua, end_mark)
    if limit is not None and limit <= 0:
        raise StopNotFound("entry within a limit of 0", start_index)
    count = 0
    for entry in reader.entries(start_index, start_block):
        count += 1
        if count == limit:
            return entry
        hit = entry.flags & stop_flags
        # A FLUSH/FUA stop is met by the flag alone; a mark stop only by the named mark.
        if hit and (hit & ~EntryFlag.MARK or entry.mark == end_mark):
            return entry
    if end_mark is not None and not (next_flush or next_fua):
        raise MarkNotFound(end_mark, start_index)
    wanted = [what for what, on in (("flush", next_flush), ("FUA write", next_fua),
                                    (f"mark {end_mark!r}", end_mark is not None)) if on]
    if limit is not None:
        wanted.append(f"entry {start_index + limit - 1}")
    raise StopNotFound(" or ".join(wanted) or "stop condition", start_index)


# ---- the replay loop ----------------------------------------------------------------------


def replay(log_path: str | os.PathLike[str], target_path: str | os.PathLike[str], *,
           start_entry: int = 0, start_block: int | None = None,
           start_mark: str | None = None, limit: int | None = None,
           end_mark: str | None = None, next_flush: bool = False, next_fua: bool = False,
           check: CheckWhen | None = None, checker: Callable[[Entry], str | None] | None = None,
           discard_zeroes: bool = True, sync: bool = True) -> ReplayResult:
    """Replay part of a log onto `target_path` (an image file, created if missing, or a block
    device), with replay-log's start and stop semantics.

    Start: `start_entry` (with `start_block` if known, e.g. a previous result's `next_block`),
    or just after `start_mark`. Stop (inclusive, whichever first): after `limit` entries counted
    from the start (None: no limit; 0: replay nothing), at `end_mark`, at the next FLUSH
    (`next_flush`) or FUA (`next_fua`). A stop condition that the log never meets is an error
    raised before the target is touched, never a silent full replay.

    Check: with `check` and `checker`, after every `check` entries (or every FLUSH / FUA entry)
    the target is made durable and `checker(entry)` runs; it returns None for a pass, or a
    one-line reason for a failure, which stops the replay with ReplayCheckFailed.

    :raise LogFormatError: the log is damaged (at the entry named). :raise MarkNotFound,
        StopNotFound, ReplayError: no such start or stop point. :raise ReplayCheckFailed:
        a check said no. :raise OSError: the log or target cannot be read or written.
    """
    if (check is None) != (checker is None):
        raise ReplayError("a check needs both when to check and what to run")
    if isinstance(check, int) and check <= 0:
        raise ReplayError(f"--check {check}: the number of entries must be positive")
    started = time.perf_counter()
    with LogReader(log_path) as reader:
        index, block = resolve_start(reader, start_entry=start_entry, start_block=start_block,
                                     start_mark=start_mark)
        count = reader.nr_entries - index
        if limit is not None:
            count = min(count, max(limit, 0))
        if end_mark is not None or next_flush or next_fua:
            # Found before anything is written, so a missing mark leaves the target untouched.
            stop = find_stop(reader, index, block, limit=limit, end_mark=end_mark,
                             next_flush=next_flush, next_fua=next_fua)
            count = stop.index - index + 1
        result = ReplayResult(start_index=index, next_index=index, next_block=block)
        fd = open_target(target_path, reader, os.O_WRONLY | os.O_CREAT)
        try:
            try:
                if count > 0 and checker is None:
                    _replay_fast(reader, fd, index, block, count, result, discard_zeroes)
                elif count > 0:
                    _replay_loop(reader, fd, index, block, count, result, check, checker,
                                 discard_zeroes)
            except LogFormatError as err:
                if not result.entries:
                    raise
                # Damage is found as the replay reaches it: say what the target holds now.
                raise LogFormatError(err.index, f"{err.problem}; {target_path} holds the "
                                                f"entries {index}..{err.index - 1} replayed "
                                                f"before it") from err
            except OSError as err:
                raise ReplayError(f"entry {index + result.entries} onto {target_path}: "
                                  f"{err.strerror or err}") from err
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        result.seconds = time.perf_counter() - started
        log.info("replayed entries %d..%d of %s (%d bytes written, %d discarded) in %.3f s",
                 index, result.next_index - 1, log_path, result.bytes_written,
                 result.bytes_zeroed, result.seconds)
        return result


def open_target(target_path: str | os.PathLike[str], reader: LogReader, flags: int) -> int:
    """The target's descriptor, opened with `flags` once it is known to be a regular file or a
    block device (or missing, with O_CREAT) other than the log `reader` reads.

    :raise UsageError: the target is the log itself, or something a replay cannot write.
    """
    target = storage_stat(target_path, "target", may_be_missing=bool(flags & os.O_CREAT))
    if target is not None and same_storage(target, os.fstat(reader.fileno())):
        raise UsageError(f"target {os.fspath(target_path)} is the log itself: the replay "
                         f"would overwrite the log it reads")
    return os.open(target_path, flags | os.O_CLOEXEC, 0o644)


def replay_entries(reader: LogReader, target_fd: int, start_index: int, start_block: int,
                   count: int, *, discard_zeroes: bool = True) -> ReplayResult:
    """Apply `count` entries from `start_index` (header at log block `start_block`) onto an
    open target, on the fast path; no sync. For callers that keep the log and target open
    across many replays (the crash-state builder): far cheaper than `apply_entry` per entry.
    The result's `next_index`/`next_block` are where the next call continues.

    :raise LogFormatError: the log is damaged. :raise OSError: the target cannot be written.
    """
    result = ReplayResult(start_index=start_index, next_index=start_index,
                          next_block=start_block)
    count = min(count, reader.nr_entries - start_index)
    if count > 0:
        _replay_fast(reader, target_fd, start_index, start_block, count, result, discard_zeroes)
    return result


def _replay_fast(reader: LogReader, fd: int, index: int, block: int, count: int,
                 result: ReplayResult, discard_zeroes: bool) -> None:
    """The hot path (no checks), fused with `LogReader.scan`'s walk: no Entry objects.

    `lw_replay_plain` (C, logwrites/_replay_plain.c) applies plain writes and flushes, reading
    headers in CHUNK-sized reads into the buffer it shares with this loop; it returns at the
    first entry it leaves to Python — a discard, a mark, anything `decode_entry_at` (the one
    validator) must look at, a header or payload past the end — which the code below applies
    or reports exactly as the whole loop did before it moved to C, then hands back.
    """
    sectorsize, size, log_fd = reader.sectorsize, reader.size, reader.fileno()
    nr_entries = reader.nr_entries
    buf = bytearray(max(CHUNK, 2 * sectorsize))
    view = memoryview(buf)
    one_block = view[:sectorsize]
    unpack, pwrite, preadv, starts = ENTRY_HEADER.unpack_from, os.pwrite, os.preadv, buf.startswith
    zeros = zero_padding(sectorsize)
    padding = len(zeros)
    walk = _ffi.new("struct lw_replay *")
    walk.index, walk.at = index, block * sectorsize
    plain, c_buf, buf_size = _lib.lw_replay_plain, _ffi.from_buffer(buf), len(buf)
    stop = index + count
    # Counts of the entries this loop applies; C keeps its own in `walk`.
    writes = discards = flushes = fuas = marks = bytes_written = bytes_zeroed = bytes_read = 0
    try:
        while True:
            if plain(log_fd, fd, stop, sectorsize, size, c_buf, buf_size, walk) < 0:
                raise _walk_error(walk)
            i = walk.index
            if i >= stop:
                break
            at, buf_start, buf_end = walk.at, walk.buf_start, walk.buf_end
            if at + sectorsize > buf_end:
                if at + sectorsize > size:
                    raise header_past_end(i, size, nr_entries)
                got = preadv(log_fd, [one_block if walk.big_step else view], at)
                bytes_read += got
                buf_start, buf_end = at, at + got
            pos = at - buf_start
            sector, nr_sectors, flags, data_len = unpack(buf, pos)
            if (flags & ~KNOWN_FLAGS or not (flags or nr_sectors)
                    or (data_len > padding if flags & MARK
                        else not starts(zeros, pos + INLINE_OFFSET, pos + sectorsize))
                    or (nr_sectors and (sector + nr_sectors) * sectorsize > MAX_BYTE_OFFSET)):
                decode_entry_at(buf, pos, sectorsize, i, at + sectorsize)  # raises
            if nr_sectors and not flags & DISCARD:
                length = nr_sectors * sectorsize
                next_at = at + sectorsize + length
                if next_at > size:
                    raise payload_past_end(i, nr_sectors, next_at, size)
                big_step = length > BUFFERED_PAYLOAD
                if big_step:
                    _copy_payload(log_fd, fd, length, at + sectorsize, sector * sectorsize)
                else:
                    if next_at > buf_end:
                        got = preadv(log_fd, [view], at)
                        bytes_read += got
                        buf_start, buf_end, pos = at, at + got, 0
                    start = pos + sectorsize
                    written = pwrite(fd, view[start : start + length], sector * sectorsize)
                    if written != length:
                        _pwrite_all(fd, view[start + written : start + length],
                                    sector * sectorsize + written)
                writes += 1
                bytes_written += length
            else:
                next_at = at + sectorsize
                big_step = False
                if nr_sectors:
                    zero_range(fd, sector * sectorsize, nr_sectors * sectorsize,
                               discard_zeroes=discard_zeroes)
                    discards += 1
                    bytes_zeroed += nr_sectors * sectorsize
                if flags & FLUSH:
                    flushes += 1
                if flags & MARK:
                    marks += 1
            if flags & FUA:
                fuas += 1
            walk.index, walk.at, walk.big_step = i + 1, next_at, big_step
            walk.buf_start, walk.buf_end = buf_start, buf_end
    finally:
        reader.bytes_read += bytes_read + walk.bytes_read
        result.entries = walk.index - index
        result.native_entries = walk.c_entries
        result.next_index, result.next_block = walk.index, walk.at // sectorsize
        result.writes, result.discards = writes + walk.writes, discards
        result.flushes, result.fuas = flushes + walk.flushes, fuas + walk.fuas
        result.marks = marks
        result.bytes_written, result.bytes_zeroed = bytes_written + walk.bytes_written, bytes_zeroed


def _walk_error(walk: Any) -> OSError:
    """The OSError the Python loop raised for the system call that failed in C."""
    err, at, failed = walk.err, walk.fail_at, walk.failed
    if failed == _lib.LW_FAILED_SHORT_WRITE:
        return OSError(errno.EIO, f"short write at byte {at} of the target")
    if failed == _lib.LW_FAILED_LOG_ENDED:
        return OSError(errno.EIO, f"the log ended while reading a payload at byte {at}")
    return OSError(err, os.strerror(err))


def _replay_loop(reader: LogReader, fd: int, index: int, block: int, count: int,
                 result: ReplayResult, check: CheckWhen | None,
                 checker: Callable[[Entry], str | None] | None, discard_zeroes: bool) -> None:
    """The loop with checks: entries from `LogReader.scan`, the checker called with them."""
    sectorsize = reader.sectorsize
    log_fd = reader.fileno()
    pwrite = os.pwrite
    check_every = check if isinstance(check, int) else 0
    check_flag = FLUSH if check == "flush" else FUA if check == "fua" else 0
    done = writes = discards = bytes_written = bytes_zeroed = 0
    flushes = fuas = marks = 0
    entry: Entry | None = None
    try:
        for entry, payload, flags in reader.scan(index, block, True):
            if payload is not None:
                offset = entry.sector * sectorsize
                written = pwrite(fd, payload, offset)
                if written != len(payload):
                    _pwrite_all(fd, payload[written:], offset + written)
                writes += 1
                bytes_written += len(payload)
            elif entry.nr_sectors:
                length = entry.nr_sectors * sectorsize
                if flags & DISCARD:
                    zero_range(fd, entry.sector * sectorsize, length,
                               discard_zeroes=discard_zeroes)
                    discards += 1
                    bytes_zeroed += length
                else:
                    _copy_payload(log_fd, fd, length, entry.data_offset,
                                  entry.sector * sectorsize)
                    writes += 1
                    bytes_written += length
            if flags:
                if flags & FLUSH:
                    flushes += 1
                if flags & FUA:
                    fuas += 1
                if flags & MARK:
                    marks += 1
            done += 1
            if checker is not None and (
                (check_every and done % check_every == 0) or flags & check_flag
            ):
                os.fsync(fd)
                result.checks += 1
                verdict = checker(entry)
                if verdict is not None:
                    raise ReplayCheckFailed(entry.index, verdict)
            if done == count:
                break
    finally:
        result.entries = done
        result.writes, result.discards = writes, discards
        result.flushes, result.fuas, result.marks = flushes, fuas, marks
        result.bytes_written, result.bytes_zeroed = bytes_written, bytes_zeroed
        if entry is not None and done:
            result.next_index = entry.index + 1
            result.next_block = entry.next_block(sectorsize)


def shell_checker(command: str,
                  timeout_s: float | None = None) -> Callable[[Entry], str | None]:
    """A checker that runs `command` through the shell, as replay-log's `--fsck` does.

    The entry just replayed is in the environment as LOGWRITES_ENTRY. A command still running
    after `timeout_s` seconds (None: no bound, as in replay-log) fails the check: a hung fsck
    is news for its developer, and it would otherwise hang the replay for good. On a timeout,
    and when the replay is stopped while the command runs (Ctrl-C, SIGTERM), the command's
    whole process group is ended: the shell's children would otherwise outlive us, still
    reading the target.
    """
    import subprocess

    def run(entry: Entry) -> str | None:
        env = dict(os.environ, LOGWRITES_ENTRY=str(entry.index))
        proc = subprocess.Popen(command, shell=True, env=env, start_new_session=True)
        try:
            status = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return (f"{command!r} did not finish within {timeout_s:g} s (--fsck-timeout): "
                    f"killed with its process group")
        except BaseException:
            _kill_group(proc)
            raise
        if status == 0:
            return None
        return f"{command!r} exited with status {status}"

    return run


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL `proc`'s process group (it leads one: start_new_session), then reap `proc`."""
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


__all__ = [
    "MarkNotFound",
    "ReplayCheckFailed",
    "ReplayError",
    "ReplayResult",
    "StopNotFound",
    "apply_entry",
    "find_mark",
    "find_stop",
    "replay",
    "replay_entries",
    "resolve_start",
    "shell_checker",
    "zero_range",
]
