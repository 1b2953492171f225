"""`logwrites crash-loop`: record a workload, then build and check each of its crash states.

It reports on the terminal (a table), as --json, --junit, and --out DIR with HTML. Exit 0 all
passed, 1 a state failed, 2 bad input (or a state that could not be checked).

With `--log LOG --base IMAGE` the recording step is skipped and an existing log is used (any
dm-log-writes log: ours, the kernel target's, QEMU blklogwrites'); the options that only shape
a recording (--workload, --image-size, --cpus, ...) are refused then.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

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

from logwrites.check import (
    FILESYSTEMS,
    TIMEOUT_LIMIT,
    Checker,
    needs_guest,
    parse_checker,
    require_timeout,
    require_tools,
)
from logwrites.crashstates import DEFAULT_MAX_STATES, KINDS
from logwrites.errors import NoRoom, UsageError
from logwrites.format import SECTOR_SIZES
from logwrites.loop import (
    LoopOptions,
    LoopResult,
    ProgressCallback,
    Recorder,
    existing_recording,
    run_loop,
)
from logwrites.recordingdir import RecordingDir, make_workdir
from logwrites.report import (
    REPORT_FILES,
    error_lines,
    failure_lines,
    json_lines,
    junit_xml,
    table_rows,
    write_html_report,
)
from qmp.machinesize import DEFAULT_MEMORY_MIB, add_machine_arguments

if TYPE_CHECKING:
    from logwrites.guestrecord import GuestCheckRunner  # boots guests: imported when asked

GUESTS_DIR = Path(__file__).resolve().parents[2] / "guests"
WORKLOADS_DIR = GUESTS_DIR / "workloads"
CHECKERS_DIR = GUESTS_DIR / "checkers"
# The options only a recording uses, each with its value when not given.
RECORDING_ONLY: Final = (("workload", None), ("mkfs_opts", None), ("image_size", None),
                         ("sector_size", 512), ("memory", DEFAULT_MEMORY_MIB), ("cpus", 1),
                         ("queues", 1))


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


def resolve_workload(spec: str | None, fs: str) -> tuple[Path, list[str]]:
    """(script path, arguments) of `--workload`.

    :raise UsageError: for a name that is neither a built-in workload nor a file, or a spec
        that names none or does not split as a shell would split it.
    """
    words = (workload_words(spec) if spec is not None
             else ["txnlog" if fs == "none" else "fs-default"])
    name, args = words[0], words[1:]
    builtin = WORKLOADS_DIR / name
    if "/" not in name and builtin.is_file():
        return builtin, args
    path = Path(name)
    if path.is_file():
        return path.resolve(), args
    known = ", ".join(sorted(p.name for p in WORKLOADS_DIR.iterdir()))
    raise UsageError(f"workload {name!r} is neither a file nor a built-in one ({known})")


def workload_words(spec: str) -> list[str]:
    """`--workload`'s name and arguments, split as a shell splits them.

    :raise UsageError: an unbalanced quote, or no name at all ('' is not the default).
    """
    try:
        words = shlex.split(spec)
    except ValueError as err:  # "No closing quotation", "No escaped character"
        raise UsageError(f"--workload {spec!r}: {err}") from None
    if not words:
        raise UsageError(f"--workload {spec!r}: names no workload")
    return words


def default_checks(fs: str, workload: Path | None) -> list[str]:
    checks = [] if fs == "none" else ["fsck"]
    if workload is not None and workload.parent == WORKLOADS_DIR:
        own = CHECKERS_DIR / workload.name
        if own.is_file() and (workload.name != "fs-default" or fs == "ext4"):
            checks.append(f"host:{shlex.quote(str(own))} {{image}}")
    return checks


def checker_specs(given: Sequence[str] | None, fs: str, workload: Path | None) -> list[str]:
    """The checks to run: those given, or the defaults for `fs` and `workload`.

    :raise UsageError: when that leaves none (raw disk, a workload without a checker of its
        own), before anything is recorded.
    """
    specs = list(given) if given is not None else default_checks(fs, workload)
    if not specs:
        raise UsageError("no checker: give at least one --check (with --fs none and no "
                         "built-in checker for the workload, there is no default)")
    return specs


def build_checkers(args: argparse.Namespace, workload: Path | None
                   ) -> tuple[list[Checker], GuestCheckRunner | None]:
    """The checkers, and the guest runner they share when any boots a guest."""
    specs = checker_specs(args.check, args.fs, workload)
    fs = None if args.fs == "none" else args.fs
    require_tools(fs if "fsck" in specs else None)
    runner: GuestCheckRunner | None = None
    if needs_guest(specs, fs):
        from logwrites.guestrecord import GuestCheckRunner  # boots guests: only when asked

        runner = GuestCheckRunner(args)
    return ([parse_checker(s, fs=fs, guest_runner=runner, timeout_s=args.timeout)
             for s in specs], runner)


def refuse_recording_options(args: argparse.Namespace) -> None:
    """With --log nothing is recorded: the options that shape a recording are refused, not
    ignored, so that no one believes a log made elsewhere was recorded as they asked.

    :raise UsageError: naming every such option given.
    """
    given = [f"--{name.replace('_', '-')}" for name, unset in RECORDING_ONLY
             if getattr(args, name) != unset]
    if given:
        raise UsageError(f"{', '.join(given)}: only for a recording, and with --log nothing "
                         f"is recorded")


def refuse_report_paths(out: Path | None, junit: Path | None,
                        inputs: dict[str, Path | None]) -> None:
    """--out and --junit are written once every state is checked: a path that could not be
    written then, or would replace an input (`inputs`: option -> path, e.g. the --log), is
    refused before anything is recorded or checked.

    :raise UsageError: naming the option and the path.
    """
    if junit is not None:
        refuse_replacing_inputs(f"--junit {junit}:", junit, inputs)
        if junit.is_dir():
            raise UsageError(f"--junit {junit}: is a directory, not a file to write")
        if not junit.parent.is_dir():
            raise UsageError(f"--junit {junit}: no directory {junit.parent} to write it in")
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory")
        start = nearest_existing(out)
        if not start.is_dir():
            raise UsageError(f"--out {out}: {start} is not a directory")
        for name in REPORT_FILES:
            refuse_replacing_inputs(f"--out {out}: its {name}", out / name, inputs)


def refuse_replacing_inputs(what: str, target: Path, inputs: dict[str, Path | None]) -> None:
    """:raise UsageError: starting with `what`: `target` is (a link to) one of `inputs`,
    which writing it would lose."""
    for name, path in inputs.items():
        if path is not None and target.exists() and path.exists() and \
                os.path.samefile(target, path):
            raise UsageError(f"{what} would overwrite {name} {path}")


def refuse_mkfs_opts(opts: str | None, name: str = "--mkfs-opts") -> None:
    """The agent splits mkfs options as the shell splits an unquoted $LW_MKFS_OPTS
    (guests/agent/init): at whitespace, a quote or backslash reaching mkfs as itself, so that
    none of them can group or escape words there. Refused before a guest boots.

    :raise UsageError: options with a quote or a backslash, named as `name`.
    """
    if opts is not None and any(c in opts for c in "'\"\\"):
        raise UsageError(f"{name} {opts!r}: the guest splits it at whitespace and takes quotes "
                         f"and backslashes literally: leave them out")


def nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists (where mkdir -p would start)."""
    return next(p for p in (path, *path.absolute().parents) if p.exists())


