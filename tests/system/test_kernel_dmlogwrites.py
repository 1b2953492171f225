"""The kernel's own dm-log-writes as the reference: inside the default guest the real target
records a small ext4 workload on two plain virtio disks; our reader and replayer must read that
log (marks, METADATA, FUA, FLUSH, the end mark) and replay it to each mark into images that pass
e2fsck and hold the files the guest reported. The same workload through our backend gives a log
that replays, mark by mark, to filesystems with the same file contents.

One guest boot serves both recordings: the kernel target on vdb (data) and vdc (log), our
backend on vda.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from logwrites.check import FsckChecker
from logwrites.format import END_MARK, EntryFlag
from logwrites.logfile import LogReader
from qmp.backend import ServeBackend
from qmp.machine import Machine, PlainDisk
from tests.conftest import require_tool

MiB = 1 << 20
DATA_SIZE = 64 * MiB
MARKS = ("mkfs", "files", "unmount")
FILES = ("small", "dir/random", "dir/seq")

# The workload, run by dash in the guest; $DEV is the disk and `mark NAME` inserts a mark into
# whichever log records it. lazy_itable_init=0: no ext4lazyinit thread writing inode tables
# at arbitrary times after the mount (the two recordings should differ as little as possible).
WORKLOAD = """\
set -e
mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$DEV"
mark mkfs
mkdir -p /mnt/lw
mount -t ext4 "$DEV" /mnt/lw
mkdir /mnt/lw/dir
printf 'hello from the guest\\n' > /mnt/lw/small
cp /tmp/payload /mnt/lw/dir/random
seq 1 20000 > /mnt/lw/dir/seq
sync
mark files
for f in small dir/random dir/seq; do
    lw-report "$(echo "$f" | tr / .)" "$(sha256sum "/mnt/lw/$f" | cut -d' ' -f1)"
done
umount /mnt/lw
mark unmount
"""

KERNEL_TARGET = """\
set -e
head -c 1048576 /dev/urandom > /tmp/payload
dmsetup create lw --noudevsync --table "0 $(blockdev --getsz "$DATA") log-writes $DATA $LOG"
dmsetup mknodes lw
DEV=/dev/mapper/lw
mark() { dmsetup message lw 0 mark "$1"; }
{workload}
dmsetup remove --noudevsync lw
"""

OUR_BACKEND = """\
set -e
DEV=/dev/vda
mark() { lw-mark "$1" >/dev/null; }
{workload}
"""


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _disk_named(ready_disks: tuple[dict, ...], serial: str) -> str:
    for disk in ready_disks:
        if disk.get("serial") == serial:
            return f"/dev/{disk['name']}"
    raise AssertionError(f"no disk with serial {serial} in {ready_disks}")


def _inspect(log: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "logwrites.cli", "inspect", str(log), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _replay_to(log: Path, mark: str, target: Path) -> Path:
    _sparse(target, DATA_SIZE)
    done = subprocess.run([sys.executable, "-m", "logwrites.cli", "replay", str(log), str(target),
                           "--end-mark", mark], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    return target


def _e2fsck_clean(image: Path) -> None:
    """A plain read-only check, no journal recovery: for states where the fs is consistent."""
    done = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, f"e2fsck -fn {image}: exit {done.returncode}\n{done.stdout}"


def _recovered_and_checked(image: Path) -> Path:
    """The project's fsck checker passes the state; then a copy with ext4's journal recovered
    (as a mount would) passes a plain e2fsck -fn and is returned, for reading files back."""
    verdict = FsckChecker("ext4").check(image, expect_fs=True)
    assert verdict.verdict == "pass", f"{image}: {verdict.detail}\n{verdict.output}"
    copy = image.with_suffix(".recovered")
    shutil.copyfile(image, copy)
    done = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(copy)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode < 4, f"journal recovery of {image}: {done.stdout}"
    _e2fsck_clean(copy)
    return copy


def _cat(image: Path, path: str) -> bytes | None:
    """The file's bytes read by debugfs from the image, or None when it does not exist."""
    done = subprocess.run(["debugfs", "-R", f"cat /{path}", str(image)], capture_output=True,
                          timeout=60, check=False)
    if b"File not found" in done.stderr:
        return None
    assert done.returncode == 0, done.stderr
    return done.stdout


