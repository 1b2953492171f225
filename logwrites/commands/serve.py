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
Every command-line error is one line on stderr and exit status 2 (cli.py), found before
anything is created or changed: the log, the sockets (a live backend's are never replaced).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

from logwrites.errors import LogFormatError, UsageError
from logwrites.format import SECTOR_SIZES, SUPER_BLOCK, decode_super
from logwrites.storagepaths import refuse_unless_storage

if TYPE_CHECKING:
    from logwrites.logfile import LogWriter

# The log's room is zeroed this far ahead of its small entries, so a guest FLUSH's fdatasync of
# the log does not also write its inode back (see LogWriter's `preallocate`).
LOG_ZERO_AHEAD = 1 << 20
# off_t: no file or device holds more (the C path's uint64_t limit holds it too).
MAX_LOG_BYTES: Final = (1 << 63) - 1
# VIRTIO_BLK_ID_BYTES: GET_ID answers this many bytes, NUL-padded (not NUL-ended when full).
SERIAL_BYTES: Final = 20
MAX_SOCKET_PATH: Final = 107            # sun_path's 108 bytes, NUL-ended
SERIAL_RULE: Final = (f"a serial (virtio-blk's device ID) is UTF-8 text of at most "
                      f"{SERIAL_BYTES} bytes")


def _path(text: str) -> Path:
    # Path("") is Path("."): refused here, while the empty string can still be told apart.
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


def _socket_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r}: an octal mode such as 600 or 0660")
    return mode


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an image to QEMU over vhost-user-blk, logging writes",
                       description="Serve IMAGE to QEMU's vhost-user-blk-pci and record every "
                                   "write in a dm-log-writes log.")
    p.add_argument("image", type=_path, help="the data image (raw file or block device)")
    p.add_argument("--socket", type=_path, required=True, help="vhost-user socket to listen on")
    p.add_argument("--log", type=_path, help="the log file or block device (created; "
                                            "required unless --mode passthrough)")
    p.add_argument("--control", type=_path,
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
    p.add_argument("--serial", default="logwrites",
                   help=f"GET_ID string (UTF-8, at most {SERIAL_BYTES} bytes)")
    p.add_argument("--log-size", type=int, metavar="BYTES",
                   help="the log may grow to at most BYTES; then see --on-log-full")
    p.add_argument("--on-log-full", choices=("fail", "pause"), default="fail",
                   help="fail (default): the FLUSH (or FUA write) whose entries do not fit "
                        "gets IOERR and every later write and flush too, the log staying valid "
                        "up to its last entry; pause: hold that FLUSH, emit a log-full event "
                        "on the control socket, retry on resume")
    p.add_argument("--socket-mode", type=_socket_mode, default=0o600,
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


def _check_serial(serial: str) -> None:
    try:
        raw = serial.encode()
    except UnicodeEncodeError as err:     # bytes that are not UTF-8 came in as surrogates
        raise UsageError(f"--serial {serial!r}: not UTF-8; {SERIAL_RULE}") from err
    if len(raw) > SERIAL_BYTES:
        raise UsageError(f"--serial {serial!r}: {len(raw)} bytes; {SERIAL_RULE}")


def _check_log_size(log_size: int, sector_size: int) -> None:
    if log_size < 2 * sector_size:
        raise UsageError(f"--log-size {log_size}: at least two {sector_size}-byte blocks "
                         f"(the super block and one entry)")
    if log_size > MAX_LOG_BYTES:
        raise UsageError(f"--log-size {log_size}: at most {MAX_LOG_BYTES} bytes (2^63 - 1, "
                         f"the largest file size)")


def _check_image_size(image: Path, size: int, sector_size: int) -> None:
    if size < sector_size:
        raise UsageError(f"{image}: {size} bytes, smaller than one sector")
    if size % sector_size:
        raise UsageError(f"{image}: {size} bytes, not a multiple of the "
                         f"{sector_size}-byte sector size")


def _check_image(image: Path, sector_size: int) -> None:
    """Before it is opened: its type, and a regular file's size (a /proc file, 0 bytes by its
    size, would fail its seek with no word on why)."""
    st = os.stat(image)
    refuse_unless_storage(str(image), st)
    if stat.S_ISREG(st.st_mode):
        _check_image_size(image, st.st_size, sector_size)


def _check_log_type(log: Path) -> None:
    try:
        st = os.stat(log)
    except FileNotFoundError:
        return                              # a new log, created later
    refuse_unless_storage(f"--log {log}", st)


def _create_log(log: Path, sector_size: int, log_size: int | None) -> LogWriter:
    """:raise UsageError: naming LOG when it cannot hold a log (a /proc file is a regular file
    by its type, and refuses a write at an offset only once it is opened)."""
    from logwrites.logfile import LogWriter

    try:
        return LogWriter.create(log, sector_size, max_bytes=log_size,
                                preallocate=LOG_ZERO_AHEAD)
    except OSError as err:
        raise UsageError(f"--log {log}: cannot hold a log: {err.strerror}") from err


def _image_size(fd: int) -> int:
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise UsageError("the image must be a regular file or a block device")


def _socket_dir(option: str, sock: Path) -> tuple[Path, int]:
    """The socket's directory and its mode. :raise UsageError: unless it is a directory."""
    parent = sock.parent if str(sock.parent) else Path(".")
    try:
        st = parent.stat()
    except OSError as err:
        raise UsageError(f"{option} {sock}: its directory: {err.strerror}") from err
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{option} {sock}: {parent} is not a directory")
    return parent, st.st_mode


def _check_socket_path(option: str, sock: Path) -> tuple[Path, int]:
    """The socket's directory and its mode, once nothing there stops us binding `sock`."""
    from vhost.server import socket_path_problem

    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise UsageError(f"{option} {sock}: socket paths are limited to {MAX_SOCKET_PATH} "
                         f"bytes: choose a shorter --socket")
    parent, dir_mode = _socket_dir(option, sock)
    problem = socket_path_problem(sock)
    if problem is not None:
        raise UsageError(f"{option} {sock}: {problem}")
    return parent, dir_mode


def _check_sockets(socket_path: Path, control: Path | None) -> tuple[Path, dict[Path, int]]:
    """The control socket's path (default SOCK.control) and the sockets' directories with
    their modes; both sockets checked as `listen_unix` will find them, before the log exists."""
    socket_dir, socket_dir_mode = _check_socket_path("--socket", socket_path)
    # After that check: a SOCK naming a directory ("/", ".") has no name to derive one from.
    control = control or socket_path.with_name(socket_path.name + ".control")
    if control.resolve() == socket_path.resolve():
        raise UsageError(f"--control {control} is the --socket path: each socket needs its own")
    control_dir, control_dir_mode = _check_socket_path("--control", control)
    return control, {socket_dir: socket_dir_mode, control_dir: control_dir_mode}


def _refuse_log_at_a_socket(log: Path, sockets: dict[str, Path]) -> None:
    # A new log there would be refused by the socket's own check only after it was created.
    for option, sock in sockets.items():
        if log.resolve() == sock.resolve():
            raise UsageError(f"--log {log} is the {option} path")


def _warn_if_open_to_others(dirs: dict[Path, int]) -> None:
    """Once everything is checked, so that an error stays one line."""
    for parent, dir_mode in dirs.items():
        if dir_mode & 0o007:
            print(f"logwrites serve: warning: {parent} is open to other users (mode "
                  f"{stat.S_IMODE(dir_mode):04o}); prefer a directory only you can enter",
                  file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from logwrites.logfile import LogWriter
    from vhost import pending
    from vhost.blk import BlkDevice
    from vhost.ordering import make_sink
    from vhost.server import Server

    if not 1 <= args.num_queues <= 64:
        raise UsageError(f"--num-queues {args.num_queues}: between 1 and 64")
    _check_serial(args.serial)
    if args.mode != "passthrough" and args.log is None:
        raise UsageError(f"--mode {args.mode} needs --log LOG")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the log and --overwrite starts a new one: one or "
                         "the other")
    if args.resume and (args.log is None or not args.log.exists()):
        raise UsageError(f"--resume: no log {args.log} to resume")
    if args.log_size is not None:
        _check_log_size(args.log_size, args.sector_size)
    _check_image(args.image, args.sector_size)
    control, socket_dirs = _check_sockets(args.socket, args.control)
    if args.log is not None:
        _check_log_type(args.log)
        _refuse_log_at_a_socket(args.log, {"--socket": args.socket, "--control": control})
    if args.log is not None and args.log.exists() and args.log.resolve() == args.image.resolve():
        raise UsageError(f"--log {args.log} is the image itself")
    if args.log is not None and args.mode != "passthrough" and not (args.resume
                                                                    or args.overwrite):
        _refuse_to_overwrite(args.log)
    fd = os.open(args.image, (os.O_RDONLY if args.readonly else os.O_RDWR) | os.O_CLOEXEC)
    try:
        size = _image_size(fd)
        _check_image_size(args.image, size, args.sector_size)
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
                writer = _create_log(args.log, args.sector_size, args.log_size)
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
        _warn_if_open_to_others(socket_dirs)

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
