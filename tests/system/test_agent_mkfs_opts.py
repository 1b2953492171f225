"""`--mkfs-opts` reach mkfs in the guest as given: the agent split them with the shell's
globbing on, so `-L *` gave mkfs the names of the files in the agent's working directory (the
guest's /: bin dev etc ...), which it refused as extra arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from logwrites.check import tool_path


@pytest.mark.slow
def test_a_wildcard_in_mkfs_options_is_no_pattern(default_guest, tmp_path: Path) -> None:
    workload = tmp_path / "label.sh"
    workload.write_text("#!/bin/sh\nsync\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "logwrites.cli", "run", "--workload",
                           str(workload), "--fs", "ext4", "--mkfs-opts", "-L *", "--size", "64M",
                           "--backend", "qemu-storage-daemon", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    label = subprocess.run(["e2label", str(out / "disk.img")], capture_output=True, text=True,
                           env={"PATH": tool_path()}, timeout=60, check=True).stdout
    assert label == "*\n"
