"""The recording step's pure choices: the disk's default size and the line a failure shows."""

from __future__ import annotations

from logwrites.guestrecord import default_image_size, failure_line, parse_size


def test_default_image_size_fits_each_mkfs() -> None:
    assert parse_size(default_image_size("xfs")) >= 300 << 20      # mkfs.xfs's minimum
    assert default_image_size("ext4") == default_image_size(None) == "128M"


def test_failure_line_is_mkfs_reason_first_and_script_error_last() -> None:
    mkfs = "Filesystem must be larger than 300MB.\nUsage: mkfs.xfs\n/* blocksize */ [-b size=num]\n"
    assert failure_line("setup", mkfs) == "Filesystem must be larger than 300MB."
    mke2fs = "mke2fs 1.47.0 (5-Feb-2023)\n\nBad option(s) specified: bogus\n\nExtended options\n"
    assert failure_line("setup", mke2fs) == "Bad option(s) specified: bogus"
    btrfs = "btrfs-progs v6.2\nERROR: 'vda' is too small to make a usable filesystem\n"
    assert failure_line("setup", btrfs) == "ERROR: 'vda' is too small to make a usable filesystem"
    # mke2fs's progress counters are rewritten with backspaces; its error ends the last line.
    progress = ("mke2fs 1.47.0 (5-Feb-2023)\nDiscarding device blocks:     0/65536\b\b\b\b\b"
                "\b\b\b\b\b\b           \b\b\b\b\b\b\b\b\b\b\bdone\n"
                "Creating filesystem with 65536 1k blocks and 16384 inodes\n"
                "Writing superblocks and filesystem accounting information: 0/8\b\b\b   "
                "mkfs.ext4: Input/output error while writing out and closing file system\n")
    assert failure_line("setup", progress) == ("mkfs.ext4: Input/output error while writing "
                                               "out and closing file system")
    script = "+ cp a b\n\n  cp: cannot stat 'a': No such file or directory  \n\n"
    assert failure_line("script", script) == "cp: cannot stat 'a': No such file or directory"
    assert failure_line("script", " \n") == "no output"
