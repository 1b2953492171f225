"""A standard output that cannot be written: named as such (a bare "No space left on device"
read as if the log had filled up), one line, exit 2; a reader that went away (`| head -1`) ends
us quietly, with exit 0 and no "Exception ignored" from Python's exit. For every command: the
handling is in `logwrites.cli`, around all of them."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from logwrites.cli import main

# Thousands of entries: the listing fills any pipe buffer, so writes fail mid-stream; the small
# log's output sits in Python's buffer until the flush at the end.
MANY = [("w", i % 64, 1, 0x11) for i in range(3000)] + [("f",)]
FEW = [("w", 0, 1, 0x11), ("f",)]
ENOSPC = "logwrites: writing to standard output: No space left on device\n"


def logwrites(*argv: str, stdout: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "logwrites.cli", *argv], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60, check=False)


@pytest.mark.parametrize("ops", [FEW, MANY], ids=["buffered", "streaming"])
@pytest.mark.parametrize("argv", [["inspect", "{log}"], ["inspect", "--json", "{log}"],
                                  ["replay", "--find", "--limit", "1", "{log}"],
                                  ["replay", "{log}", "{img}"], ["replay", "--help"], ["--help"]])
def test_a_full_stdout_is_named(make_log, tmp_path: Path, ops: list[tuple],
                                argv: list[str]) -> None:
    names = {"log": make_log(ops), "img": tmp_path / "t.img"}
    with open("/dev/full", "w") as full:
        done = logwrites(*(a.format(**names) for a in argv), stdout=full)
    assert (done.returncode, done.stderr) == (2, ENOSPC)


@pytest.mark.parametrize("argv", [["inspect", "{log}"], ["inspect", "--json", "{log}"],
                                  ["--help"]])
def test_a_reader_that_goes_away_ends_us_quietly(make_log, argv: list[str]) -> None:
    log = make_log(MANY)
    with subprocess.Popen([sys.executable, "-m", "logwrites.cli",
                           *(a.format(log=log) for a in argv)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline()
        proc.stdout.close()                 # as `head -1` does
        err = proc.stderr.read()
        assert (proc.wait(timeout=60), err) == (0, "")


def test_a_closed_stdout_is_named(make_log) -> None:
    # Python starts with sys.stdout None when fd 1 is closed; print() then drops everything.
    done = subprocess.run([sys.executable, "-m", "logwrites.cli", "inspect",
                           str(make_log(FEW))], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=60, check=False,
                          preexec_fn=lambda: os.close(1))
    assert (done.returncode, done.stderr) == (
        2, "logwrites: writing to standard output: Bad file descriptor\n")


class FailingStdout:
    """A terminal whose device went away: every write says EIO."""

    def write(self, text: str) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def flush(self) -> None:
        pass


def test_an_io_error_on_stdout_is_named(make_log, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    log = make_log(FEW)
    capsys.readouterr()
    failing = FailingStdout()
    monkeypatch.setattr(sys, "stdout", failing)
    assert main(["inspect", "--json", str(log)]) == 2
    assert sys.stdout is failing            # put back for the next caller in this process
    assert capsys.readouterr().err == \
        "logwrites: writing to standard output: Input/output error\n"
