"""What may stand where a log or an image is expected: a regular file or a block device,
and not a file of the kernel's pseudo filesystems.

Anything else fails late and badly: opening a FIFO blocks until a writer comes (forever, for a
replay or an inspect), and files such as /proc's or /sys's are "regular" but no storage: their
size reads 0 or 4096 whatever they hold, they cannot be written at an offset, and a write may
change the kernel's settings. The error would be a bare "Illegal seek" naming neither the path
nor its role, or none at all.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Final

from logwrites.errors import UsageError

# Filesystems whose files are the kernel's state, not data: /proc/self/mountinfo's names.
PSEUDO_FILESYSTEMS: Final = frozenset({
    "proc", "sysfs", "debugfs", "tracefs", "securityfs", "cgroup", "cgroup2", "configfs",
    "bpf", "pstore", "efivarfs", "fusectl", "binfmt_misc", "selinuxfs", "smackfs", "nsfs",
    "mqueue", "rpc_pipefs",
})

FILE_KINDS: Final = (
    (stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"),
)


def file_kind(mode: int) -> str:
    """What an `st_mode` says a path is, for messages: "a FIFO", "a directory", ..."""
    return next((kind for is_kind, kind in FILE_KINDS if is_kind(mode)), "an unknown file type")


def storage_stat(path: str | os.PathLike[str], role: str,
                 *, may_be_missing: bool = False) -> os.stat_result | None:
    """`path`'s stat, checked to be a regular file or a block device (None when it does not
    exist and `may_be_missing`).

    :raise UsageError: an empty path, or anything but a file, directory or block device.
    :raise IsADirectoryError, FileNotFoundError: naming the path, as the open would.
    """
    if not os.fspath(path):
        raise UsageError(f"{role}: an empty path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if may_be_missing:
            return None
        raise
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    refuse_unless_storage(f"{role} {os.fspath(path)}", st)
    return st


def refuse_unless_storage(named: str, st: os.stat_result) -> None:
    """:raise UsageError: starting with `named`, unless `st` is a block device's, or a
    regular file's on a filesystem that stores data."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UsageError(f"{named}: {file_kind(st.st_mode)}, not a regular file or block device")
    fstype = pseudo_filesystem(st) if stat.S_ISREG(st.st_mode) else None
    if fstype is not None:
        raise UsageError(f"{named}: a file on {fstype}, a kernel pseudo filesystem, not storage")


def pseudo_filesystem(st: os.stat_result) -> str | None:
    """The type of the kernel pseudo filesystem (proc, sysfs, ...) holding the file `st`, or
    None for any other filesystem.

    By device number in /proc/self/mountinfo, whose third field is each mount's st_dev. Only
    anonymous devices (major 0) are looked up: every pseudo filesystem has one, and a disk's
    filesystem (major 8, 253, ...) costs no read. Without /proc there is nothing to compare
    with, and no /proc file to refuse.
    """
    if os.major(st.st_dev) != 0:
        return None
    device = f"0:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                # ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE ...
                if len(fields) > 2 and fields[2] == device and "-" in fields[6:]:
                    fstype = fields[fields.index("-", 6) + 1]
                    return fstype if fstype in PSEUDO_FILESYSTEMS else None
    except (OSError, IndexError):
        return None
    return None


def same_storage(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are one file, or one block device (two device nodes of one disk,
    /dev/sdb and a udev link's target, say, are inodes of their own)."""
    if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode):
        return a.st_rdev == b.st_rdev
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