def make_recorder(args: argparse.Namespace, workload: Path, workload_args: list[str]) -> Recorder:
    if args.log is not None or args.base is not None:
        if args.log is None or args.base is None:
            raise UsageError("--log and --base go together (the log and the image it starts "
                             "from)")
        refuse_recording_options(args)
        return existing_recording(args.log, args.base, None if args.fs == "none" else args.fs)
    from logwrites.guestrecord import guest_recorder  # QEMU and the guest: only when recording

    return guest_recorder(args, workload, workload_args)


def loop_options(args: argparse.Namespace) -> LoopOptions:
    from logwrites.guestrecord import parse_size  # "4K"; the module boots guests only when asked

    refuse_start_options(args.from_start, args.start_mark)
    kinds = tuple(k.strip() for k in args.states.split(",") if k.strip())
    keep = args.out / "failing" if args.out else None
    unit = parse_size(args.atomic_unit) if args.atomic_unit is not None else None
    return LoopOptions(kinds=kinds, max_states=args.max_states, seed=args.seed, jobs=args.jobs,
                       from_start=args.from_start, start_mark=args.start_mark,
                       shrink=not args.no_shrink, keep_failing=keep, atomic_unit=unit,
                       command=our_command())


def refuse_start_options(from_start: bool, start_mark: str | None,
                         names: tuple[str, str] = ("--from-start", "--start-mark")) -> None:
    """Where the states start is asked once: `names` spell the two options in the message.

    :raise UsageError: an empty mark name, or a mark together with from-start (which would
        win silently, so that a mistyped mark went unnoticed).
    """
    start, mark = names
    if start_mark == "":  # no log has a mark without a name: it is a slip
        raise UsageError(f"{mark} '': give a mark's name")
    if from_start and start_mark is not None:
        raise UsageError(f"{start} and {mark} {start_mark!r}: give one (states start at the "
                         f"log's first entry, or at the mark)")


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
    and the like stay one line on the terminal, without a bar above it."""
    progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=console, transient=transient)
    task = progress.add_task("crash states", total=None)

    def on_progress(done: int, total: int, _result: object) -> None:
        if not progress.live.is_started:
            progress.start()
        progress.update(task, completed=done, total=total)

    try:
        yield on_progress
    finally:
        if progress.live.is_started:
            progress.stop()


def run_crash_loop(args: argparse.Namespace, console: Console) -> tuple[LoopResult, Path | None]:
    # The options that need no guest nor log first: a bad one costs no guest build.
    refuse_report_paths(args.out, args.junit, {"--log": args.log, "--base": args.base})
    require_timeout(args.timeout)
    refuse_mkfs_opts(args.mkfs_opts)
    options = loop_options(args)
    workload, workload_args = (resolve_workload(args.workload, args.fs)
                               if args.log is None else (None, []))
    recorder = make_recorder(args, workload or Path("."), workload_args)
    checkers, runner = build_checkers(args, workload)
    err = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="logwrites-loop-",
                                     dir=make_workdir(args.workdir)) as tmp:
        workdir = Path(tmp)
        home = RecordingDir.for_loop(args.out, args.workdir)
        if args.log is None:
            err.print(f"recording {workload.name} in the guest into {home.path} ...",
                      markup=False, highlight=False)
        with home.dropped_if_stopped(keep=args.keep_recording):
            recording = home.record(recorder)
            with state_progress(err, transient=args.json) as on_progress:
                try:
                    result = run_loop(recording, checkers, options, workdir / "states",
                                      on_progress)
                except NoRoom as full:
                    if args.log is not None:
                        raise
                    raise NoRoom(f"{full}; the recording stays: --log {recording.log} "
                                 f"--base {recording.base_image} checks it again") from full
    if runner is not None:
        result.guest_checks, result.guest_restored = runner.figures()
    # Every repro line names the recording's log and base image: it stays while one is printed.
    if home.scratch and args.log is None:
        kept = home.settle(needed=result.exit_status != 0, keep=args.keep_recording)
        err.print(f"recording kept in {home.path}" if kept else
                  "every state passed: recording removed (--keep-recording keeps it)",
                  markup=False, highlight=False)
    page = write_html_report(result, args.out) if args.out else None
    if args.junit:
        args.junit.write_text(junit_xml(result))
    return result, page


def run(args: argparse.Namespace) -> int:
    console = Console()
    result, page = run_crash_loop(args, console)
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


def json_summary(result: LoopResult) -> dict[str, object]:
    return json.loads(list(json_lines(result))[-1])
