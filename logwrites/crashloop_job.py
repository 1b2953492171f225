"""One crash loop as asked, from refusals to reports: what `logwrites crash-loop` (and demo)
and the Python API's `crash_loop` both run.

Each caller only translates its inputs (argparse options, keyword arguments) into a
`LoopRequest` and presents the result; `run_job` refuses bad values (every one that needs no
guest and no log first, so that a bad value costs no guest build), finds the recorder (an
existing --log/--base, or a recording in the guest) and the checkers, runs the loop in a
`RecordingDir`, settles the recording and writes the HTML and JUnit reports. What the caller
shows while it runs goes through a `LoopView`: the CLI prints, the API stays quiet.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import tempfile
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from logwrites.check import Checker, needs_guest, parse_checker, require_timeout, require_tools
from logwrites.crashstates import DEFAULT_MAX_STATES
from logwrites.errors import LogwritesError, NoRoom, UsageError
from logwrites.loop import (
    LoopOptions,
    LoopResult,
    ProgressCallback,
    Recorder,
    Recording,
    existing_recording,
    run_loop,
)
from logwrites.recordingdir import RecordingDir, make_workdir
from logwrites.report import REPORT_FILES, junit_xml, write_html_report
from qmp.machinesize import DEFAULT_MEMORY_MIB

if TYPE_CHECKING:
    from logwrites.guestrecord import GuestCheckRunner  # boots guests: imported when asked

GUESTS_DIR = Path(__file__).resolve().parents[1] / "guests"
WORKLOADS_DIR = GUESTS_DIR / "workloads"
CHECKERS_DIR = GUESTS_DIR / "checkers"
# The options only a recording uses, each with its value when not given.
RECORDING_ONLY: Final = (("workload", None), ("mkfs_opts", None), ("image_size", None),
                         ("sector_size", 512), ("memory", DEFAULT_MEMORY_MIB), ("cpus", 1),
                         ("queues", 1))
# What the guest code (logwrites.guestrecord) reads of the loop's options.
GUEST_OPTIONS: Final = ("workload", "fs", "kernel", "modules", "mkfs_opts", "image_size",
                        "sector_size", "memory", "cpus", "queues", "timeout", "workdir")


@dataclass(frozen=True, slots=True)
class Spelling:
    """How one interface names the values its refusals mention: the CLI's options
    (`--from-start`), the API's keyword arguments (`from_start`). Messages spell them as the
    user wrote them."""

    options: bool                 # True: `--name-with-dashes`; False: the keyword as it is
    renamed: dict[str, str]       # a LoopRequest field the interface calls otherwise
    pair_note: str                # after "LOG and BASE go together"
    says_kept_log: bool           # a full disk's message names the recording to check again

    def __call__(self, field_name: str) -> str:
        name = self.renamed.get(field_name, field_name)
        return f"--{name.replace('_', '-')}" if self.options else name


CLI_SPELLING: Final = Spelling(True, {"kinds": "states", "checks": "check"},
                               " (the log and the image it starts from)", True)
API_SPELLING: Final = Spelling(False, {"kinds": "states", "memory": "memory_mib",
                                       "timeout": "timeout_s"}, "", False)


@dataclass(frozen=True, slots=True)
class LoopRequest:
    """One crash loop, its values parsed but not yet judged. Field names are the CLI's
    attribute names, which the guest code reads (`guest_options`)."""

    spelling: Spelling
    fs: str = "ext4"                          # a filesystem, or "none" (the raw disk)
    workload: str | None = None               # name or path, with arguments; None: default
    checks: tuple[str, ...] | None = None     # None: the defaults for fs and workload
    kinds: tuple[str, ...] = ("prefix", "reorder")
    max_states: int = DEFAULT_MAX_STATES
    seed: int = 0
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    atomic_unit: int | str | None = None      # bytes, or a size such as "4K"
    from_start: bool = False
    start_mark: str | None = None
    shrink: bool = True
    log: Path | None = None
    base: Path | None = None
    mkfs_opts: str | None = None
    image_size: str | None = None
    sector_size: int = 512
    memory: int = DEFAULT_MEMORY_MIB
    cpus: int = 1
    queues: int = 1
    kernel: Path | None = None
    modules: Path | None = None
    timeout: float = 300.0
    out: Path | None = None
    junit: Path | None = None
    workdir: Path | None = None
    keep_recording: bool = False
    command: str = "logwrites"                # how repro lines call us

    @property
    def fs_name(self) -> str | None:
        return None if self.fs == "none" else self.fs

    def guest_options(self) -> argparse.Namespace:
        """The options as the guest code reads them (`guest_recorder`, `GuestCheckRunner`):
        made here alone, for the CLI's loops and the API's."""
        return argparse.Namespace(**{name: getattr(self, name) for name in GUEST_OPTIONS})


class LoopView(Protocol):
    """What a caller shows of a running loop."""

    def recording_starts(self, workload: Path, where: Path) -> None:
        """A workload is about to be recorded in the guest into `where`."""

    def states(self) -> AbstractContextManager[ProgressCallback | None]:
        """Around the loop's states: the progress callback to hand `run_loop`."""

    def recording_settled(self, where: Path, kept: bool) -> None:
        """A scratch recording was kept, or removed since nothing needed it."""


