"""The tree stays ruff clean (STYLE.md §12): CI fails on a lint error like on a failing test."""

import subprocess
import sys

from tests.conftest import PROJECT


def test_ruff_finds_nothing() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(PROJECT)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
