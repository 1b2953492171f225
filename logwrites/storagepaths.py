"""What may stand where a log or an image is expected: a regular file or a block device.

Anything else fails late and badly: opening a FIFO blocks until a writer comes (forever, for a
replay or an inspect), and files such as /proc's cannot be sized or written at an offset, so
the error would be a bare "Illegal seek" naming neither the path nor its role.
"""

from __future__ import annotations

import errno
import os
import stat

from logwrites.errors import UsageError

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"))


def kind_of(mode: int) -> str | None:
    """What a path of `mode` is, when it is neither a regular file nor a block device."""
    return next((name for test, name in _KINDS if test(mode)), None)


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
    kind = kind_of(st.st_mode)
    if kind is not None:
        raise UsageError(f"{role} {os.fspath(path)}: {kind}, not a regular file or block "
                         f"device")
    return st


def same_storage(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are one file, or one block device (two device nodes of one disk,
    /dev/sdb and a udev link's target, say, are inodes of their own)."""
    if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode):
        return a.st_rdev == b.st_rdev
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
