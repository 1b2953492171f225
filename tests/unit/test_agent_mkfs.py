"""The guest agent's mkfs step, run on the host by the guest's shell (busybox sh) with a
stand-in mkfs: `--mkfs-opts` reach mkfs word by word and as given. `-L *` was expanded against
the agent's working directory, so the label became the names of its files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT

AGENT = PROJECT / "guests" / "agent" / "init"
# The guest's /bin/sh is busybox (the agent's #!); dash runs the workloads, and agrees.
SHELLS = [["/bin/busybox", "sh"], ["dash"]]


def agent_function(name: str) -> str:
    """The text of the agent's shell function `name`, from `name() {` to its closing `}`."""
    found = re.search(rf"^{name}\(\) {{\n.*?^}}\n", AGENT.read_text(), re.M | re.S)
    assert found, f"no function {name} in {AGENT}"
    return found.group(0)


@pytest.mark.parametrize("shell", SHELLS, ids=lambda argv: argv[0])
def test_mkfs_options_reach_mkfs_as_given(tmp_path: Path, shell: list[str]) -> None:
    bin_dir, cwd = tmp_path / "bin", tmp_path / "cwd"
    bin_dir.mkdir()
    cwd.mkdir()
    for name in ("a-file", "b-file", "c"):
        (cwd / name).touch()
    mkfs = bin_dir / "mkfs.ext4"
    mkfs.write_text("#!/bin/sh\nprintf 'arg %s\\n' \"$@\"\n")
    mkfs.chmod(0o755)
    script = ("say() { :; }\n" + agent_function("make_fs")
              + f"PATH={bin_dir}:$PATH\n"
              + "LW_FS=ext4 LW_DEV=/dev/vda LW_MKFS_OPTS='-L *  -E ? -O [ab]*'\n"
              + "make_fs || exit $?\n"
              + "echo after *\n")          # the agent's own globbing works again
    done = subprocess.run([*shell, "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=30, check=True)
    assert done.stdout.splitlines() == [
        "arg -F", "arg -L", "arg *", "arg -E", "arg ?", "arg -O", "arg [ab]*", "arg /dev/vda",
        "after a-file b-file c"]
