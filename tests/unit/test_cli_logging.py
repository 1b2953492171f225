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


INTERRUPTED_TASK = """
import asyncio, gc, os, signal, sys, threading, time
from logwrites import cli
cli._configure_logging({verbosity})
signal.signal(signal.SIGTERM, cli._raise_stopped)

async def background():  # busy in Python when the signal comes: it keeps the Stopped
    started = time.monotonic()
    while time.monotonic() - started < 30:
        pass

async def recording():
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    task = asyncio.create_task(background())
    await asyncio.sleep(60)

try:
    asyncio.run(recording())
except cli.Stopped:
    print("logwrites: stopped by SIGTERM", file=sys.stderr)
gc.collect()  # the interrupted task goes, and asyncio reports what it kept
"""


def test_an_interrupted_task_adds_nothing_to_the_stop_line() -> None:
    """A stop whose signal landed in a background task of asyncio (a recording's) was one line
    and then asyncio's "Task exception was never retrieved" with a traceback ending in
    "Stopped: 15" (seen once in CI, in test_crash_loop_stopped)."""
    quiet, verbose = (subprocess.run([sys.executable, "-c",
                                      INTERRUPTED_TASK.format(verbosity=verbosity)],
                                     capture_output=True, text=True, timeout=60, check=True)
                      for verbosity in (0, 1))
    assert quiet.stderr == "logwrites: stopped by SIGTERM\n"
    assert "Task exception was never retrieved" in verbose.stderr   # still there with -v