@dataclass(frozen=True, slots=True)
class QuietView:
    """Shows nothing; progress goes to `on_progress` if given (the API)."""

    on_progress: ProgressCallback | None = None

    def recording_starts(self, workload: Path, where: Path) -> None:
        pass

    def states(self) -> AbstractContextManager[ProgressCallback | None]:
        return contextlib.nullcontext(self.on_progress)

    def recording_settled(self, where: Path, kept: bool) -> None:
        pass


class NothingChecked(LogwritesError):
    """The loop found no crash state: nothing passed, so it must not look like a pass."""

    def __init__(self, result: LoopResult) -> None:
        super().__init__(result)
        self.result = result

    def __str__(self) -> str:
        return nothing_checked(self.result)


# What each kind of state needs after the start, for the message of a loop that found none.
KIND_NEEDS: Final = {
    "prefix": "an entry there",
    "reorder": "a write there that no later write of its epoch overwrites",
    "torn": "a write there longer than the atomic unit, {unit} bytes",
}


def nothing_checked(result: LoopResult) -> str:
    """One line for a loop without states: the kinds asked, where states start, the log's
    size, and what each kind would need there."""
    entries = result.logmap.entries
    where = ("from the log's first entry" if result.start < 0 else
             f"after the mark {entries[result.start].mark!r} (entry {result.start})")
    kinds = result.kinds or tuple(KIND_NEEDS)
    needs = "; ".join(f"a {kind} state needs {KIND_NEEDS[kind].format(unit=result.atomic_unit)}"
                      for kind in kinds if kind in KIND_NEEDS)
    return (f"no crash state was checked: the log's {len(entries)} entries have no "
            f"{' or '.join(kinds)} state {where}: {needs}")


def run_job(request: LoopRequest, view: LoopView | None = None
            ) -> tuple[LoopResult, Path | None]:
    """Refuse, record (or take the log), check every state, settle the recording, write the
    reports; (the result, the HTML page if `out`).

    :raise UsageError: bad values, before anything is recorded, booted or created.
    :raise NoRoom: the states' filesystem filled up. :raise LogwritesError: the recording or
        the log failed.
    """
    view = view or QuietView()
    options = refuse_before_anything(request)
    workload, workload_args = (resolve_workload(request.workload, request.fs)
                               if request.log is None else (None, []))
    specs = checker_specs(request.checks, request.fs, workload)
    require_tools(request.fs_name if "fsck" in specs else None)
    checkers = make_checkers(request, specs, None)  # a bad one: refused before a guest is found
    recorder = make_recorder(request, workload, workload_args)
    runner = guest_runner(request, specs)
    if runner is not None:
        checkers = make_checkers(request, specs, runner)
    result, home = check_recording(request, view, recorder, workload, checkers, options)
    if runner is not None:
        result.guest_checks, result.guest_restored = runner.figures()
    # Every repro line names the recording's log and base image: it stays while one is given.
    if request.log is None:
        kept = home.settle(needed=result.exit_status != 0, keep=request.keep_recording)
        if home.scratch:
            view.recording_settled(home.path, kept)
    page = write_html_report(result, request.out) if request.out else None
    if request.junit:
        request.junit.write_text(junit_xml(result))
    return result, page


def refuse_before_anything(request: LoopRequest) -> LoopOptions:
    """The refusals that need no guest, no log and no workload: all of them come before a
    guest is found or built, so a bad value costs none. The loop's options.

    :raise UsageError: the first bad value, in the order checked here.
    """
    name = request.spelling
    refuse_report_paths(request)
    require_timeout(request.timeout)
    refuse_mkfs_opts(request.mkfs_opts, name("mkfs_opts"))
    options = loop_options(request)
    if request.log is not None or request.base is not None:
        if request.log is None or request.base is None:
            raise UsageError(f"{name('log')} and {name('base')} go together{name.pair_note}")
        refuse_recording_options(request)
    return options


def loop_options(request: LoopRequest) -> LoopOptions:
    """:raise UsageError: where the states start asked twice, a bad kind, count or unit."""
    from logwrites.guestrecord import parse_size  # "4K"; the module boots guests only when asked

    refuse_start_options(request)
    unit = (parse_size(request.atomic_unit) if isinstance(request.atomic_unit, str)
            else request.atomic_unit)
    keep = request.out / "failing" if request.out else None
    return LoopOptions(kinds=request.kinds, max_states=request.max_states, seed=request.seed,
                       jobs=request.jobs, from_start=request.from_start,
                       start_mark=request.start_mark, shrink=request.shrink,
                       keep_failing=keep, atomic_unit=unit, command=request.command)


