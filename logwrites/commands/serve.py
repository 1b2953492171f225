"""`logwrites serve IMAGE --socket SOCK --log LOG ...`: the vhost-user-blk backend.

Serves IMAGE to QEMU's vhost-user-blk-pci device and records every write in LOG under
DESIGN.md §3's rules (or as QEMU's blklogwrites does, or not at all: `--mode`). Prints one line
starting with `ready` once it listens (scripts wait for it) and one summary line when it stops
(SIGINT/SIGTERM; or, with `--once`, when the first front-end leaves).

Sockets: the vhost-user and control sockets are created with umask 0o077 and mode 0600
(`--socket-mode` to share them, e.g. with a QEMU running as another user in the same group).
Whoever can connect to the vhost-user socket can read and write the image and whoever reaches
the control socket can stop the guest, so a socket directory that others may enter or write
(mode & 0o007) gets a warning on stderr; we warn rather than refuse because the socket's own
mode already keeps others out, and /run/user/UID-style private directories are the advice.
Every command-line error is one line on stderr and exit status 2 (cli.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
from pathlib import Path

from logwrites.errors import LogFormatError, UsageError
from logwrites.format import SECTOR_SIZES, SUPER_BLOCK, decode_super

# The log's room is zeroed this far ahead of its small entries, so a guest FLUSH's fdatasync of
# the log does not also write its inode back (see LogWriter's `preallocate`).
LOG_ZERO_AHEAD = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an image to QEMU over vhost-user-blk, logging writes",
                       description="Serve IMAGE to QEMU's vhost-user-blk-pci and record every "
                                   "write in a dm-log-writes log.")
    p.add_argument("image", type=Path, help="the data image (raw file or block device)")
    p.add_argument("--socket", type=Path, required=True, help="vhost-user socket to listen on")
    p.add_argument("--log", type=Path, help="the log file or block device (created; "
                                            "required unless --mode passthrough)")
    p.add_argument("--control", type=Path,
                   help="control socket (JSON lines; default SOCK.control beside SOCK)")
    p.add_argument("--mode", choices=("logwrites", "immediate", "passthrough"),
                   default="logwrites",
                   help="logwrites: dm-log-writes ordering (default); immediate: log at "
                        "completion like QEMU's blklogwrites; passthrough: no log")
    p.add_argument("--sector-size", type=int, choices=SECTOR_SIZES, default=512,
                   help="logical block size the guest sees and the log's unit (default 512)")
    p.add_argument("--readonly", action="store_true", help="a read-only disk")
    p.add_argument("--writethrough", action="store_true",
                   help="start with the guest's write cache off (every write logged as FUA)")
    p.add_argument("--num-queues", type=int, default=1, help="virtqueues (default 1)")
    p.add_argument("--serial", default="logwrites", help="GET_ID string (at most 20 bytes)")
    p.add_argument("--log-size", type=int, metavar="BYTES",
                   help="the log may grow to at most BYTES; then see --on-log-full")
    p.add_argument("--on-log-full", choices=("fail", "pause"), default="fail",
                   help="fail (default): the FLUSH (or FUA write) whose entries do not fit "
                        "gets IOERR and every later write and flush too, the log staying valid "
                        "up to its last entry; pause: hold that FLUSH, emit a log-full event "
                        "on the control socket, retry on resume")
    p.add_argument("--socket-mode", type=lambda text: int(text, 8), default=0o600,
                   metavar="OCTAL", help="mode of both sockets (default 0600)")
    p.add_argument("--resume", action="store_true",
                   help="continue LOG after its last counted entry (a restarted backend on the "
                        "same image) instead of creating it; completed writes a killed backend "
                        "had not logged yet come back from LOG.pending (--pending-journal)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new log over an existing one (without it, a LOG that holds "
                        "anything is refused: it may be an earlier recording, or the image)")
    p.add_argument("--pending-journal", action="store_true",
                   help="keep the unflushed list in LOG.pending too (one more write per "
                        "request) so that a killed backend restarted with --resume loses none "
                        "of it (logwrites mode)")
    p.add_argument("--once", action="store_true",
                   help="exit when the first front-end disconnects")
    p.set_defaults(run=run)


def _refuse_to_overwrite(log: Path) -> None:
    """:raise UsageError: when `log` holds something a new log would destroy: a log with
    entries (file or block device), or a regular file with bytes that are not a log (an image
    given by mistake). A new path, an empty file, a log without entries or a device without a
    log is fine."""
    try:
        st = log.stat()
    except FileNotFoundError:
        return
    regular = stat.S_ISREG(st.st_mode)
    if not (regular and st.st_size) and not stat.S_ISBLK(st.st_mode):
        return
    with open(log, "rb") as f:
        head = f.read(SUPER_BLOCK.size)
    try:
        entries: int | None = decode_super(head).nr_entries
    except LogFormatError:
        entries = None
    if entries:
        raise UsageError(f"--log {log} holds a log of {entries} "
                         f"{'entry' if entries == 1 else 'entries'}: --resume continues it, "
                         f"--overwrite starts a new log over it")
    if entries is None and regular:
        raise UsageError(f"--log {log} holds {st.st_size} bytes that are not a log: "
                         f"--overwrite replaces them with a new log")


def _image_size(fd: int) -> int:
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise UsageError("the image must be a regular file or a block device")


def _check_socket_dir(sock: Path) -> None:
    """The socket's directory must exist; warn if others may enter or write it."""
    parent = sock.parent if str(sock.parent) else Path(".")
    try:
        st = parent.stat()
    except OSError as err:
        raise UsageError(f"--socket {sock}: its directory: {err.strerror}") from err
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"--socket {sock}: {parent} is not a directory")
    if st.st_mode & 0o007:
        print(f"logwrites serve: warning: {parent} is open to other users (mode "
              f"{stat.S_IMODE(st.st_mode):04o}); prefer a directory only you can enter",
              file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from logwrites.logfile import LogWriter
    from vhost import pending
    from vhost.blk import BlkDevice
    from vhost.ordering import make_sink
    from vhost.server import Server

    if not 1 <= args.num_queues <= 64:
        raise UsageError(f"--num-queues {args.num_queues}: between 1 and 64")
    if len(args.serial.encode()) > 20:
        raise UsageError(f"--serial {args.serial!r}: at most 20 bytes")
    if args.mode != "passthrough" and args.log is None:
        raise UsageError(f"--mode {args.mode} needs --log LOG")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the log and --overwrite starts a new one: one or "
                         "the other")
    if args.resume and (args.log is None or not args.log.exists()):
        raise UsageError(f"--resume: no log {args.log} to resume")
    control = args.control or args.socket.with_name(args.socket.name + ".control")
    if len(str(args.socket)) > 107 or len(str(control)) > 107:
        raise UsageError("socket paths are limited to 107 bytes: choose a shorter --socket")
    if not 0 <= args.socket_mode <= 0o777:
        raise UsageError(f"--socket-mode {args.socket_mode:o}: permission bits, e.g. 600")
    if args.log_size is not None and args.log_size < 2 * args.sector_size:
        raise UsageError(f"--log-size {args.log_size}: at least two {args.sector_size}-byte "
                         f"blocks (the super block and one entry)")
    if args.log is not None and args.log.exists() and args.image.exists() \
            and args.log.resolve() == args.image.resolve():
        raise UsageError(f"--log {args.log} is the image itself")
    if args.log is not None and args.mode != "passthrough" and not (args.resume
                                                                    or args.overwrite):
        _refuse_to_overwrite(args.log)
    # One check (and at most one warning) per directory: both sockets usually share one.
    for sock in {sock.parent: sock for sock in (control, args.socket)}.values():
        _check_socket_dir(sock)
    fd = os.open(args.image, (os.O_RDONLY if args.readonly else os.O_RDWR) | os.O_CLOEXEC)
    try:
        size = _image_size(fd)
        if size < args.sector_size:
            raise UsageError(f"{args.image}: {size} bytes, smaller than one sector")
        if size % args.sector_size:
            raise UsageError(f"{args.image}: {size} bytes, not a multiple of the "
                             f"{args.sector_size}-byte sector size")
        writer = None
        if args.mode != "passthrough":
            if args.resume:
                writer = LogWriter.resume(args.log, max_bytes=args.log_size,
                                          preallocate=LOG_ZERO_AHEAD)
                if writer.sectorsize != args.sector_size:
                    writer.close()
                    raise UsageError(f"--resume: {args.log} has {writer.sectorsize}-byte "
                                     f"sectors, not {args.sector_size} (--sector-size)")
            else:
                writer = LogWriter.create(args.log, args.sector_size, max_bytes=args.log_size,
                                          preallocate=LOG_ZERO_AHEAD)
        sink = make_sink(args.mode, writer)
        restored = 0
        journal = None
        if args.log is not None and args.mode == "logwrites" and (
                args.pending_journal or args.resume):
            journal_file = pending.journal_path(args.log)
            journal = (pending.load(journal_file, args.log) if args.resume
                       else pending.Journal())
            if args.pending_journal or journal.records or journal.done:
                sink = pending.JournaledSink(sink, journal_file)
                sink.restore(journal)
                restored = len(journal.records)
        device = BlkDevice(fd, size, sink, sectorsize=args.sector_size,
                           readonly=args.readonly, writethrough=args.writethrough,
                           num_queues=args.num_queues, serial=args.serial,
                           on_log_full=args.on_log_full)
        server = Server(device, sink, args.socket, control, once=args.once,
                        socket_mode=args.socket_mode)

        resumed = (f" resumed entries={sink.entries} restored={restored}"
                   f" done={len(journal.done) if journal is not None else 0}"
                   if args.resume else "")

        def ready() -> None:
            print(f"ready socket={args.socket} control={control} mode={args.mode} "
                  f"sectorsize={args.sector_size} capacity={device.size}"
                  f"{' readonly' if args.readonly else ''}"
                  f"{resumed}", flush=True)

        try:
            server.serve(ready)
        except BaseException:
            if writer is not None:
                # Best effort: the failure that stopped serving (a log that cannot be written,
                # say) is the one to report, not a second one from the same log.
                with contextlib.suppress(OSError):
                    writer.close()
            raise
        if writer is not None:
            writer.close()
        requests = sum(device.requests().values())
        print(f"stopped: {requests} requests ({device.bytes_written} bytes written, "
              f"{device.bytes_read} read), {sink.entries} entries, {sink.flushes} flushes, "
              f"log {sink.log_bytes} bytes, {server.connections} connection(s), "
              f"mode {args.mode}", flush=True)
    finally:
        os.close(fd)
    sys.stdout.flush()
    return 0
