"""Crash-state images as qcow2 overlays, and the backend side of whole-VM snapshots.

A crash state is the base image plus part of the log; a loop builds each one in a qcow2
overlay on the raw base image (`qemu-img create -f qcow2 -b BASE -F raw`), so no state costs a
copy of the whole disk and the base stays pristine. Whole-VM snapshots pause the guest and save
its machine state through QMP (`Machine.save_state`); `clone_image` is the image half of the
backend's checkpoint (a reflink copy where the filesystem has them). `save_vm_snapshot` does the
whole thing on our backend: machine state, image clone, log position and (given the log) copies
of the log and its pending journal. Pausing the guest stops the vhost-user device, and our
backend logs its unflushed records then as a volatile tail (as at any stop of the device), so
at the checkpoint nothing is unflushed; the checkpoint verifies it, because records held only
in the backend's memory would be lost to every restore. A restore starts QEMU with
`Machine(..., incoming=snap.state)` on a backend started on `restore_files(snap, dir)` with
`snap.resume_args` (`--resume`): its log continues the saved one from the snapshot point.
Without the log copy, start the backend on `clone_image(snap.image, ...)` with a new log,
which replays onto `snap.image`.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qmp.errors import MachineError

if TYPE_CHECKING:
    from qmp.backend import ControlClient
    from qmp.machine import Machine

log = logging.getLogger(__name__)


def _qemu_img(*args: str) -> str:
    if shutil.which("qemu-img") is None:
        raise MachineError("qemu-img is not installed: run ./run.sh setup "
                           "(apt-get install qemu-utils)")
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MachineError(f"qemu-img {args[0]}: {done.stderr.strip()}")
    return done.stdout


def create_overlay(base: Path, overlay: Path, base_format: str = "raw") -> Path:
    """A qcow2 overlay at `overlay` whose reads fall through to `base` (never written).

    :raise MachineError: qemu-img is missing or refused.
    """
    overlay.parent.mkdir(parents=True, exist_ok=True)
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base.resolve()), "-F", base_format,
              str(overlay))
    return overlay


def overlay_backing(overlay: Path) -> Path:
    """The backing file an overlay reads through to."""
    info = _qemu_img("info", "--output=json", str(overlay))
    return Path(json.loads(info)["backing-filename"])


def clone_image(image: Path, dest: Path) -> Path:
    """A copy of `image` at `dest`: a reflink (instant, shares blocks) where the filesystem can,
    else a sparse copy."""
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(image), str(dest)],
                   check=True)
    return dest


@dataclass(frozen=True, slots=True)
class VmSnapshot:
    """A whole-VM snapshot on our backend: QEMU's saved `state`, the backend's `image` at that
    instant (a clone), how far its log was then (`log_entries` entries, `log_bytes`), and, when
    asked, a copy of its `log` (with its pending journal, if it keeps one)."""

    state: Path
    image: Path
    log_entries: int
    log_bytes: int
    log: Path | None = None

    @property
    def resume_args(self) -> tuple[str, ...]:
        """`logwrites serve` options for a backend restored from `restore_files`."""
        if self.log is None:
            return ()
        return ("--resume", "--pending-journal") if _journal(self.log).is_file() else (
            "--resume",)


def _journal(log: Path) -> Path:
    return log.with_name(log.name + ".pending")  # `logwrites serve --pending-journal`'s name


async def save_vm_snapshot(machine: Machine, control: ControlClient, image: Path,
                           dest: Path, log: Path | None = None) -> VmSnapshot:
    """Pause `machine`, save its state to `dest/state.bin` and checkpoint the backend behind
    `control`: its image cloned to `dest/image.img`, its log position, and — when `log` (the
    backend's log file) is given — a copy of the log (and of its pending journal, if the
    backend keeps one) in `dest/log`. The guest stays paused: `cont()` or cut it.

    :raise MachineError: QEMU could not save the state, or the paused backend still holds
        completed writes no FLUSH has logged and keeps no journal of them.
    """
    dest.mkdir(parents=True, exist_ok=True)
    state, clone = dest / "state.bin", dest / "image.img"
    journaled = log is not None and _journal(log).is_file()
    taken: dict[str, int] = {}
    copied = dest / "log" if log is not None else None

    async def quiet() -> dict[str, int]:
        status = await control.status()
        if status.get("unflushed") and not journaled:
            raise MachineError(
                f"the backend holds {status['unflushed']} completed writes no FLUSH has logged: "
                "a restored backend would never log them (a backend that does not log its "
                "volatile tail when the device stops?); run it with --pending-journal and "
                "pass its log")
        return status

    async def checkpoint() -> None:
        status = await quiet()  # paused: the device is stopped, nothing can change now
        taken.update(entries=int(status["entries"]), log_bytes=int(status["log_bytes"]))
        clone_image(image, clone)
        if log is not None and copied is not None:
            clone_image(log, copied)
            if journaled:
                clone_image(_journal(log), _journal(copied))

    await machine.save_state(state, checkpoint=checkpoint)
    return VmSnapshot(state=state, image=clone, log_entries=taken["entries"],
                      log_bytes=taken["log_bytes"], log=copied)


def restore_files(snap: VmSnapshot, dest: Path) -> tuple[Path, Path | None]:
    """Copies of the snapshot's image (and log with its journal, if it has them) in `dest`, for
    one restore: a backend started on them with `snap.resume_args` continues the saved one."""
    dest.mkdir(parents=True, exist_ok=True)
    image = clone_image(snap.image, dest / "image.img")
    if snap.log is None:
        return image, None
    log = clone_image(snap.log, dest / "log")
    if _journal(snap.log).is_file():
        clone_image(_journal(snap.log), _journal(log))
    return image, log
