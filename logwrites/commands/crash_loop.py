"""`logwrites crash-loop`: record a workload, then build and check each of its crash states.

It reports on the terminal (a table), as --json, --junit, and --out DIR with HTML. Exit 0 all
passed, 1 a state failed, 2 bad input (or a state that could not be checked, or no state at
all). The loop itself is `logwrites.crashloop_job`'s, which the Python API runs too.

With `--log LOG --base IMAGE` the recording step is skipped and an existing log is used (any
dm-log-writes log: ours, the kernel target's, QEMU blklogwrites'); the options that only shape
a recording (--workload, --image-size, --cpus, ...) are refused then.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from logwrites.check import FILESYSTEMS, TIMEOUT_LIMIT
from logwrites.crashloop_job import CLI_SPELLING, LoopRequest, NothingChecked, run_job
from logwrites.crashstates import DEFAULT_MAX_STATES, KINDS
from logwrites.format import SECTOR_SIZES
from logwrites.loop import LoopResult, ProgressCallback
from logwrites.report import error_lines, failure_lines, json_lines, table_rows
from qmp.machinesize import add_machine_arguments


def add_loop_arguments(p: argparse.ArgumentParser) -> None:
    """The options crash-loop and demo share."""
    p.add_argument("--fs", default="ext4", choices=(*FILESYSTEMS, "none"),
                   help="filesystem made before the workload (default ext4; none: raw disk)")
    p.add_argument("--mkfs-opts", default=None,
                   help="options for mkfs.FS, split at whitespace (no quotes: the guest "
                        "passes them on as they are)")
    p.add_argument("--workload", default=None,
                   help="a built-in workload name (guests/workloads/) or a script path, with "
                        "arguments if any, e.g. 'txnlog --no-barrier' (default: fs-default, or "
                        "txnlog with --fs none)")
    p.add_argument("--check", action="append", default=None, metavar="fsck|host:CMD|guest:PATH",
                   help="a checker (repeatable); default: fsck, plus the workload's host "
                        "checker from guests/checkers/ if it has one")
    p.add_argument("--states", default="prefix,reorder",
                   help=f"crash-state kinds, comma separated ({','.join(KINDS)})")
    p.add_argument("--max-states", type=int, default=DEFAULT_MAX_STATES,
                   help="reordered (and torn) states per flush epoch: exhaustive below, "
                        f"sampled above (default {DEFAULT_MAX_STATES})")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled states")
    p.add_argument("--atomic-unit", default=None, metavar="BYTES",
                   help="the device's atomic write unit: torn writes tear only at its "
                        "boundaries, and a write within one unit is never torn (e.g. 4K; "
                        "default: one sector of the log)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="states built and checked at once (default: cores)")
    p.add_argument("--from-start", action="store_true",
                   help="also states before the mark mkfs (inside mkfs)")
    p.add_argument("--start-mark", default=None, help="states start at this mark")
    p.add_argument("--no-shrink", action="store_true", help="do not shrink failing states")
    p.add_argument("--kernel", type=Path, default=None, help="your bzImage for the guest")
    p.add_argument("--modules", type=Path, default=None, help="its modules directory")
    p.add_argument("--image-size", default=None,
                   help="size of the disk under test (default 128M; 320M for xfs, whose mkfs "
                        "wants 300 MiB)")
    p.add_argument("--sector-size", type=int, choices=SECTOR_SIZES, default=512,
                   help="logical sector size of the disk under test, and so the log's unit")
    add_machine_arguments(p)  # the recording guest's; checks boot the default size
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds per checker run, and for the recorded workload (default 300; "
                        f"{TIMEOUT_LIMIT})")
    p.add_argument("--log", type=Path, default=None,
                   help="use this recorded log instead of recording (needs --base)")
    p.add_argument("--base", type=Path, default=None, help="the image the --log starts from")
    p.add_argument("--out", type=Path, default=None,
                   help="report directory: index.html, console logs, failing images")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout, nothing else")
    p.add_argument("--junit", type=Path, default=None, help="write JUnit XML here")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch directory (default: a temporary one)")
    p.add_argument("--keep-recording", action="store_true",
                   help="keep the recording when every state passed (without --out it is "
                        "removed then; it is always kept when a state fails)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crash-loop", help="record, enumerate crash states, replay, check, report",
                       description=__doc__.splitlines()[0])
    add_loop_arguments(p)
    p.set_defaults(run=run)


def loop_request(args: argparse.Namespace) -> LoopRequest:
    """The crash loop the options ask for, as the CLI spells them."""
    return LoopRequest(
        spelling=CLI_SPELLING, fs=args.fs, workload=args.workload,
        checks=tuple(args.check) if args.check is not None else None,
        kinds=tuple(k.strip() for k in args.states.split(",") if k.strip()),
        max_states=args.max_states, seed=args.seed, jobs=args.jobs,
        atomic_unit=args.atomic_unit, from_start=args.from_start, start_mark=args.start_mark,
        shrink=not args.no_shrink, log=args.log, base=args.base, mkfs_opts=args.mkfs_opts,
        image_size=args.image_size, sector_size=args.sector_size, memory=args.memory,
        cpus=args.cpus, queues=args.queues, kernel=args.kernel, modules=args.modules,
        timeout=args.timeout, out=args.out, junit=args.junit, workdir=args.workdir,
        keep_recording=args.keep_recording, command=our_command())


def our_command() -> str:
    """How the user calls us, for repro lines: the installed script next to this Python."""
    script = Path(sys.executable).parent / "logwrites"
    return str(script) if script.exists() else "logwrites"


def print_table(console: Console, result: LoopResult) -> None:
    table = Table(title=f"crash states of {result.recording.workload} "
                        f"({len(result.logmap.entries)} log entries)")
    for col in ("kind", "pass", "fail", "error", "total"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for row in table_rows(result):
        table.add_row(*(str(x) for x in row))
    console.print(table)


@contextlib.contextmanager
def state_progress(console: Console, *, transient: bool) -> Iterator[ProgressCallback]:
    """A progress bar for the loop's `on_progress`, drawn from its first call: the loop calls
    it once the log is read and its states are known, so an unreadable log, a mark it lacks
    and the like stay one line on the terminal, without a bar above it. An error raised once
    the bar is drawn (a full disk, a stop) takes the bar away too: its line stands alone. A
    transient bar on a file (--json, stderr not a terminal) is never drawn: there it would
    leave only an empty line."""
    progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=console, transient=transient)
    task = progress.add_task("crash states", total=None)

    shown = console.is_terminal or not transient

    def on_progress(done: int, total: int, _result: object) -> None:
        if shown and not progress.live.is_started:
            progress.start()
        progress.update(task, completed=done, total=total)

    try:
        yield on_progress
    except BaseException:
        if progress.live.is_started:
            # Stopped as a transient one, the bar is erased (on a file: never written). Not
            # Progress.stop(), which ends a file's bar with an empty line above the error.
            progress.live.transient = True
            progress.live.stop()
        raise
    if progress.live.is_started:
        progress.stop()


@dataclass(frozen=True, slots=True)
class TerminalView:
    """The loop on the terminal (stderr): the recording's whereabouts and a progress bar."""

    err: Console
    transient: bool  # the bar goes when the loop ends (--json: stdout alone is the output)

    def recording_starts(self, workload: Path, where: Path) -> None:
        self.say(f"recording {workload.name} in the guest into {where} ...")

    def states(self) -> AbstractContextManager[ProgressCallback | None]:
        return state_progress(self.err, transient=self.transient)

    def recording_settled(self, where: Path, kept: bool) -> None:
        self.say(f"recording kept in {where}" if kept else
                 "every state passed: recording removed (--keep-recording keeps it)")

    def say(self, line: str) -> None:
        self.err.print(line, markup=False, highlight=False)


