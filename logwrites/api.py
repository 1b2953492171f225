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
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from logwrites.check import FILESYSTEMS
from logwrites.crashloop_job import API_SPELLING, LoopRequest, QuietView, nothing_checked, run_job
from logwrites.crashstates import DEFAULT_MAX_STATES
from logwrites.errors import UsageError
from logwrites.loop import LoopResult, ProgressCallback
from logwrites.report import failure_lines
from qmp.machinesize import DEFAULT_MEMORY_MIB

# crash_loop's path arguments: each a str or os.PathLike naming a str path, or None.
PATH_ARGUMENTS: Final = ("kernel", "log", "base", "out", "junit", "workdir")


def crash_loop(workload: str | os.PathLike[str] | None = None, *, fs: str = "ext4",
               checks: Sequence[str] | None = None,
               states: Sequence[str] = ("prefix", "reorder"),
               max_states: int = DEFAULT_MAX_STATES, seed: int = 0, jobs: int | None = None,
               atomic_unit: int | str | None = None,
               from_start: bool = False, start_mark: str | None = None, shrink: bool = True,
               log: str | os.PathLike[str] | None = None,
               base: str | os.PathLike[str] | None = None,
               mkfs_opts: str | None = None, image_size: str | int | None = None,
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
    `image_size` ("64M", or an int of bytes), by default 128M, or 320M for xfs (mkfs.xfs
    wants 300 MiB). Torn states (`states` with "torn") tear only at multiples of
    `atomic_unit` bytes (an int, or a size such as "4K" as the CLI takes it; default: one
    sector of the log). The disk has `sector_size`-byte logical sectors (512 or 4096). The
    recording guest has `memory_mib` of RAM and `cpus` CPUs, its disk `queues` queues.
    `states` and `checks` are sequences of str: a bare str ("prefix") is refused, not taken
    letter by letter. `jobs` None is one per core; `start_mark` and `from_start` exclude each
    other. Paths are str or os.PathLike. A loop that finds no state to check has
    `exit_status` 2, as one with a state it could not check: nothing passed.

    :raise UsageError: bad arguments, before anything is recorded, booted or created.
    :raise LogwritesError: the recording failed.
    """
    given = dict(locals())  # every argument, by name: checked before anything else runs
    _refuse_bad_arguments(given)
    paths = {name: Path(os.fspath(given[name])) if given[name] is not None else None
             for name in PATH_ARGUMENTS}
    request = LoopRequest(
        spelling=API_SPELLING, fs=fs,
        workload=os.fspath(workload) if workload is not None else None,
        checks=tuple(checks) if checks is not None else None, kinds=tuple(states),
        max_states=max_states, seed=seed, jobs=jobs if jobs is not None else os.cpu_count() or 1,
        atomic_unit=atomic_unit, from_start=from_start, start_mark=start_mark, shrink=shrink,
        log=paths["log"], base=paths["base"], mkfs_opts=mkfs_opts,
        image_size=str(image_size) if image_size is not None else None,
        sector_size=sector_size, memory=memory_mib, cpus=cpus, queues=queues,
        kernel=paths["kernel"], timeout=timeout_s, out=paths["out"], junit=paths["junit"],
        workdir=paths["workdir"], keep_recording=keep_recording)
    return run_job(request, QuietView(on_progress))[0]


def _refuse_bad_arguments(given: dict[str, object]) -> None:
    """Types first, so that a wrong one is named here rather than failing deep in the loop
    (the CLI's argparse does this for it). Values are judged later, as for the CLI.

    :raise UsageError: `crash_loop(name=value): what it takes`, for the first bad argument.
    """
    def wanted(name: str, ok: bool, what: str) -> None:
        if not ok:
            raise UsageError(f"crash_loop({name}={given[name]!r}): {what}")

    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    fs_names = (*FILESYSTEMS, "none")
    wanted("fs", given["fs"] in fs_names, f"one of {', '.join(fs_names)}")
    for name in ("workload", *PATH_ARGUMENTS):
        value = given[name]
        text = os.fspath(value) if isinstance(value, str | os.PathLike) else None
        wanted(name, value is None or (isinstance(text, str) and text != ""),
               "a str or os.PathLike (not bytes, not empty), or None")
    for name in ("states", "checks"):
        value = given[name]
        wanted(name, (value is None and name == "checks")
               or (isinstance(value, Sequence) and not isinstance(value, str)
                   and all(isinstance(item, str) for item in value)),
               "a sequence of str (a list of one for one: a bare str is not split)")
    for name in ("max_states", "seed", "sector_size", "memory_mib", "cpus", "queues"):
        wanted(name, is_int(given[name]), "an int")
    wanted("jobs", given["jobs"] is None or is_int(given["jobs"]),
           "an int of at least 1, or None for one per core")
    for name in ("atomic_unit", "image_size"):
        value = given[name]
        wanted(name, value is None or is_int(value) or isinstance(value, str),
               'bytes as an int or a size str ("4K"), or None')
    for name in ("mkfs_opts", "start_mark"):
        wanted(name, given[name] is None or isinstance(given[name], str), "a str, or None")
    for name in ("from_start", "shrink", "keep_recording"):
        wanted(name, isinstance(given[name], bool), "True or False")
    timeout = given["timeout_s"]
    wanted("timeout_s", isinstance(timeout, int | float) and not isinstance(timeout, bool),
           "seconds as an int or float")
    wanted("on_progress", given["on_progress"] is None or callable(given["on_progress"]),
           "a callable (done, total, result), or None")


def failure_message(result: LoopResult) -> str:
    """Every failing (and unchecked) state with its detail, blamed records and repro; for a
    loop without states, why there were none."""
    lines = list(failure_lines(result)) if result.results else [nothing_checked(result)]
    errors = [r for r in result.results if r.verdict == "error"]
    lines += [f"ERROR {r.state.id}: {r.detail}\n  repro: {r.repro}" for r in errors]
    counts = {k: dict(v) for k, v in result.counts().items()}
    return f"crash-loop of {result.recording.workload}: {counts}\n" + "\n".join(lines)


def assert_no_failures(result: LoopResult) -> None:
    """:raise AssertionError: naming each failing or unchecked state and its repro command."""
    if result.exit_status != 0:
        raise AssertionError(failure_message(result))


__all__ = ["assert_no_failures", "crash_loop", "failure_message"]
