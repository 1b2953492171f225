"""The `logwrites` command line: the one place that turns errors into exit statuses.

Each subcommand lives in `logwrites/commands/<name>.py` and offers
`register(subparsers) -> None`, which adds its parser and sets `run` to a function taking the
parsed arguments and returning an exit status (or a coroutine that does; it is run here with
`asyncio.run`). Exit status: 0 success, 1 a check failed, 2 bad input, 3 the guest kernel panicked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib
import inspect
import logging
import os
import pkgutil
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Final, TextIO, TypeAlias

from logwrites import commands
from logwrites.errors import CheckFailed, LogwritesError
from qmp.errors import KernelPanic

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_KERNEL_PANIC = 0, 1, 2, 3


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a CI job's timeout, a closed terminal), raised where Python was, so
    that QEMU, the backend and every scratch file go as they do on Ctrl-C. Python's default
    for both is to die on the spot, leaving them all behind."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# Signals that stop us as Ctrl-C does (by default Python dies of them on the spot).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    # Once: a second SIGTERM (a CI runner repeats it before its SIGKILL) would otherwise cut
    # short the very clean-up the first one started.
    for sig in _STOP_SIGNALS:
        if signal.getsignal(sig) is _raise_stopped:
            signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


_Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _stop_cleanly_on_signals() -> dict[signal.Signals, _Handler]:
    """The handlers replaced, to put back when `main` returns (it is called in-process too)."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers, and only it receives signals
    # Only where the default would kill us: an ignored SIGHUP (nohup) stays ignored, and
    # `serve` installs its own handlers, which end the log cleanly, for as long as it serves.
    return {sig: signal.signal(sig, _raise_stopped) for sig in _STOP_SIGNALS
            if signal.getsignal(sig) is signal.SIG_DFL}


class StdoutError(OSError):
    """Writing our standard output failed. Said as such: a bare "No space left on device"
    reads as if the log or the image had filled up."""

    def __str__(self) -> str:
        return f"writing to standard output: {self.strerror}"


class _NamedStdout:
    """`sys.stdout` while a command runs: a write or flush that fails raises StdoutError, so
    that `main` tells it from the OSErrors of logs, images and sockets (none of which name
    stdout). Everything else is the stream's."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream                # None: fd 1 was closed when Python started

    def write(self, text: str) -> int:
        if self.stream is None:
            raise StdoutError(errno.EBADF, os.strerror(errno.EBADF))
        try:
            return self.stream.write(text)
        except OSError as err:
            raise StdoutError(err.errno, err.strerror) from err

    def flush(self) -> None:
        if self.stream is None:
            return                          # nothing was written, nothing is lost
        try:
            self.stream.flush()
        except OSError as err:
            raise StdoutError(err.errno, err.strerror) from err

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _stdout_failed(err: StdoutError, stream: TextIO | None) -> int:
    """The exit status for a failed stdout, which is pointed at /dev/null: what is still
    buffered would fail again at exit, where Python prints "Exception ignored ..." for it."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())   # type: ignore[union-attr]
        os.close(devnull)
    if err.errno == errno.EPIPE:
        return EXIT_OK                      # a reader such as `head` went away: not our failure
    print(f"logwrites: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT                   # as for every other OSError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2, with no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"logwrites: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


class _TopParser(_Parser):
    """The command is required, but checked after the unknown options: argparse's own check
    comes first, and `logwrites --bogus` would be told a command is missing."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        if parsed.command is None:
            self.error("the following arguments are required: command")
        return parsed


DESCRIPTION: Final = ("dm-log-writes for whole virtual machines: record every write a QEMU "
                      "guest makes, in the dm-log-writes log format and under its worst-case "
                      "cache semantics, replay the log to every crash state and check each.")


def build_parser() -> argparse.ArgumentParser:
    parser = _TopParser(prog="logwrites", description=DESCRIPTION,
                        epilog=f"exit status: {EXIT_OK} success, {EXIT_CHECK_FAILED} a check "
                               f"failed, {EXIT_BAD_INPUT} bad input, {EXIT_KERNEL_PANIC} the "
                               f"guest kernel panicked, 128 + N stopped by signal N")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more diagnostics on stderr (-vv for debug)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(sub)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stderr)
    if verbosity == 0:
        # qemu.qmp logs an ERROR of its own for a connection we cancel (a stopped run) or lose
        # (a power cut); what matters reaches the user as our one-line error.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
        logging.getLogger("asyncio").addFilter(_not_an_interrupt)


def _not_an_interrupt(record: logging.LogRecord) -> bool:
    """False for asyncio's "Task exception was never retrieved" about a Ctrl-C or a Stopped.
    A task running when the signal came keeps the interrupt as its exception and also raises
    it to `asyncio.run`, and so to `main`, which says it in one line; the task's copy was
    logged with a traceback when the task was collected, after that line (a background task
    of a recording, under load in CI)."""
    return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


def describe_error(err: Exception) -> str:
    """One line for the user: an OS error as 'PATH: reason' (not '[Errno N] reason: 'PATH'')."""
    if isinstance(err, OSError) and err.strerror:
        names = [str(n) for n in (err.filename, err.filename2) if n is not None]
        return ": ".join([*names, err.strerror]) if names else err.strerror
    return str(err)


def main(argv: list[str] | None = None) -> int:
    stdout = sys.stdout
    sys.stdout = _NamedStdout(stdout)       # type: ignore[assignment]
    try:
        try:
            return _run_command(argv)
        finally:
            sys.stdout.flush()              # what is still buffered fails here, if it does
    except StdoutError as err:              # --help too: argparse prints, then SystemExit
        return _stdout_failed(err, stdout)
    finally:
        sys.stdout = stdout


def _run_command(argv: list[str] | None) -> int:
    """Parse, run, and map every error but StdoutError (see `main`) to its exit status."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    replaced = _stop_cleanly_on_signals()
    try:
        result = args.run(args)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except CheckFailed as err:
        print(f"logwrites: {err}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except KernelPanic as err:  # distinct: the guest kernel, not logwrites, went wrong
        print(f"logwrites: {err}", file=sys.stderr)
        print(err.console_tail.rstrip(), file=sys.stderr)
        return EXIT_KERNEL_PANIC
    except StdoutError:
        raise
    except (LogwritesError, OSError) as err:
        print(f"logwrites: {describe_error(err)}", file=sys.stderr)
        log.debug("traceback", exc_info=True)
        return EXIT_BAD_INPUT
    except Stopped as stop:
        print(f"logwrites: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("logwrites: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
