"""Shared fixtures. A missing tool fails the fixture with the command that installs it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


def require_tool(name: str, package: str) -> str:
    """The tool's path; a missing tool fails loudly (never skips) naming the fix."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                  else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run ./run.sh setup (apt-get install {package})",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT
