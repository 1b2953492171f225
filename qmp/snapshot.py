"""Crash-state images as qcow2 overlays, and the backend side of whole-VM snapshots.

A crash state is the base image plus part of the log; a loop builds each one in a qcow2
overlay on the raw base image (`qemu-img create -f qcow2 -b BASE -F raw`), so no state costs a
copy of the whole disk and the base stays pristine. Whole-VM snapshots pause the guest and save
its machine state through QMP (`Machine.save_state`); `clone_image` is the image half of the
backend's checkpoint (a reflink copy where the filesystem has them). `save_vm_snapshot` does the
whole thing on our backend: machine state, image clone and log position, refusing a moment
with completed but unflushed writes (the backend holds those in memory only: a restored backend
would never log them). Restore with `Machine(..., incoming=snap.state)` on a backend started on
`clone_image(snap.image, ...)` with a new log: that log holds what happened after the snapshot
and replays onto `snap.image`.
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
    instant (a clone), and how far its log was then (`log_entries` entries, `log_bytes`)."""

    state: Path
    image: Path
    log_entries: int
    log_bytes: int


async def save_vm_snapshot(machine: Machine, control: ControlClient, image: Path,
                           dest: Path) -> VmSnapshot:
    """Pause `machine`, save its state to `dest/state.bin` and checkpoint the backend behind
    `control` (its image cloned to `dest/image.img`, its log position). The guest stays paused.

    :raise MachineError: QEMU could not save the state, or the backend holds completed writes
        no FLUSH has logged yet (flush in the guest first: fsync the disk, or sync with a
        filesystem mounted).
    """
    dest.mkdir(parents=True, exist_ok=True)
    state, clone = dest / "state.bin", dest / "image.img"
    taken: dict[str, int] = {}

    async def flushed() -> dict[str, int]:
        status = await control.status()
        if status.get("unflushed"):
            raise MachineError(
                f"the backend holds {status['unflushed']} completed writes no FLUSH has logged: "
                "a restored backend would never log them; flush in the guest before the "
                "snapshot (fsync the disk, or sync with a filesystem mounted)")
        return status

    await flushed()  # refuse before pausing and saving anything, in the common case

    async def checkpoint() -> None:
        status = await flushed()  # the guest may have written since: now it cannot
        taken.update(entries=int(status["entries"]), log_bytes=int(status["log_bytes"]))
        clone_image(image, clone)

    await machine.save_state(state, checkpoint=checkpoint)
    return VmSnapshot(state=state, image=clone, log_entries=taken["entries"],
                      log_bytes=taken["log_bytes"])
