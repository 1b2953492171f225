"""Crash-state images as qcow2 overlays, and the backend side of whole-VM snapshots.

A crash state is the base image plus part of the log; a loop builds each one in a qcow2
overlay on the raw base image (`qemu-img create -f qcow2 -b BASE -F raw`), so no state costs a
copy of the whole disk and the base stays pristine. Whole-VM snapshots pause the guest and save
its machine state through QMP (`Machine.save_state`); `clone_image` is the image half of the
backend's checkpoint (a reflink copy where the filesystem has them).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

from qmp.errors import MachineError

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
