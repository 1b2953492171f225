"""What may stand where a log or an image is expected: a regular file or a block device.

Anything else fails late and badly: opening a FIFO blocks until a writer comes (forever, for a
replay or an inspect), and files such as /proc's cannot be sized or written at an offset, so
the error would be a bare "Illegal seek" naming neither the path nor its role.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Final

from logwrites.errors import UsageError

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
    refuse_unless_storage(f"{role} {os.fspath(path)}", st.st_mode)
    return st


def refuse_unless_storage(named: str, mode: int) -> None:
    """:raise UsageError: starting with `named`, unless `mode` is a regular file's or a block
    device's."""
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise UsageError(f"{named}: {file_kind(mode)}, not a regular file or block device")


def same_storage(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are one file, or one block device (two device nodes of one disk,
    /dev/sdb and a udev link's target, say, are inodes of their own)."""
    if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode):
        return a.st_rdev == b.st_rdev
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