def _check_log_replays(log: Path, reported: dict[str, str], work: Path) -> dict[str, dict]:
    """Replay `log` to each mark: checks per mark; returns {mark: {file: bytes}} read back."""
    contents: dict[str, dict] = {}
    for mark in MARKS:
        image = _replay_to(log, mark, work / f"{mark}.img")
        if mark != "files":
            # After mkfs and after umount the filesystem is consistent without recovery.
            _e2fsck_clean(image)
        # The journal holds the sync's metadata at "files": recover it first, as a mount would.
        readable = _recovered_and_checked(image)
        files = {f: _cat(readable, f) for f in FILES}
        if mark == "mkfs":
            assert files == dict.fromkeys(FILES), f"{log} at mkfs: files exist already"
        else:
            for name, data in files.items():
                assert data is not None, f"{log} at {mark}: {name} missing"
                assert hashlib.sha256(data).hexdigest() == reported[name], \
                    f"{log} at {mark}: {name} differs from what the guest reported"
        contents[mark] = files
    return contents


@pytest.mark.slow
def test_kernel_dm_log_writes_reference_and_our_backend(default_guest, tmp_path: Path) -> None:
    require_tool("e2fsck", "e2fsprogs")
    require_tool("debugfs", "e2fsprogs")
    kdata = _sparse(tmp_path / "kernel-data.img", DATA_SIZE)
    klog_disk = _sparse(tmp_path / "kernel-log.img", 128 * MiB)
    image = _sparse(tmp_path / "ours.img", DATA_SIZE)
    our_log = tmp_path / "ours.log"

    async def scenario() -> tuple[dict[str, str], dict[str, str]]:
        backend = ServeBackend(image, our_log, tmp_path / "b")
        async with backend, Machine(default_guest, tmp_path / "run",
                                    disk_socket=backend.socket, control_socket=backend.control,
                                    disks=[PlainDisk(kdata), PlainDisk(klog_disk)]) as m:
            assert m.ready is not None
            data = _disk_named(m.ready.disks, "lw-disk1")
            logdev = _disk_named(m.ready.disks, "lw-disk2")
            kernel = await m.run(KERNEL_TARGET.replace("{workload}", WORKLOAD), fs=None,
                                 env={"DATA": data, "LOG": logdev}, timeout_s=240)
            assert kernel.ok, kernel.stderr
            ours = await m.run(OUR_BACKEND.replace("{workload}", WORKLOAD), fs=None,
                               timeout_s=240)
            assert ours.ok, ours.stderr
            await m.shutdown()  # the guest syncs and powers off: QEMU flushes the plain disks
        return kernel.reports, ours.reports

    kernel_reported, our_reported = ({k.replace(".", "/"): v for k, v in reported.items()}
                                     for reported in asyncio.run(scenario()))
    # The same payload went through both: the files are the same bytes.
    assert kernel_reported == our_reported and set(kernel_reported) == set(FILES)

    # The kernel's log, as our reader sees it (and as `inspect --json` prints it).
    with LogReader(klog_disk) as reader:
        assert reader.sectorsize == 512  # the data disk's logical block size
        entries = list(reader.entries())
    marks = [e.mark for e in entries if e.is_mark]
    assert marks == [*MARKS, END_MARK]
    assert entries[-1].is_mark and entries[-1].mark == END_MARK
    assert any(e.flags & EntryFlag.METADATA for e in entries), "ext4 tags metadata writes"
    assert any(e.is_fua for e in entries), "jbd2 commits with FUA"
    assert any(e.is_flush and not e.nr_sectors for e in entries)
    assert any(e.is_discard for e in entries), "mkfs.ext4 discards the device"
    listed = _inspect(klog_disk)
    assert len(listed) == len(entries)
    assert [r["mark"] for r in listed if r["mark"]] == marks
    assert {"metadata", "fua", "flush", "discard", "mark"} <= {
        f for r in listed for f in r["flags"]}
    assert listed[-1]["index"] == entries[-1].index == len(entries) - 1

    # Our log: the same marks in the same order, ended by the backend's clean stop.
    with LogReader(our_log) as reader:
        assert [e.mark for e in reader.entries() if e.is_mark] == [*MARKS, END_MARK]

    (tmp_path / "k").mkdir()
    (tmp_path / "o").mkdir()
    kernel_files = _check_log_replays(klog_disk, kernel_reported, tmp_path / "k")
    our_files = _check_log_replays(our_log, our_reported, tmp_path / "o")
    # Both logs, replayed to the same mark, give the same file contents.
    assert kernel_files == our_files
