"""Step 1 of the crash-replay loop in a real guest, and the `guest:` checker's runner.

Recording: a blank disk image is served by our backend (`logwrites serve`, which logs every
write under dm-log-writes' rules), the default guest (or the user's kernel) boots on it, the
agent makes the filesystem, logs the mark `mkfs`, runs the workload (whose `lw-mark` calls add
marks from inside the guest), and the run ends with a power cut. The base image is a blank
file of the same size: the log starts from zeros.

The guest checker boots the guest on the state's disposable copy as a plain disk, lets the
agent mount it (the kernel under test runs its own recovery) and runs the checker script.
Uses the guests and QMP colleagues' APIs (`guests.build.default_guest`, `qmp.machine.Machine`,
`qmp.backend.ServeBackend`); blocking callers get `asyncio.run` wrappers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import shlex
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

from logwrites.crashstates import SETUP_MARK  # where the states start: the recorder marks it
from logwrites.errors import LogwritesError, UsageError
from logwrites.format import SECTOR_SIZES
from logwrites.loop import Recorder, Recording
from qmp.errors import MachineError
from qmp.machinesize import MachineSize
from qmp.savedguest import NEW_DISK_ENV, SavedGuest
from qmp.savedguest import enabled as saved_guest_enabled

if TYPE_CHECKING:
    from qmp.machine import Machine

log = logging.getLogger(__name__)

# ext4's lazy initialisation would zero inode tables and the journal from a kernel thread
# after mount, in the middle of the workload's epochs: do it inside mkfs instead.
DEFAULT_MKFS_OPTS: Final = {"ext4": "-E lazy_itable_init=0,lazy_journal_init=0"}
# mkfs.xfs refuses a data section under 300 MiB (xfsprogs 5.19 on); ext4 and btrfs fit in 128.
DEFAULT_IMAGE_SIZE: Final = "128M"
DEFAULT_IMAGE_SIZE_BY_FS: Final = {"xfs": "320M"}
# The biggest disk (and --atomic-unit) taken: images are sparse files, and 1 TiB fits in one on
# every host filesystem we know (ext4's limit is 16 TiB) while a typo's 10^20 would not.
MAX_SIZE: Final = 1 << 40
SIZE_UNITS: Final = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}  # ascending
# The smallest disk each mkfs takes with its default options, tried on e2fsprogs 1.47.0 ("too
# small for a journal" below), btrfs-progs 6.2 and xfsprogs 6.1 (data section under 300 MiB).
MIN_MKFS_SIZE: Final = {"ext4": 104 << 10, "btrfs": 109 << 20, "xfs": 300 << 20}
# "mke2fs 1.47.0 (5-Feb-2023)", "btrfs-progs v6.2": what a tool prints before its reason.
VERSION_BANNER: Final = re.compile(r"[\w.-]+ v?\d+(\.\d+)+( \(.*\))?$")
SOUNDS_WRONG: Final = re.compile(r"(?i)\b(error|fail|failed|cannot|can't|must|invalid|bad|"
                                 r"too small|too large|no such|denied|unable|unknown)\b")


class RecordError(LogwritesError):
    """The workload could not be recorded (it failed in the guest, or the guest did not run)."""


def parse_size(text: str) -> int:
    """Bytes of "4096", "4K", "1.5M", "2G" or "1T".

    :raise UsageError: not a size, not more than 0, or over `MAX_SIZE`.
    """
    try:
        if text[-1:].upper() in SIZE_UNITS:
            size: float = float(text[:-1]) * SIZE_UNITS[text[-1].upper()]
        else:
            size = int(text)
    except ValueError:
        raise UsageError(f"size {text!r}: a number of bytes, or with K, M, G or T") from None
    if not size > 0:  # also NaN
        raise UsageError(f"size {text!r}: must be more than 0 bytes")
    if size > MAX_SIZE:  # also infinity, which int() cannot take
        raise UsageError(f"size {text!r}: must be at most {size_text(MAX_SIZE)}")
    return int(size)


def require_mkfs_room(fs: str | None, size: int, mkfs_opts: str | None, given: str) -> None:
    """Refuse, before a guest boots, a disk `fs`'s mkfs would refuse in it. Only with its
    default options (`mkfs_opts` None or ""): others may need more or less (btrfs --mixed).

    :raise UsageError: starting with `given` (the option and its value), naming the least.
    """
    least = MIN_MKFS_SIZE.get(fs or "")
    if least is not None and not mkfs_opts and size < least:
        raise UsageError(f"{given}: mkfs.{fs} needs a disk of at least {size_text(least)} "
                         f"with its default options")


def size_text(size: int) -> str:
    """`size` as `parse_size` reads it, in the largest unit that divides it: 300M, 104K."""
    for unit, factor in reversed(SIZE_UNITS.items()):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def default_image_size(fs: str | None) -> str:
    """The disk under test's size when none is given: big enough for `fs`'s mkfs."""
    return DEFAULT_IMAGE_SIZE_BY_FS.get(fs or "", DEFAULT_IMAGE_SIZE)


def failure_line(phase: str, output: str) -> str:
    """The line of a failed job's output that says why. mkfs and mount (phase "setup") print
    their reason as the first line that reads as an error (after mke2fs's progress, which a
    backspaced counter joins to the error on one line), else first, after a version banner
    (mke2fs) and before their whole usage (mkfs.xfs); a script prints its last."""
    lines = [line.strip() for line in output.replace("\b", " ").splitlines() if line.strip()]
    if phase == "setup":
        lines = [line for line in lines if not VERSION_BANNER.match(line)]
        pieces = (piece for line in lines for piece in re.split(r"\s{2,}", line))
        reason = next((piece for piece in pieces if SOUNDS_WRONG.search(piece)), None)
        lines = [reason] if reason else lines[:1]
    return lines[-1] if lines else "no output"


def workload_script(path: Path, args: list[str]) -> str:
    """The script the agent runs: the workload, with its arguments set as "$@"."""
    text = path.read_text()
    if not args:
        return text
    first, _, rest = text.partition("\n")
    set_args = f"set -- {shlex.join(args)}\n"
    return f"{first}\n{set_args}{rest}" if first.startswith("#!") else set_args + text


def _guest(kernel: Path | None, modules: Path | None) -> object:
    from guests.build import default_guest

    return default_guest(kernel=kernel, modules=modules)


async def record_in_guest(workdir: Path, workload: Path, workload_args: list[str], *,
                          fs: str | None, mkfs_opts: str | None, image_size: int,
                          guest: object, timeout_s: float = 600.0, accel: str | None = None,
                          sector_size: int = 512,
                          size: MachineSize | None = None) -> Recording:
    """Record `workload` on a fresh disk of `sector_size`-byte logical sectors (the log's
    unit) in `guest` (`guests.build.default_guest`'s); power-cut at its end.

    :raise RecordError: the workload failed or the guest/backend did not run.
    """
    from qmp.backend import ServeBackend, backend_trouble
    from qmp.machine import Machine

    size = size or MachineSize()
    workdir.mkdir(parents=True, exist_ok=True)
    image, base, log_path = workdir / "disk.img", workdir / "base.img", workdir / "disk.log"
    for path in (image, base):
        with open(path, "wb") as f:
            f.truncate(image_size)
    opts = mkfs_opts if mkfs_opts is not None else DEFAULT_MKFS_OPTS.get(fs or "", "")
    run_dir = workdir / "run"
    sock_dir = Path(tempfile.mkdtemp(prefix="lw-rec-"))  # unix socket paths must stay short
    script = workload_script(workload, workload_args)
    try:
        # The directory is the recording's: a log left by an earlier one goes with its image.
        async with ServeBackend(image, log_path, sock_dir, sector_size=sector_size,
                                overwrite=True, num_queues=size.queues) as backend:
            async with Machine(guest, run_dir, disk_socket=backend.socket,  # type: ignore[arg-type]
                               control_socket=backend.control, accel=accel,
                               name="record", **size.machine_args()) as machine:
                result = await machine.run(script, fs=fs, mkfs_opts=opts, setup_mark=SETUP_MARK,
                                           timeout_s=timeout_s)
                # A full log or disk fails the guest's I/O; its tools say only "I/O error",
                # and a workload that never syncs does not even fail. Either way the log is
                # not the workload's.
                trouble = await backend_trouble(backend.control)  # type: ignore[arg-type]
                # The crash: nothing the guest has not flushed is promised to survive.
                await machine.power_cut()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert result is not None
    output = workdir / "workload.out"
    output.write_text(result.stdout + result.stderr)
    if result.timed_out:
        raise RecordError(f"workload {workload.name} ran past --timeout ({timeout_s:g} s) in "
                          f"phase {result.phase} and was killed (its output: {output})")
    if trouble:
        raise RecordError(f"{trouble}, and workload {workload.name} exited {result.status} in "
                          f"phase {result.phase}; give --workdir on a filesystem with room "
                          f"(its output: {output})")
    if not result.ok:
        why = failure_line(result.phase, result.stderr or result.stdout)
        raise RecordError(f"workload {workload.name} exited {result.status} in phase "
                          f"{result.phase}: {why} (its output: {output})")
    name = " ".join([workload.name, *workload_args])
    return Recording(log_path, base, fs, workload=name,
                     console_logs=(run_dir / "console.log", output),
                     notes=(f"recorded in the guest ({machine.accel}); workload took "
                            f"{result.seconds:.1f} s; ended by a power cut",))


def guest_recorder(args: argparse.Namespace, workload: Path, workload_args: list[str]) -> Recorder:
    """A Recorder for the crash-loop command's options."""
    fs = None if args.fs == "none" else args.fs
    image_size = parse_size(args.image_size or default_image_size(fs))
    sector_size = args.sector_size
    if sector_size not in SECTOR_SIZES:
        raise UsageError(f"--sector-size {sector_size}: one of {SECTOR_SIZES}")
    if image_size % sector_size:
        raise UsageError(f"--image-size {image_size}: not a whole number of "
                         f"{sector_size}-byte sectors")
    require_mkfs_room(fs, image_size, args.mkfs_opts,
                      f"--image-size {args.image_size or default_image_size(fs)}")
    size = MachineSize.from_args(args)
    # Found (or built) now, so that a kernel that is not one is refused before a disk is made.
    guest = _guest(args.kernel, getattr(args, "modules", None))

    def record(workdir: Path) -> Recording:
        return asyncio.run(record_in_guest(
            workdir, workload, workload_args, fs=fs, mkfs_opts=args.mkfs_opts,
            image_size=image_size, guest=guest, timeout_s=args.timeout,
            sector_size=sector_size, size=size))
    return record


async def check_in_guest(image: Path, script: Path, *, fs: str | None, timeout_s: float,
                         env: Mapping[str, str], guest: object | None = None,
                         kernel: Path | None = None, modules: Path | None = None,
                         saved: SavedGuest | None = None) -> tuple[int, str]:
    """Boot the guest on `image` (a disposable copy), mount it, run `script`; (status, output).
    A mount that fails is the checker's failure (status of the set-up phase). With `saved`,
    the guest is restored from the loop's saved one when there is one (the first check saves
    it): the same check, seconds sooner."""
    guest = guest or _guest(kernel, modules)
    run_dir = Path(tempfile.mkdtemp(prefix="lw-chk-"))
    try:
        async with _check_machine(guest, run_dir, image, saved) as (machine, restored):
            result = await machine.run(script, fs=fs, mkfs=False, dev="/dev/vda",
                                       timeout_s=timeout_s,
                                       env={**env, **(NEW_DISK_ENV if restored else {})})
            assert result is not None
            await machine.power_cut()
        output = f"[{result.phase}] {result.setup}{result.stdout}{result.stderr}"
        return result.status, output
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def _check_machine(guest: object, run_dir: Path, image: Path, saved: SavedGuest | None
                         ) -> AsyncIterator[tuple[Machine, bool]]:
    """A guest on `image`, ready for a job, and whether it was restored from `saved`."""
    from qmp.machine import Machine, PlainDisk

    def machine(name: str, state: Path | None = None) -> Machine:
        return Machine(guest, run_dir / name, disks=[PlainDisk(image)],  # type: ignore[arg-type]
                       name="check", incoming=state)

    if saved is not None and (state := saved.state_for(image)) is not None:
        restored = machine("restored", state)
        try:
            await restored.start()
        except MachineError as err:
            await restored.close()
            saved.failed(f"restoring the saved guest: {err}")
        else:
            saved.count_restored()
            try:
                yield restored, True
            finally:
                await restored.close()
            return
    booted = machine("booted")
    try:
        await booted.start()
        if saved is not None and saved.claim(image):
            try:
                await saved.save(booted, image)
            except (MachineError, OSError):
                # Saving left the guest in no known state: this check boots another.
                await booted.close()
                booted = machine("booted-again")
                await booted.start()
        yield booted, False
    finally:
        await booted.close()


class GuestCheckRunner:
    """The `guest:` checkers' (and xfs log recovery's) runner for the loop's options (a
    `GuestRunner`): the guest is found once, and saved by the first check for the others to
    restore. Worker threads call it at once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.fs = None if args.fs == "none" else args.fs
        self.guest = _guest(args.kernel, getattr(args, "modules", None))
        self.saved = (SavedGuest(self.fs, getattr(args, "workdir", None))
                      if saved_guest_enabled() else None)
        self.checks = 0
        self._lock = threading.Lock()

    def __call__(self, image: Path, script: Path, timeout_s: float,
                 env: Mapping[str, str]) -> tuple[int, str]:
        with self._lock:
            self.checks += 1
        return asyncio.run(check_in_guest(image, script, fs=self.fs, timeout_s=timeout_s,
                                          env=env, guest=self.guest, saved=self.saved))

    def figures(self) -> tuple[int, int]:
        """(checks run in a guest, of them in one restored from the saved guest)."""
        return self.checks, self.saved.restored if self.saved is not None else 0


__all__ = ["GuestCheckRunner", "RecordError", "check_in_guest", "guest_recorder",
           "record_in_guest", "workload_script"]
