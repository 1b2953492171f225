"""The crash-replay loop: record → enumerate → build → check (→ shrink), `jobs` at a time.

Step 1 (record) is a seam: a `Recorder` returns a `Recording` (the log, the base image the log
starts from, the filesystem, console logs). `logwrites.guestrecord` records a workload in a
real guest on our backend; `existing_recording` takes a log and base image the user already
has (any dm-log-writes log: ours, the kernel target's, QEMU blklogwrites').

Steps 2-4 run here. Each of `jobs` worker threads owns a `StateBuilder` cursor image and takes
the next run of consecutive states in build order from a FIFO queue, so its cursor only moves
forward (each worker walks the log once) and its checker sees neighbouring states. A state is
the worker's cursor at the state's checkpoint with its epoch's local entries applied in place
and undone after the check (`StateBuilder.view`): no image copy per state. Checkers that leave
the image as they found it (the built-in fsck) run on the cursor itself; checkers that may write
get a disposable copy (`check_state`). A state whose image provably repeats an earlier state's
(`statebuild.ImageKeys`: a mark right after a flush, say) reuses that state's verdicts from
checkers whose verdict depends on the image alone (`image_only`, the built-in fsck); its result
names the original (`same_as`, "deduplicated" in its detail), and other checkers still run on
it. The built-in fsck on ext4 also answers without running e2fsck when no byte e2fsck read for
one of the worker's last checks has changed (`logwrites.check.ReadSetCache`; the result's
`reused_from`, "reused: read set unchanged since state ..." in its detail). Failing reordered
states are shrunk, rebuilding those rare states in one pass each. Results come back through a
callback (the command module draws the progress bar); the library never prints.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import re
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from logwrites.check import Checker, ImageNotRestored, Verdict, check_state, combine
from logwrites.crashstates import (
    DEFAULT_MAX_STATES,
    SETUP_MARK,
    CrashState,
    LogMap,
    atomic_sectors_of,
    check_kinds,
    enumerate_states,
    start_index,
)
from logwrites.errors import NoRoom, UsageError
from logwrites.logfile import LogReader
from logwrites.shrink import Shrunk, shrink
from logwrites.statebuild import ImageKeys, StateBuilder, build_from_zero

log = logging.getLogger(__name__)

VERDICT_ORDER: Final = ("pass", "fail", "error")


@dataclass(frozen=True, slots=True)
class Recording:
    """What step 1 leaves: the log, the image it starts from, and what produced them."""

    log: Path
    base_image: Path
    fs: str | None = None
    workload: str = ""
    console_logs: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()   # what the recorder wants the report to say


class Recorder(Protocol):
    def __call__(self, workdir: Path) -> Recording: ...


def existing_recording(log_path: Path, base_image: Path, fs: str | None) -> Recorder:
    """A recorder that only checks and hands over a log and base image the user already has."""
    def record(workdir: Path) -> Recording:
        # dm-log-writes writes its log to a block device: that is read where it is.
        if not (log_path.is_file() or log_path.is_block_device()):
            raise UsageError(f"log {log_path} is not a file or a block device")
        if not base_image.is_file():
            raise UsageError(f"base image {base_image} is not a file")
        return Recording(log_path.resolve(), base_image.resolve(), fs,
                         workload=f"recorded log {log_path}")
    return record


@dataclass(slots=True)
class LoopOptions:
    kinds: tuple[str, ...] = ("prefix", "reorder")
    max_states: int = DEFAULT_MAX_STATES
    seed: int = 0
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    from_start: bool = False
    start_mark: str | None = None
    shrink: bool = True
    keep_failing: Path | None = None  # directory for the images of failing states
    command: str = "logwrites"        # how repro commands call us
    dedup: bool = True                # reuse image-only verdicts of provably identical states
    atomic_unit: int | None = None    # bytes a torn write never splits (None: one sector)

    def __post_init__(self) -> None:
        """Refused when made, before anything is recorded: :raise UsageError:."""
        if not self.kinds:
            raise UsageError("--states: name at least one kind")
        check_kinds(self.kinds)
        if self.max_states < 1:
            raise UsageError("--max-states must be at least 1")
        if self.jobs < 1:
            raise UsageError(f"--jobs {self.jobs}: must be at least 1")
        unit = self.atomic_unit
        if unit is not None and (unit < 512 or unit & (unit - 1)):
            raise UsageError(f"--atomic-unit {unit}: a power of two of at least 512 bytes")


@dataclass(slots=True)
class StateResult:
    state: CrashState
    verdict: str
    verdicts: list[Verdict]
    seconds: float                    # build + check
    build_seconds: float
    repro: str
    image: Path | None = None         # kept failing image
    shrunk: Shrunk | None = None
    same_as: str | None = None        # deduplicated: an earlier state with the same image

    @property
    def checker(self) -> str:
        return ",".join(v.checker for v in self.verdicts)

    @property
    def detail(self) -> str:
        # Answers that did not run are always named, passes included (the checker's detail
        # says whose answer it is).
        parts = [f"{v.checker}: {v.detail}"
                 for v in self.verdicts if v.verdict != "pass" or v.reused_from is not None]
        if self.same_as is not None:
            parts.insert(0, f"deduplicated: same image as {self.same_as}")
        return "; ".join(parts)

    @property
    def reused_from(self) -> str | None:
        """The earlier state whose checker answer was reused because every byte the checker
        read then is unchanged here (`logwrites.check.ReadSetCache`), or None."""
        return next((v.reused_from for v in self.verdicts if v.reused_from is not None), None)


@dataclass(slots=True)
class LoopResult:
    recording: Recording
    logmap: LogMap
    start: int
    results: list[StateResult]
    seconds: float
    jobs: int
    entries_applied: int = 0
    deduplicated: int = 0             # states whose image-only verdicts were reused
    readset_reused: int = 0           # states answered by an earlier check's unchanged reads
    atomic_unit: int = 512            # bytes torn states never split
    guest_checks: int = 0             # checks that ran in a guest (guest:, xfs log recovery)
    guest_restored: int = 0           # of those, in a guest restored from the saved one
    kinds: tuple[str, ...] = ()       # the kinds of state asked for

    def counts(self) -> dict[str, dict[str, int]]:
        """{kind: {verdict: n}} over every state, kinds in enumeration order."""
        table: dict[str, dict[str, int]] = {}
        for r in self.results:
            row = table.setdefault(r.state.kind, dict.fromkeys(VERDICT_ORDER, 0))
            row[r.verdict] += 1
        return table

    def failed(self) -> list[StateResult]:
        return [r for r in self.results if r.verdict == "fail"]

    @property
    def exit_status(self) -> int:
        """0 every state passed, 1 one failed, 2 no failure but a state could not be checked,
        or there was no state at all (nothing passed: a CI job must not read it as a pass)."""
        verdicts = {r.verdict for r in self.results}
        return 1 if "fail" in verdicts else 2 if "error" in verdicts or not verdicts else 0


def repro_command(recording: Recording, state: CrashState, command: str = "logwrites") -> str:
    """A command line that rebuilds `state` into `{image}` (the file the user names)."""
    base, log_path = shlex.quote(str(recording.base_image)), shlex.quote(str(recording.log))
    return (f"cp --sparse=always {base} {{image}} && "
            f"{command} replay {log_path} {{image}} --state {state.id}")


def state_filename(state_id: str) -> str:
    """A file name for a state id (ids hold ':', ',' and '-')."""
    return re.sub(r"[^A-Za-z0-9-]+", "_", state_id).strip("_")


def recording_marks(logmap: LogMap, state: CrashState) -> list[str]:
    """The marks a state includes: every mark entry up to its end (before a torn write)."""
    return _MarkIndex(logmap).upto(state)


class _MarkIndex:
    """The log's marks by entry index, so a state's marks cost O(log n), not a scan of the
    log per state (which grew with the state's position)."""

    def __init__(self, logmap: LogMap) -> None:
        marks = [e for e in logmap.entries if e.is_mark]
        self.indexes, self.names = [e.index for e in marks], [e.mark or "" for e in marks]

    def upto(self, state: CrashState) -> list[str]:
        last = state.torn[0] - 1 if state.torn else state.end
        return self.names[:bisect.bisect_right(self.indexes, last)]


def state_env(marks: list[str], state: CrashState) -> dict[str, str]:
    """What user checkers learn of the state through their environment."""
    return {"LW_STATE": state.id, "LW_STATE_KIND": state.kind, "LW_MARKS": " ".join(marks)}


ProgressCallback = Callable[[int, int, StateResult | None], None]


def image_only(checker: Checker) -> bool:
    """Whether the checker's verdict depends on the image (and expect_fs) alone, not on the
    state's id or marks: only then may a verdict be reused for an identical image."""
    return bool(getattr(checker, "image_only", False))


class _Dedup:
    """Which states repeat an earlier state's image (`ImageKeys`), and the verdicts of the
    earlier ones once known. A repeat waits for its original, which the FIFO pool has already
    handed to a worker (originals come first in build order, and a run's states are checked
    in order), so a wait never waits on itself."""

    def __init__(self, logmap: LogMap, states: Sequence[CrashState],
                 expect_fs: Callable[[CrashState], bool], wait_s: float) -> None:
        keys, first = ImageKeys(logmap), {}
        self.same_as: list[int | None] = []
        for n, state in enumerate(states):
            key = (keys.key(state), expect_fs(state))
            self.same_as.append(first.get(key))
            first.setdefault(key, n)
        originals = {k for k in self.same_as if k is not None}
        self._done = {n: threading.Event() for n in originals}
        self._verdicts: dict[int, list[Verdict] | None] = {}
        self.wait_s = wait_s

    def is_original(self, n: int) -> bool:
        return n in self._done

    def publish(self, n: int, verdicts: list[Verdict] | None) -> None:
        self._verdicts[n] = verdicts
        self._done[n].set()

    def release(self) -> None:
        """The loop stops: a repeat waiting for an original that will now never be checked
        must not wait out `wait_s`."""
        for done in self._done.values():
            done.set()

    def verdicts_of(self, n: int) -> list[Verdict] | None:
        if not self._done[n].wait(self.wait_s):
            log.warning("state #%d took over %.0f s; its repeats are checked again", n,
                        self.wait_s)
            return None
        return self._verdicts.get(n)


def run_loop(recording: Recording, checkers: Sequence[Checker], options: LoopOptions,
             workdir: Path, on_progress: ProgressCallback | None = None) -> LoopResult:
    """Enumerate the recording's crash states, build and check each, shrink failures.

    `on_progress(done, total, result)` is called from the calling thread: once with
    result None when the states are known, then once per checked state.

    :raise UsageError: for options the log cannot satisfy. :raise LogFormatError: for a
        damaged log.
    """
    if not checkers:
        raise UsageError("no checker: give at least one --check")
    started = time.perf_counter()
    logmap = LogMap.read(recording.log)
    start = start_index(logmap, from_start=options.from_start, start_mark=options.start_mark)
    atomic_sectors = atomic_sectors_of(logmap, options.atomic_unit)
    states = enumerate_states(logmap, options.kinds, start=start, max_states=options.max_states,
                              seed=options.seed, atomic_sectors=atomic_sectors)
    setup = logmap.mark_index(SETUP_MARK)
    total = len(states)
    log.info("%d crash states of %d entries (%d epochs), from entry %d", total,
             len(logmap.entries), len(logmap.epochs), start)
    if on_progress:
        on_progress(0, total, None)
    workdir.mkdir(parents=True, exist_ok=True)
    if options.keep_failing:
        options.keep_failing.mkdir(parents=True, exist_ok=True)

    def expect_fs(state: CrashState) -> bool:
        # After the mkfs mark a state must carry the filesystem; before it (--from-start) a
        # missing signature is a state from before mkfs and passes (DESIGN.md §5).
        return recording.fs not in (None, "none") and setup is not None and state.entry >= setup

    dedup = None
    if options.dedup and any(image_only(c) for c in checkers):
        wait_s = sum(getattr(c, "timeout_s", 300.0) for c in checkers) * 2 + 60
        dedup = _Dedup(logmap, states, expect_fs, wait_s)
        repeats = sum(k is not None for k in dedup.same_as)
        log.info("%d of %d states repeat an earlier state's image", repeats, total)
    results: list[StateResult] = []
    with LogReader(recording.log) as reader:
        builders: list[StateBuilder] = []
        mine = threading.local()
        builders_lock = threading.Lock()
        done_lock = threading.Lock()

        def builder() -> StateBuilder:
            # One cursor per worker thread: the pool's FIFO queue hands each thread states in
            # build order, so its cursor never has to go back.
            if getattr(mine, "builder", None) is None:
                with builders_lock:
                    mine.builder = StateBuilder(reader, logmap, recording.base_image,
                                                workdir / f"build-{len(builders)}")
                    builders.append(mine.builder)
            b: StateBuilder = mine.builder
            return b

        marks = _MarkIndex(logmap)

        def one(state: CrashState, n: int) -> StateResult:
            reuse: dict[int, Verdict] = {}
            same_as = dedup.same_as[n] if dedup is not None else None
            if dedup is not None and same_as is not None:
                earlier = dedup.verdicts_of(same_as)
                for k, checker in enumerate(checkers):
                    # An error may be passing trouble (a timeout): only answers are reused.
                    if (earlier is not None and len(earlier) == len(checkers)
                            and image_only(checker) and earlier[k].verdict in ("pass", "fail")):
                        v = earlier[k]
                        reuse[k] = Verdict(v.verdict, v.checker, 0.0,
                                           f"reused from {states[same_as].id}: {v.detail}",
                                           v.output)
            result = None
            try:
                result = _check_one(builder(), reader, logmap, state, checkers, workdir, n,
                                    recording, options, expect_fs(state), reuse, marks)
                if reuse:
                    result.same_as = states[same_as].id  # type: ignore[index]
                return result
            finally:
                if dedup is not None and dedup.is_original(n):
                    complete = result is not None and len(result.verdicts) == len(checkers)
                    dedup.publish(n, result.verdicts if complete else None)  # type: ignore[union-attr]

        futures: list[Future[StateResult]] = []
        reported = 0

        def report_done(block: bool) -> None:
            nonlocal reported
            while reported < len(futures) and (block or futures[reported].done()):
                result = futures[reported].result()
                results.append(result)
                reported += 1
                if on_progress:
                    with done_lock:
                        on_progress(reported, total, result)

        try:
            with ThreadPoolExecutor(options.jobs, thread_name_prefix="crashstate") as pool:
                futures = [Future() for _ in states]
                run = _run_run(one, states, futures)
                step = _run_length(total, options.jobs)
                for first in range(0, total, step):
                    pool.submit(run, first, min(total, first + step))
                try:
                    while reported < len(futures):
                        try:
                            futures[reported].result(timeout=0.2)
                        except TimeoutError:
                            pass
                        report_done(block=False)
                except BaseException:
                    # Stopped (Ctrl-C, SIGTERM): the states being checked finish, no other
                    # starts, so the pool's exit waits for a few checks, not for the loop.
                    for future in futures:
                        future.cancel()
                    if dedup is not None:
                        dedup.release()
                    raise
        finally:
            for b in builders:
                b.close()
        applied = sum(b.entries_applied for b in builders)
    return LoopResult(recording, logmap, start, results, time.perf_counter() - started,
                      options.jobs, applied,
                      sum(r.same_as is not None for r in results),
                      sum(r.same_as is None and r.reused_from is not None for r in results),
                      atomic_sectors * logmap.sectorsize, kinds=options.kinds)


def _run_length(total: int, jobs: int) -> int:
    """How many consecutive states one worker takes at a time. Runs, not single states: a
    worker's consecutive states differ little, so its checker's read-set cache (the last few
    checks of this worker) answers more of them; short enough that every worker gets many
    runs, so none idles long at the end."""
    return 1 if jobs == 1 else max(1, min(64, total // (jobs * 8)))


def _run_run(one: Callable[[CrashState, int], StateResult], states: Sequence[CrashState],
             futures: list[Future[StateResult]]) -> Callable[[int, int], None]:
    """A pool task: states [first, end) in build order by one worker, each result (or
    exception) handed to that state's future as soon as it is known."""
    def run(first: int, end: int) -> None:
        for n in range(first, end):
            if not futures[n].set_running_or_notify_cancel():
                continue
            try:
                futures[n].set_result(one(states[n], n))
            except BaseException as err:  # the caller re-raises it in order
                futures[n].set_exception(err)
    return run


def _check_one(builder: StateBuilder, reader: LogReader, logmap: LogMap, state: CrashState,
               checkers: Sequence[Checker], workdir: Path, n: int, recording: Recording,
               options: LoopOptions, expect_fs: bool,
               reuse: dict[int, Verdict] | None = None,
               marks: _MarkIndex | None = None) -> StateResult:
    """Build and check one state. `reuse`: verdicts (by checker position) taken from an
    identical earlier state; only the other checkers run, and none at all builds nothing."""
    t0 = time.perf_counter()
    scratch = workdir / f"check-{n}.img"
    repro = repro_command(recording, state, options.command)
    build_s = 0.0
    reuse = reuse or {}
    try:
        env = state_env((marks or _MarkIndex(logmap)).upto(state), state)
        changed = False
        to_run = [c for k, c in enumerate(checkers) if k not in reuse]
        ran: list[Verdict] = []
        if to_run:
            with builder.view(state, workdir / f"state-{n}.img") as image:
                build_s = time.perf_counter() - t0
                try:
                    ran = check_state(to_run, image, scratch, expect_fs=expect_fs, env=env,
                                      changes=builder.changes_of(image))
                except ImageNotRestored as err:
                    # The verdicts stand; the cursor may not be the checkpoint image any more.
                    ran, changed = err.verdicts, True
        if changed:  # after the view has put its pre-images back, which a reset would undo
            builder.reset()
        fresh = iter(ran)
        verdicts = [v for v in (reuse[k] if k in reuse else next(fresh, None)
                                for k in range(len(checkers))) if v is not None]
        verdict = combine(verdicts)
        shrunk = None
        kept = None
        if verdict == "fail":
            # Failing states (rare) are rebuilt in one pass for the report and for shrinking.
            rebuild = _Rebuilder(reader, logmap, recording.base_image)
            if options.shrink and state.kind == "reorder" and len(state.dropped) > 1:
                shrunk = _shrink(rebuild, state, checkers, workdir, n, expect_fs, env)
            if options.keep_failing is not None:
                kept = options.keep_failing / f"{state_filename(state.id)}.img"
                rebuild(state, kept)
        return StateResult(state, verdict, verdicts, time.perf_counter() - t0, build_s, repro,
                           kept, shrunk)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f"{err.filename}: {err.strerror}" if err.filename else \
                f"{err.strerror} in {workdir}"
            raise NoRoom(f"{where}: no room to build crash state {state.id}; free some, or "
                         f"give --workdir on a bigger filesystem") from err
        log.error("state %s: %s", state.id, err)
        log.debug("traceback", exc_info=True)
        return StateResult(state, "error", [Verdict("error", "build", 0.0, str(err))],
                           time.perf_counter() - t0, build_s, repro)
    finally:
        scratch.unlink(missing_ok=True)


class _Rebuilder:
    """Rebuilds single states off the main walk (failing states to keep, shrink candidates)."""

    def __init__(self, reader: LogReader, logmap: LogMap, base: Path) -> None:
        self.reader, self.logmap, self.base = reader, logmap, base

    def __call__(self, state: CrashState, dest: Path) -> Path:
        build_from_zero(self.reader, self.logmap, self.base, state, dest)
        return dest


def _shrink(rebuild: _Rebuilder, state: CrashState, checkers: Sequence[Checker],
            workdir: Path, n: int, expect_fs: bool, env: dict[str, str]) -> Shrunk:
    image = workdir / f"shrink-{n}.img"
    scratch = workdir / f"shrink-check-{n}.img"

    def still_fails(candidate: CrashState) -> bool:
        try:
            rebuild(candidate, image)
            verdicts = check_state(checkers, image, scratch, expect_fs=expect_fs,
                                   env={**env, "LW_STATE": candidate.id}, consume=True)
            return combine(verdicts) == "fail"
        finally:
            image.unlink(missing_ok=True)

    result = shrink(state, still_fails)
    log.info("state %s shrinks to %s in %d tries", state.id, result.state.id, result.tries)
    return result


__all__ = ["LoopOptions", "LoopResult", "Recorder", "Recording", "StateResult",
           "existing_recording", "repro_command", "run_loop", "state_filename"]
