"""The Python API: crash loops inside your own programs and test suites.

    from logwrites.api import crash_loop
    result = crash_loop("txnlog --no-barrier", fs="none")        # records in the guest
    result = crash_loop(log="run.log", base="base.img", fs="ext4")  # an existing recording
    assert_no_failures(result)   # AssertionError naming each failing state and its repro

Returns a `logwrites.loop.LoopResult` (`results`: one `StateResult` per state, `counts()`,
`failed()`, `exit_status`). Reports are written when asked (`out`, `junit`). Nothing here
prints; progress goes to the optional callback.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from logwrites.check import needs_guest, parse_checker, require_tools
from logwrites.crashstates import DEFAULT_MAX_STATES
from logwrites.errors import UsageError
from logwrites.loop import (
    LoopOptions,
    LoopResult,
    ProgressCallback,
    Recorder,
    existing_recording,
    run_loop,
)
from logwrites.recordingdir import RecordingDir, make_workdir
from logwrites.report import failure_lines, junit_xml, write_html_report
from qmp.machinesize import DEFAULT_MEMORY_MIB

if TYPE_CHECKING:
    from logwrites.guestrecord import GuestCheckRunner


def crash_loop(workload: str | os.PathLike[str] | None = None, *, fs: str = "ext4",
               checks: Sequence[str] | None = None,
               states: Sequence[str] = ("prefix", "reorder"),
               max_states: int = DEFAULT_MAX_STATES, seed: int = 0, jobs: int | None = None,
               atomic_unit: int | None = None,
               from_start: bool = False, start_mark: str | None = None, shrink: bool = True,
               log: str | os.PathLike[str] | None = None,
               base: str | os.PathLike[str] | None = None,
               mkfs_opts: str | None = None, image_size: str | None = None,
               sector_size: int = 512, memory_mib: int = DEFAULT_MEMORY_MIB, cpus: int = 1,
               queues: int = 1,
               kernel: str | os.PathLike[str] | None = None, timeout_s: float = 300.0,
               out: str | os.PathLike[str] | None = None,
               junit: str | os.PathLike[str] | None = None,
               workdir: str | os.PathLike[str] | None = None,
               keep_recording: bool = False,
               on_progress: ProgressCallback | None = None) -> LoopResult:
    """Record `workload` (a built-in name or a script path, with arguments: "txnlog
    --no-barrier") in the guest, or take `log` + `base`; check every crash state with `checks`
    (default: fsck and the workload's own checker); return the results. A recording made
    here stays (in `out`/recording, or a directory of its own in `workdir`) when a state failed
    or could not be checked, since every repro names its log and base image; without `out` it
    is removed when every state passed, unless `keep_recording`. The disk under test is
    `image_size` ("64M"), by default 128M, or 320M for xfs (mkfs.xfs wants 300 MiB). Torn
    states (`states` with "torn") tear only at multiples of `atomic_unit` bytes (default: one
    sector of the log). The disk has `sector_size`-byte logical sectors (512 or 4096). The
    recording guest has `memory_mib` of RAM and `cpus` CPUs, its disk `queues` queues.

    :raise UsageError: bad arguments. :raise LogwritesError: the recording failed.
    """
    from logwrites.commands.crash_loop import (
        checker_specs,
        refuse_recording_options,
        refuse_report_paths,
        resolve_workload,
    )

    refuse_report_paths(Path(out) if out else None, Path(junit) if junit else None,
                        {"log": Path(log) if log else None, "base": Path(base) if base else None})
    if start_mark == "":
        raise UsageError("start_mark '': give a mark's name")
    fs_name = None if fs == "none" else fs
    script, args = (None, []) if log is not None else resolve_workload(
        os.fspath(workload) if workload is not None else None, fs)
    specs = checker_specs(checks, fs, script)
    require_tools(fs_name if "fsck" in specs else None)
    runner: GuestCheckRunner | None = None
    ns = _namespace(workload=workload, fs=fs, kernel=kernel, mkfs_opts=mkfs_opts,
                    image_size=image_size, sector_size=sector_size, memory=memory_mib,
                    cpus=cpus, queues=queues, timeout=timeout_s)
    if needs_guest(specs, fs_name):
        from logwrites.guestrecord import GuestCheckRunner

        runner = GuestCheckRunner(ns)
    checkers = [parse_checker(s, fs=fs_name, guest_runner=runner, timeout_s=timeout_s)
                for s in specs]
    recorder: Recorder
    if log is not None or base is not None:
        if log is None or base is None:
            raise UsageError("log and base go together")
        refuse_recording_options(ns)
        recorder = existing_recording(Path(log), Path(base), fs_name)
    else:
        from logwrites.guestrecord import guest_recorder

        assert script is not None
        recorder = guest_recorder(ns, script, args)
    keep = Path(out) / "failing" if out else None
    options = LoopOptions(kinds=tuple(states), max_states=max_states, seed=seed,
                          jobs=jobs or os.cpu_count() or 1, from_start=from_start,
                          start_mark=start_mark, shrink=shrink, keep_failing=keep,
                          atomic_unit=atomic_unit)
    scratch_root = make_workdir(Path(workdir) if workdir else None)
    with tempfile.TemporaryDirectory(prefix="logwrites-api-", dir=scratch_root) as tmp:
        home = RecordingDir.for_loop(Path(out) if out else None, scratch_root)
        with home.dropped_if_stopped(keep=keep_recording):
            recording = home.record(recorder)
            result = run_loop(recording, checkers, options, Path(tmp) / "states", on_progress)
    if runner is not None:
        result.guest_checks, result.guest_restored = runner.figures()
    if log is None:
        home.settle(needed=result.exit_status != 0, keep=keep_recording)
    if out:
        write_html_report(result, Path(out))
    if junit:
        Path(junit).write_text(junit_xml(result))
    return result


def _namespace(**values: object) -> object:
    import argparse

    return argparse.Namespace(modules=None, **values)


def failure_message(result: LoopResult) -> str:
    """Every failing (and unchecked) state with its detail, blamed records and repro."""
    lines = list(failure_lines(result))
    errors = [r for r in result.results if r.verdict == "error"]
    lines += [f"ERROR {r.state.id}: {r.detail}\n  repro: {r.repro}" for r in errors]
    counts = {k: dict(v) for k, v in result.counts().items()}
    return f"crash-loop of {result.recording.workload}: {counts}\n" + "\n".join(lines)


def assert_no_failures(result: LoopResult) -> None:
    """:raise AssertionError: naming each failing or unchecked state and its repro command."""
    if result.exit_status != 0:
        raise AssertionError(failure_message(result))


__all__ = ["assert_no_failures", "crash_loop", "failure_message"]