def run(args: argparse.Namespace) -> int:
    """:raise NothingChecked: after the reports, when the loop found no state to check."""
    console = Console()
    view = TerminalView(Console(stderr=True), transient=args.json)
    result, page = run_job(loop_request(args), view)
    if args.json:
        for line in json_lines(result):
            print(line)
    else:
        print_table(console, result)
        for line in (*failure_lines(result), *error_lines(result)):
            console.print(line, markup=False, highlight=False)
        console.print(summary_line(result), markup=False, highlight=False)
        if page:
            console.print(f"report: {page}", markup=False, highlight=False)
    if not result.results:
        raise NothingChecked(result)
    return result.exit_status


def summary_line(result: LoopResult) -> str:
    """The closing line for people: how many states, how fast, and how many verdicts were
    reused rather than checked."""
    line = (f"{len(result.results)} states in {result.seconds:.1f} s "
            f"({60 * len(result.results) / max(result.seconds, 1e-9):.0f} per minute, "
            f"{result.jobs} jobs)")
    # Said plainly, so nobody mistakes a reused answer for a run of the checker. Only
    # e2fsck's reads are recorded: on other filesystems that reuse is not offered at all.
    reused = [f"{result.deduplicated} of identical images"] if result.deduplicated else []
    if result.readset_reused:
        reused.append(f"{result.readset_reused} where no byte e2fsck read had changed")
    line += "; verdicts reused: " + ", ".join(reused) if reused else ""
    if result.guest_checks:
        # Where a slow loop's time went: each of these is a QEMU of its own.
        line += (f"; {result.guest_checks} checks in a guest, {result.guest_restored} of them "
                 "restored from a saved one")
    return line

