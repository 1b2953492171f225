"""What the command line lets through to stderr: qemu.qmp's own ERROR lines (a connection we
cancel or lose) only with -v, our warnings always."""

from __future__ import annotations

import subprocess
import sys

import pytest

EMIT = """
import logging
from logwrites import cli
cli._configure_logging({verbosity})
# qemu.qmp's protocol logger, named after the connection as qemu.qmp names it.
logging.getLogger("qemu.qmp.protocol").getChild("machine-1").error("Task.Reader: EOFError")
logging.getLogger("logwrites.loop").warning("a state could not be built")
"""


@pytest.mark.parametrize(("verbosity", "qmp_shown"), [(0, False), (1, True)])
def test_qemu_qmp_errors_show_only_when_verbose(verbosity: int, qmp_shown: bool) -> None:
    done = subprocess.run([sys.executable, "-c", EMIT.format(verbosity=verbosity)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert ("Task.Reader: EOFError" in done.stderr) is qmp_shown, done.stderr
    assert "a state could not be built" in done.stderr