def make_recorder(request: LoopRequest, workload: Path | None,
                  workload_args: list[str]) -> Recorder:
    """The user's log and base image, or a recording of `workload` in the guest (which finds,
    or builds, the guest now: a kernel that is not one is refused before a disk is made)."""
    if request.log is not None and request.base is not None:
        return existing_recording(request.log, request.base, request.fs_name)
    from logwrites.guestrecord import guest_recorder  # QEMU and the guest: only when recording

    assert workload is not None
    return guest_recorder(request.guest_options(), workload, workload_args)


def guest_runner(request: LoopRequest, specs: list[str]) -> GuestCheckRunner | None:
    """The guest the checkers share, when any of them boots one."""
    if not needs_guest(specs, request.fs_name):
        return None
    from logwrites.guestrecord import GuestCheckRunner  # boots guests: only when asked

    return GuestCheckRunner(request.guest_options())


def make_checkers(request: LoopRequest, specs: list[str],
                  runner: GuestCheckRunner | None) -> list[Checker]:
    """:raise UsageError: a spec that is no checker."""
    return [parse_checker(s, fs=request.fs_name, guest_runner=runner,
                          timeout_s=request.timeout) for s in specs]


def check_recording(request: LoopRequest, view: LoopView, recorder: Recorder,
                    workload: Path | None, checkers: list[Checker], options: LoopOptions
                    ) -> tuple[LoopResult, RecordingDir]:
    """Record into the loop's `RecordingDir` and check every state in a scratch directory
    of the workdir."""
    with tempfile.TemporaryDirectory(prefix="logwrites-loop-",
                                     dir=make_workdir(request.workdir)) as tmp:
        home = RecordingDir.for_loop(request.out, request.workdir)
        if workload is not None:
            view.recording_starts(workload, home.path)
        with home.dropped_if_stopped(keep=request.keep_recording):
            recording = home.record(recorder)
            with view.states() as on_progress:
                try:
                    result = run_loop(recording, checkers, options, Path(tmp) / "states",
                                      on_progress)
                except NoRoom as full:
                    raise _no_room(request, recording, full) from full
    return result, home


def _no_room(request: LoopRequest, recording: Recording, full: NoRoom) -> NoRoom:
    """`full`, or for a recording made here, with how to check it again: it stays."""
    name = request.spelling
    if request.log is not None or not name.says_kept_log:
        return full
    return NoRoom(f"{full}; the recording stays: {name('log')} {recording.log} "
                  f"{name('base')} {recording.base_image} checks it again")


# ---- the refusals, and what a workload and its checks resolve to --------------------------

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


def refuse_recording_options(request: LoopRequest) -> None:
    """With --log nothing is recorded: the options that shape a recording are refused, not
    ignored, so that no one believes a log made elsewhere was recorded as they asked.

    :raise UsageError: naming every such option given.
    """
    name = request.spelling
    given = [name(field_name) for field_name, unset in RECORDING_ONLY
             if getattr(request, field_name) != unset]
    if given:
        raise UsageError(f"{', '.join(given)}: only for a recording, and with {name('log')} "
                         f"nothing is recorded")


def refuse_report_paths(request: LoopRequest) -> None:
    """--out and --junit are written once every state is checked: a path that could not be
    written then, or would replace an input (the --log or --base), is refused before anything
    is recorded or checked.

    :raise UsageError: naming the option and the path, as the request's interface spells them.
    """
    out, junit, name = request.out, request.junit, request.spelling
    inputs = {name("log"): request.log, name("base"): request.base}
    if junit is not None:
        junit_named = f"{name('junit')} {junit}"
        refuse_replacing_inputs(f"{junit_named}:", junit, inputs)
        if junit.is_dir():
            raise UsageError(f"{junit_named}: is a directory, not a file to write")
        if not junit.parent.is_dir():
            raise UsageError(f"{junit_named}: no directory {junit.parent} to write it in")
    if out is not None:
        out_named = f"{name('out')} {out}"
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out_named}: exists and is not a directory")
        start = nearest_existing(out)
        if not start.is_dir():
            raise UsageError(f"{out_named}: {start} is not a directory")
        for report in REPORT_FILES:
            refuse_replacing_inputs(f"{out_named}: its {report}", out / report, inputs)


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


def refuse_start_options(request: LoopRequest) -> None:
    """Where the states start is asked once.

    :raise UsageError: an empty mark name, or a mark together with from-start (which would
        win silently, so that a mistyped mark went unnoticed), as the request's interface
        spells the two.
    """
    from_start, start_mark = request.from_start, request.start_mark
    start, mark = request.spelling("from_start"), request.spelling("start_mark")
    if start_mark == "":  # no log has a mark without a name: it is a slip
        raise UsageError(f"{mark} '': give a mark's name")
    if from_start and start_mark is not None:
        raise UsageError(f"{start} and {mark} {start_mark!r}: give one (states start at the "
                         f"log's first entry, or at the mark)")


__all__ = ["API_SPELLING", "CLI_SPELLING", "LoopRequest", "LoopView", "NothingChecked",
           "QuietView", "Spelling", "checker_specs", "default_checks", "nothing_checked",
           "refuse_mkfs_opts", "resolve_workload", "run_job"]
