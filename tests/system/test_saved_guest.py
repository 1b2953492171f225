"""Guest checks restored from a saved guest (qmp/savedguest.py) see the image they were given.

The first check boots and saves its guest; later checks of images of the same size restore it
with the image swapped under it. Each check here reads back what only its own image holds: a
file's text through a mount, and the image's first sector through the disk itself (the first
image's was read there by the kernel that was saved: its partition scan). An image of another
size boots. A saved state that cannot be restored sends every later check to boot, with the
same answers.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
from pathlib import Path

import pytest

from logwrites.guestrecord import GuestCheckRunner

CHECKER = """#!/bin/sh
cat "$LW_MNT/who"
echo "head $(head -c 512 "$LW_DEV" | md5sum | cut -d' ' -f1)"
"""


def ext4_image(path: Path, who: str, size: str) -> Path:
    """An ext4 image of `size` whose file /who holds `who` (mke2fs -d: no mount, no root),
    and its first sector (which ext4 leaves alone, and a mount does not write) too."""
    content = path.with_suffix(".d")
    content.mkdir()
    (content / "who").write_text(f"this is {who}\n")
    subprocess.run(["truncate", "-s", size, str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(path)], check=True)
    with path.open("r+b") as f:
        f.write(f"first sector of {who}\n".encode().ljust(512, b"\0"))
    return path


def head_md5(image: Path) -> str:
    with image.open("rb") as f:
        return hashlib.md5(f.read(512)).hexdigest()


def check(runner, image: Path, script: Path) -> str:
    status, output = runner(image, script, 120.0, {})
    assert status == 0, output
    return output


@pytest.mark.slow
def test_restored_checks_read_their_own_image(default_guest, tmp_path: Path) -> None:
    script = tmp_path / "who.sh"
    script.write_text(CHECKER)
    a, b = ext4_image(tmp_path / "a.img", "A", "64M"), ext4_image(tmp_path / "b.img", "B", "64M")
    other = ext4_image(tmp_path / "c.img", "C", "96M")
    runner = GuestCheckRunner(argparse.Namespace(fs="ext4", kernel=None, modules=None,
                                                 workdir=tmp_path))
    saved = runner.saved
    assert saved is not None
    for image, who, restored in ((a, "A", 0), (b, "B", 1), (a, "A", 2), (other, "C", 2),
                                 (b, "B", 3)):
        output = check(runner, image, script)
        assert f"this is {who}" in output and f"head {head_md5(image)}" in output, output
        assert saved.restored == restored, (who, output)
    saved.close()
    assert not list(tmp_path.glob("lw-saved-guest-*"))


@pytest.mark.slow
def test_a_saved_guest_that_cannot_be_restored_boots_every_later_check(
        default_guest, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    script = tmp_path / "who.sh"
    script.write_text(CHECKER)
    a, b = ext4_image(tmp_path / "a.img", "A", "64M"), ext4_image(tmp_path / "b.img", "B", "64M")
    runner = GuestCheckRunner(argparse.Namespace(fs="ext4", kernel=None, modules=None,
                                                 workdir=tmp_path))
    assert "this is A" in check(runner, a, script)
    [state] = tmp_path.glob("lw-saved-guest-*/guest-*.state")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])   # cut short
    for image, who in ((b, "B"), (a, "A")):
        output = check(runner, image, script)
        assert f"this is {who}" in output and f"head {head_md5(image)}" in output, output
    assert runner.saved.restored == 0
    warnings = [r.getMessage() for r in caplog.records if "restoring the saved guest" in
                r.getMessage()]
    assert len(warnings) == 1 and "boots the guest instead" in warnings[0], warnings


@pytest.mark.slow
def test_a_guest_that_cannot_be_saved_boots_every_check(
        default_guest, small_fs, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    # The saved state (hundreds of MiB) does not fit where the loop keeps its scratch files:
    # the first check's answer stands all the same, and nothing of the attempt stays.
    script = tmp_path / "who.sh"
    script.write_text(CHECKER)
    a, b = ext4_image(tmp_path / "a.img", "A", "64M"), ext4_image(tmp_path / "b.img", "B", "64M")
    scratch = small_fs("scratch", "8M")
    runner = GuestCheckRunner(argparse.Namespace(fs="ext4", kernel=None, modules=None,
                                                 workdir=scratch))
    for image, who in ((a, "A"), (b, "B")):
        output = check(runner, image, script)
        assert f"this is {who}" in output and f"head {head_md5(image)}" in output, output
    assert runner.saved.restored == 0
    assert [p for p in scratch.rglob("*") if p.is_file()] == []
    warnings = [r.getMessage() for r in caplog.records if "saving the guest" in r.getMessage()]
    assert len(warnings) == 1 and "boots the guest instead" in warnings[0], warnings
