"""Checkers: does a crash-state image hold what a crash may leave behind? (DESIGN.md §5)

A checker never changes the state itself (later states and the report need it pristine). A
checker that may write (`writes_image` True: `host:CMD`, `guest:PATH`, unknown ones) runs on a
disposable copy of the state's image (reflinked where the filesystem can, else sparse-copied:
the copy costs O(image)). The built-in `fsck` runs on the state's image itself and leaves it as
it found it: ext4's journal is replayed in this process (logwrites.jbd2, which leaves what
`e2fsck -E journal_only` leaves and keeps the pre-image of every block it writes), checked by
one `e2fsck -fn`, and the pre-images are written back; a journal jbd2 does not handle is
replayed by e2fsck through its undo file (`-z`), rolled back with an in-process e2undo
afterwards (`apply_undo_file`, the `e2undo` program when the undo file is not one to trust) —
O(blocks the checker changed) either way; the other read-only checks write nothing (xfs's log
recovery in the guest works on a copy). `e2fsck -fn` runs under an LD_PRELOAD read recorder
(logwrites/_readset_recorder.c); when a later state's image (after its journal replay) holds
the same bytes at every range e2fsck read for one of the worker's last few states, e2fsck
would read the same and answer the same, so that answer is reused (`ReadSetCache`; the
verdict's `reused_from`); when the image before its replay holds the same bytes wherever the
in-process replay and e2fsck read, the replay is spared too. With the cursor's record of
writes (`ImageChanges`, from the loop) only what was written since is compared. Without the
recorder e2fsck simply runs every time.
When a rollback cannot be trusted (a killed or failed replay, e2undo refusing) the checker says
so with `ImageNotRestored`, and the caller rebuilds the image. Three kinds, parsed from the
command line by `parse_checker`:

- `fsck` picks the filesystem's own checker. A crash state of a journaling filesystem usually
  needs journal recovery first; a read-only fsck of an unrecovered journal reports false
  corruption (xfstests mounts before it checks for this reason). ext4: the journal is replayed
  as `e2fsck -E journal_only` replays it (in process, else by e2fsck), then `e2fsck -fn`
  checks the image. btrfs: `btrfs check --readonly` understands the log tree by itself. xfs:
  `xfs_repair -n` on the host judges a state with a clean log; a dirty log needs a kernel's
  log recovery (no xfsprogs tool replays one), so the guest boots on a disposable copy of the
  state, the kernel under test mounts it (recovery), unmounts it and runs `xfs_repair -n` on
  it: a failed mount or repair check fails the state.
  An image with no filesystem signature passes when the state is from before the filesystem
  existed, and fails when it should have one.
- `host:CMD` runs CMD through the shell with `{image}` replaced by the copy's path; exit 0
  passes, 126/127 (command not runnable) and timeouts are errors, anything else fails.
- `guest:PATH` boots the guest on an overlay of the state and runs PATH inside (a `GuestRunner`
  supplied by the loop; the kernel under test mounts the image and runs its own recovery).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import selectors
import shlex
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from logwrites import jbd2
from logwrites.errors import LogwritesError, UsageError
from logwrites.forkserver import FORKSERVER_SO, ForkServer, ForkServerGone
from logwrites.imagechanges import ImageChanges
from logwrites.statebuild import clone_file

log = logging.getLogger(__name__)

VERDICTS: Final = ("pass", "fail", "error")
FILESYSTEMS: Final = ("ext4", "xfs", "btrfs")
DEFAULT_TIMEOUT_S: Final = 300.0
# The longest --timeout: epoll (selectors, asyncio, subprocess) counts its wait in int
# milliseconds, which overflow past 24.8 days; a week is far past any check or workload.
MAX_TIMEOUT_S: Final = 7 * 24 * 3600
TIMEOUT_LIMIT: Final = f"at most {MAX_TIMEOUT_S}, a week"      # for --help
_OUTPUT_LIMIT: Final = 64 << 10
_DRAIN_S: Final = 5.0  # reading what a killed checker's group wrote, at most
_EXT4_RECOVER: Final = 0x4  # s_feature_incompat bit: the journal needs replaying
_TOOLS: Final = {"ext4": ("e2fsck", "e2fsprogs"), "xfs": ("xfs_repair", "xfsprogs"),
                 "btrfs": ("btrfs", "btrfs-progs")}
# The LD_PRELOAD read recorder (logwrites/_readset_recorder.c, built by scripts/setup.sh).
READSET_RECORDER: Final = Path(__file__).resolve().with_name("_readset_recorder.so")
READSET_KEEP: Final = 4  # e2fsck runs remembered per thread (compared most recent first)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One checker's answer on one state: `verdict` is pass, fail or error (the checker could
    not say); `detail` is one line for tables, `output` what the checker printed."""

    verdict: str
    checker: str
    seconds: float
    detail: str = ""
    output: str = ""
    reused_from: str | None = None  # the checker did not run: this earlier check's answer


class ImageNotRestored(LogwritesError):
    """A checker that promised to leave the image as it found it could not be sure it did.
    `verdicts` are the answers of the check (valid); the image must be rebuilt."""

    def __init__(self, image: Path, why: str, verdicts: list[Verdict] | None = None) -> None:
        super().__init__(f"{image}: {why}")
        self.image, self.why, self.verdicts = image, why, verdicts or []


class _Unrestored(Exception):
    def __init__(self, result: tuple[str, str, str], why: str) -> None:
        super().__init__(why)
        self.result, self.why = result, why


class Checker(Protocol):
    name: str
    writes_image: bool  # True: give it a disposable copy (absent counts as True)

    def check(self, image: Path, *, expect_fs: bool,
              env: Mapping[str, str] | None = None) -> Verdict:
        """Check `image`, which a checker with `writes_image` may modify (it is then given a
        disposable copy); one without must leave it byte for byte as it found it, or raise
        `ImageNotRestored`. `env` tells user checkers about the state (LW_STATE,
        LW_STATE_KIND, LW_MARKS)."""
        ...


class GuestRunner(Protocol):
    """Boots the guest on a copy-on-write overlay of `image` and runs `script` inside, with
    the disk as LW_DEV. Returns (exit status, output); raises on a guest that cannot run."""

    def __call__(self, image: Path, script: Path, timeout_s: float,
                 env: Mapping[str, str]) -> tuple[int, str]: ...


def detect_fs(image: str | os.PathLike[str]) -> str | None:
    """The filesystem whose signature the image carries (ext4 covers ext2/3/4), or None."""
    with open(image, "rb") as f:
        head = f.read(1024 + 2048)
        f.seek(0x10040)
        btrfs = f.read(8)
    if head[:4] == b"XFSB":
        return "xfs"
    if len(head) >= 1024 + 58 and head[1024 + 56:1024 + 58] == b"\x53\xef":
        return "ext4"
    if btrfs == b"_BHRfS_M":
        return "btrfs"
    return None


def _run(argv: Sequence[str] | str, timeout_s: float,
         env: Mapping[str, str] | None = None) -> tuple[int | None, str]:
    """(status, the output's last _OUTPUT_LIMIT bytes); status None on a timeout. The command
    runs in its own process group, killed whole on a timeout (a shell's children would
    otherwise hold the pipes open), with the fsck tools' directories on its PATH."""
    proc = subprocess.Popen(argv, shell=isinstance(argv, str), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True,
                            env={**os.environ, "PATH": tool_path(), **(env or {})})
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    with proc.stdout:
        out, ended = _output_tail(proc.stdout.fileno(), deadline)
        status: int | None = None
        if ended:
            with contextlib.suppress(subprocess.TimeoutExpired):
                status = proc.wait(timeout=max(deadline - time.monotonic(), 0))
        if status is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            # What the group wrote before it died; bounded, in case a child left the group.
            more, _ = _output_tail(proc.stdout.fileno(), time.monotonic() + _DRAIN_S)
            out = (out + more)[-_OUTPUT_LIMIT:]
            proc.wait()
    return status, out.decode(errors="replace")


def _output_tail(fd: int, deadline: float) -> tuple[bytes, bool]:
    """The last _OUTPUT_LIMIT bytes read from `fd` until its end (True) or `deadline` (False),
    kept as they come: a checker that prints without end (`yes`) must not fill our memory."""
    tail = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return bytes(tail[-_OUTPUT_LIMIT:]), True
            tail += chunk
            if len(tail) > 2 * _OUTPUT_LIMIT:
                del tail[:-_OUTPUT_LIMIT]
    return bytes(tail[-_OUTPUT_LIMIT:]), False


def tool_path() -> str:
    """PATH with /usr/sbin and /sbin after it: e2fsck, xfs_repair and btrfs live there, and
    a user's PATH often lacks them (Debian's, for anyone but root)."""
    parts = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join([*parts, *(d for d in ("/usr/sbin", "/sbin") if d not in parts)])


def _last_line(text: str) -> str:
    """A checker's last words, for a verdict's detail: printable only, since the detail reaches
    the terminal (a checker's escape sequences must not retitle or clear it)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1][:200] if lines else ""
    return "".join(c if c.isprintable() else "?" for c in last)


class FsckChecker:
    """The filesystem's own read-only checker, after its journal recovery where the host can.
    Leaves the image as it found it (the journal replay is undone), so it needs no copy."""

    writes_image = False
    image_only = True  # the verdict depends on the image alone: identical states may share it
    takes_changes = True  # compares what it keeps between states only where the image changed

    def __init__(self, fs: str | None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 guest_runner: GuestRunner | None = None,
                 in_process_replay: bool = True, readset_reuse: bool = True,
                 readset_recorder: Path = READSET_RECORDER) -> None:
        """`guest_runner` recovers xfs logs in the guest (the kernel under test); without one,
        the default guest is booted when an xfs state needs it. `in_process_replay` False
        always recovers ext4 journals with e2fsck (the in-process replay's reference).
        `readset_reuse` (on unless LOGWRITES_READSET_REUSE=0): `e2fsck -fn` runs under the
        read recorder `readset_recorder`, and a later image holding the same bytes wherever
        one of the last `READSET_KEEP` runs read gets that run's answer (see `ReadSetCache`);
        without a usable recorder, e2fsck runs plain."""
        if fs is not None and fs not in FILESYSTEMS:
            raise UsageError(f"fsck knows {', '.join(FILESYSTEMS)}, not {fs!r}")
        self.fs, self.timeout_s, self.guest_runner = fs, timeout_s, guest_runner
        self.name = "fsck"
        self.guest_recoveries = 0  # xfs states whose log was recovered in the guest
        self.in_process_replay = in_process_replay
        self.journal_replays_in_process = 0  # ext4 journals replayed here (logwrites.jbd2)
        self.undo_in_process = 0  # journal replays rolled back here (jbd2 or apply_undo_file)
        self.undo_by_e2undo = 0   # ... and by the e2undo program (an undo file we did not trust)
        self.readset_reuse = readset_reuse and os.environ.get("LOGWRITES_READSET_REUSE") != "0"
        # e2fsck forked from a server held before main() (logwrites/forkserver.py) instead of
        # exec'd: ~1.5 ms less per run. LOGWRITES_FORKSERVER=0, or no server library: plain.
        self.forkserver = (os.environ.get("LOGWRITES_FORKSERVER") != "0"
                           and FORKSERVER_SO.is_file())
        self.forked_runs = 0  # e2fsck runs forked from the server
        self.readset_recorder = readset_recorder
        self.fsck_runs = 0           # e2fsck -fn processes started
        self.readset_reused = 0      # e2fsck -fn answers reused: the bytes it read unchanged
        self.readset_unrecorded = 0  # runs under the recorder that left no read set to keep
        self._recorder_usable: bool | None = None  # None: not tried yet
        self._recorder_missed = 0    # runs in a row the recorder left no file at all
        self._counts = threading.Lock()
        self._local = threading.local()  # per worker thread: its cache, the state it checks
        # The time the in-process journal replay stamps in the superblock (s_wtime): one per
        # checker, so states whose recovered images differ in nothing else stay byte-equal
        # for the read-set comparison. e2fsck only asks whether it lies in the future.
        self._replay_now = int(time.time())

    def check(self, image: Path, *, expect_fs: bool, env: Mapping[str, str] | None = None,
              changes: ImageChanges | None = None) -> Verdict:
        """`changes`: the record of every write to `image` (`ImageChanges`), when it has one:
        what this checker keeps from one state to the next is then compared only where the
        image was written since."""
        started = time.perf_counter()
        self._local.state = (env or {}).get("LW_STATE")
        self._local.reused = None
        self._local.changes = changes
        found = detect_fs(image)
        if found is None:
            seconds = time.perf_counter() - started
            if expect_fs:
                return Verdict("fail", self.name, seconds,
                               f"no {self.fs or 'filesystem'} signature on a state after mkfs")
            return Verdict("pass", self.name, seconds, "no filesystem signature yet (pre-mkfs)")
        fs = self.fs or found
        if found != fs:
            return Verdict("fail", self.name, time.perf_counter() - started,
                           f"signature says {found}, expected {fs}")
        try:
            status, output, detail = getattr(self, f"_{fs}")(image)
        except _Unrestored as err:
            status, output, detail = err.result
            verdict = Verdict(status, f"{self.name}:{fs}", time.perf_counter() - started,
                              detail, output, self._local.reused)
            raise ImageNotRestored(image, err.why, [verdict]) from None
        return Verdict(status, f"{self.name}:{fs}", time.perf_counter() - started, detail,
                       output, self._local.reused)

    def _ext4(self, image: Path) -> tuple[str, str, str]:
        with open(image, "rb", buffering=0) as f:
            superblock = os.pread(f.fileno(), _SUPERBLOCK_SIZE, _SUPERBLOCK_OFFSET)
        recovering = _needs_recovery(superblock)
        # An external journal's bytes are on another device, which is not compared.
        record = (self.readset_reuse and self._recorder_ok()
                  and not _ext4_journal_elsewhere(superblock))
        run: _Ext4Run | None = None
        if not recovering:
            run = self._ext4_check(image, "", record, replayed=False)
        elif self.in_process_replay:
            run = self._ext4_replay_in_process(image, record)
        if run is None:
            return self._ext4_replay_by_e2fsck(image, record)
        if run.after is not None:
            self._keep(image, run)  # the replay (if any) has been undone
        return self._answer(run)

    @staticmethod
    def _argv(image: Path) -> tuple[str, ...]:
        return ("e2fsck", "-fn", str(image))

    def _keep(self, image: Path, run: _Ext4Run) -> None:
        label = self._local.state or f"check #{self.fsck_runs}"
        self._readset_cache().add(image, self._argv(image), run, label, self._local.changes)

    def _answer(self, run: _Ext4Run) -> tuple[str, str, str]:
        """The run's verdict; a reused answer is counted and named."""
        if run.reused is not None:
            with self._counts:
                self.readset_reused += 1
            self._local.reused = run.reused.label
        return _run_verdict(run)

    def _ext4_replay_by_e2fsck(self, image: Path, record: bool) -> tuple[str, str, str]:
        # Replay the journal (e2fsck: "journal_only: only replay the journal if required"), as
        # the kernel would on mount, saving every block it overwrites in an undo file; check
        # read-only; then put the saved blocks back (e2undo).
        undo = _undo_path(image)
        undo.unlink(missing_ok=True)
        trusted = False
        try:
            status, out1 = _run(["e2fsck", "-E", "journal_only", "-y", "-z", str(undo),
                                 str(image)], self.timeout_s)
            # A killed or failing e2fsck may not have written the undo file's last keys.
            trusted = status is not None and 0 <= status < 8
            if status is None:
                result = "error", out1, "e2fsck journal replay timed out"
            elif status >= 8 or status < 0:
                result = "fail", out1, f"e2fsck journal replay: exit {status}: {_last_line(out1)}"
            else:
                # e2fsck does not say what its replay read: this run is kept for comparing
                # images after their replay only.
                run = self._ext4_check(image, out1, record, replayed=True)
                if run.after is not None:
                    self._keep(image, run)
                result = self._answer(run)
        finally:
            undone, out3 = self._undo(undo, image) if trusted else (None, "")
            undo.unlink(missing_ok=True)
        if not trusted or undone != 0:
            why = (f"e2undo exit {undone}: {_last_line(out3)}" if trusted
                   else "the journal replay did not finish cleanly")
            raise _Unrestored(result, why)
        return result

    def _ext4_replay_in_process(self, image: Path, record: bool) -> _Ext4Run | None:
        """Recover the journal here (logwrites.jbd2: what `e2fsck -E journal_only` leaves, one
        process fewer per state), check read-only, put the replayed blocks back; None when
        jbd2 does not handle this journal (nothing was changed: e2fsck recovers it).
        `record`: e2fsck runs under the read recorder, and the run's key before the replay
        adds the replay's own reads to e2fsck's."""
        fd = os.open(image, os.O_RDWR)
        try:
            try:
                plan = jbd2.plan(fd, now=self._replay_now, cache=self._journal_scans(),
                                 changes=self._local.changes)
            except jbd2.NotHandled as why:
                log.debug("%s: journal left to e2fsck: %s", image, why)
                return None
            except OSError as err:  # nothing was written, but an image that cannot be read
                out = f"in-process journal replay: {err}"  # is better rebuilt
                raise _Unrestored(("error", out, out), out) from None
            except Exception as err:  # a bug, not the image's fault; nothing was written
                log.warning("%s: in-process journal replay failed (%s); e2fsck recovers it",
                            image, err)
                log.debug("traceback", exc_info=True)
                return None
            out1 = (f"in-process journal replay (logwrites.jbd2): {plan.transactions} "
                    f"transactions, {plan.blocks} blocks\n")
            if record:
                # The same plan from the same bytes, and e2fsck's reads unchanged: the same
                # answer, with nothing written.
                earlier = self._readset_cache().find(image, self._argv(image),
                                                     before_replay=True, outcome=plan.outcome,
                                                     changes=self._local.changes)
                if earlier is not None:
                    return _Ext4Run(earlier.status, out1, earlier.output, reused=earlier)
            try:
                done = plan.apply()
            except OSError as err:  # its writes were put back, unless that failed too
                out = f"in-process journal replay: {err}"
                raise _Unrestored(("error", out, out), out) from None
            result = ("error", out1, "interrupted")
            try:
                run = self._ext4_check(image, out1, record, replayed=True)
                result = _run_verdict(run)
            finally:
                try:
                    done.restore()
                except OSError as err:
                    raise _Unrestored(result, f"putting the replayed blocks back: {err}"
                                      ) from None
        finally:
            os.close(fd)
        if run.after is not None:
            # The committed journal's end first: it changes most often.
            run.journal_reads = done.reads[::-1]
            run.outcome = done.outcome
        self.journal_replays_in_process += 1
        self.undo_in_process += 1
        return run

    def _journal_scans(self) -> jbd2.ScanCache:
        """This worker thread's journal scan cache: a worker's consecutive states share most
        of a journal; one cache shared by workers at different places in the log would hold
        the other worker's journal half the time and rescan it whole."""
        cache: jbd2.ScanCache | None = getattr(self._local, "journal_scans", None)
        if cache is None:
            cache = self._local.journal_scans = jbd2.ScanCache()
        return cache

    def _undo(self, undo: Path, image: Path) -> tuple[int | None, str]:
        """Put back the blocks e2fsck saved in `undo`: in this process when the undo file
        passes every check e2undo makes (`apply_undo_file`), else with `e2undo` itself."""
        try:
            applied = apply_undo_file(undo, image)
        except OSError as err:  # a write went wrong half-way: the image cannot be trusted
            return None, f"applying the undo file: {err}"
        if applied is not None:
            self.undo_in_process += 1
            return 0, ""
        self.undo_by_e2undo += 1
        status, out = _run(["e2undo", str(undo), str(image)], self.timeout_s)
        if status == 0 and "run e2fsck" in out:
            # e2undo replayed a damaged or unfinished undo file, then marked the superblock
            # not clean: the image is not what it was.
            status = 1
        return status, out

    def _ext4_check(self, image: Path, replay_out: str, record: bool, *,
                    replayed: bool) -> _Ext4Run:
        """`e2fsck -fn` on the image as it is (its journal recovered). `record`: an earlier
        answer is looked for first (under its key after the replay when the journal was
        `replayed` just now; else the image is as it was before any replay: under that key),
        else e2fsck runs under the read recorder and the ranges it read, with the bytes
        there, are kept in the run."""
        argv = self._argv(image)
        if not record:
            status, output = self._e2fsck(list(argv))
            return _Ext4Run(status, replay_out, output)
        cache = self._readset_cache()
        earlier = (cache.find(image, argv, before_replay=False) if replayed else
                   cache.find(image, argv, before_replay=True, outcome=None,
                              changes=self._local.changes))
        if earlier is not None:
            return _Ext4Run(earlier.status, replay_out, earlier.output, reused=earlier)
        status, output, ranges = self._e2fsck_recorded(list(argv), image)
        run = _Ext4Run(status, replay_out, output)
        if ranges is not None and status is not None:
            run.after = cache.read_ranges(image, ranges)
            run.replayed = replayed
        return run

    def _e2fsck(self, argv: list[str], env: Mapping[str, str] | None = None
                ) -> tuple[int | None, str]:
        with self._counts:
            self.fsck_runs += 1
        server = self._forkserver(argv, {"PATH": tool_path(), **(env or {})})
        if server is not None:
            try:
                status, out = server.run(self.timeout_s)
                with self._counts:
                    self.forked_runs += 1
                return status, out[-_OUTPUT_LIMIT:]
            except ForkServerGone as why:
                # Same answer either way, only slower: run it plainly from now on.
                log.warning("e2fsck fork server: %s; e2fsck runs plainly from now on", why)
                self.forkserver = False
                server.close()
                self._local.server = None
        return _run(argv, self.timeout_s, env)

    def _forkserver(self, argv: list[str], env: Mapping[str, str]) -> ForkServer | None:
        """This worker's fork server for `argv` and `env` (one per worker: its cursor image
        is one file, so the command line stays the same); a new one when they change or the
        image is another file (the read recorder learns the image's identity once)."""
        if not self.forkserver:
            return None
        try:
            st = os.stat(argv[-1])
        except OSError:
            return None
        key = (tuple(argv), tuple(sorted(env.items())), st.st_dev, st.st_ino)
        held: tuple[tuple, ForkServer] | None = getattr(self._local, "server", None)
        if held is not None and held[0] == key:
            return held[1]
        if held is not None:
            held[1].close()
        if getattr(self._local, "output", None) is None:
            self._local.output = _scratch_path(Path(argv[-1]), "fsck-out")
        server = ForkServer(argv, env, FORKSERVER_SO, self._local.output)
        self._local.server = (key, server)
        return server

    def _recorder_ok(self) -> bool:
        if self._recorder_usable is None:
            self._recorder_usable = self.readset_recorder.is_file()
            if not self._recorder_usable:
                log.warning("no read recorder at %s (scripts/setup.sh builds it): e2fsck -fn "
                            "runs plain, no verdict is reused by its read set",
                            self.readset_recorder)
        return self._recorder_usable

    def _readset_cache(self) -> ReadSetCache:
        cache: ReadSetCache | None = getattr(self._local, "readsets", None)
        if cache is None:
            cache = self._local.readsets = ReadSetCache()
        return cache

    def _e2fsck_recorded(self, argv: list[str], image: Path
                         ) -> tuple[int | None, str, list[tuple[int, int]] | None]:
        """(status, output, the ranges it read or None): e2fsck run under the read
        recorder."""
        # One name per worker: the command line, and so its fork server, stays the same.
        out_path = getattr(self._local, "readset_out", None)
        if out_path is None:
            out_path = self._local.readset_out = _scratch_path(image, "readset")
        out_path.unlink(missing_ok=True)  # a stale file must never pass for this run's
        preload = " ".join(p for p in (str(self.readset_recorder),
                                       os.environ.get("LD_PRELOAD", "")) if p)
        env = {"LD_PRELOAD": preload, "LW_READSET_IMAGE": str(image),
               "LW_READSET_OUT": str(out_path)}
        try:
            status, out = self._e2fsck(argv, env)
            produced = out_path.exists()
            ranges = load_readset(out_path)
        finally:
            out_path.unlink(missing_ok=True)
        if ranges is None or _e2fsck_answer(status) == "error":
            # No file after an answer (e2fsck exits normally then): the recorder did not
            # load, or could not write.
            self._unrecorded(image, not produced and _e2fsck_answer(status) != "error")
            return status, out, None
        self._recorder_missed = 0
        return status, out, ranges

    def _unrecorded(self, image: Path, recorder_silent: bool) -> None:
        """A run left no read set to keep. Three answered runs in a row without any file
        from the recorder mean it does not load here: stop asking for it."""
        with self._counts:
            self.readset_unrecorded += 1
            self._recorder_missed = self._recorder_missed + 1 if recorder_silent else 0
            if self._recorder_missed >= 3 and self._recorder_usable:
                self._recorder_usable = False
                log.warning("the read recorder %s left no read set for three e2fsck runs in "
                            "a row (%s): e2fsck -fn runs plain from now on, no verdict is "
                            "reused by its read set", self.readset_recorder, image)

    def _btrfs(self, image: Path) -> tuple[str, str, str]:
        status, out = _run(["btrfs", "check", "--readonly", str(image)], self.timeout_s)
        if status is None:
            return "error", out, "btrfs check timed out"
        if status == 0:
            return "pass", out, "clean"
        return "fail", out, f"btrfs check exit {status}: {_first_problem(out)}"

    def _xfs(self, image: Path) -> tuple[str, str, str]:
        status, out = _run(["xfs_repair", "-n", str(image)], self.timeout_s)
        if status is None:
            return "error", out, "xfs_repair -n timed out"
        words = " ".join(out.split())  # xfs_repair wraps its sentences over lines
        if "log which is being ignored" in words or "needs to be replayed" in words:
            # A dirty log: xfs_repair -n would report spurious inconsistencies, and no tool
            # of xfsprogs (6.1) replays a log; only a kernel mount does (DESIGN.md §5).
            return self._xfs_in_guest(image, out)
        if status == 0:
            return "pass", out, "clean"
        return "fail", out, f"xfs_repair -n exit {status}: {_first_problem(out)}"

    def _xfs_in_guest(self, image: Path, host_out: str) -> tuple[str, str, str]:
        """The guest boots on a disposable copy of the state, the kernel under test mounts it
        (its log recovery runs), unmounts it, and `xfs_repair -n` checks the recovered
        filesystem in the guest. A mount that fails is a failure of the state."""
        runner = self.guest_runner or _default_xfs_runner()
        copy = image.with_name(image.name + ".xfs-recover.img")
        script = image.with_name(image.name + ".xfs-recover.sh")
        script.write_text(_XFS_RECOVER_SCRIPT)
        try:
            clone_file(image, copy)
            status, out = runner(copy, script, self.timeout_s, {})
        except Exception as err:  # a guest that cannot boot is an error of this check
            log.debug("xfs log recovery in the guest failed", exc_info=True)
            return "error", host_out, f"xfs log recovery in the guest: {err}"
        finally:
            copy.unlink(missing_ok=True)
            script.unlink(missing_ok=True)
        self.guest_recoveries += 1
        output = f"{host_out}\n--- log recovered by a mount in the guest\n{out}"
        if status == 0:
            return "pass", output, "clean after log recovery (mounted in the guest)"
        if out.startswith("[setup]"):
            return ("fail", output, "the kernel could not mount the state (log recovery "
                    f"failed): {_last_line(out)}")
        problem = _first_problem(out.split("xfs_repair -n", 1)[-1].partition("\n")[2])
        return "fail", output, f"after log recovery in the guest, exit {status}: {problem}"


# Runs in the guest after the agent mounted the state at $LW_MNT (the kernel replayed the log).
_XFS_RECOVER_SCRIPT: Final = """#!/bin/sh
# logwrites fsck for xfs: the mount ran log recovery; check what it left, read-only.
cd / || exit 2
umount "$LW_MNT" || { echo "umount after log recovery failed"; exit 2; }
echo "xfs_repair -n $LW_DEV"
xfs_repair -n "$LW_DEV" 2>&1
status=$?
mount -t xfs -o ro "$LW_DEV" "$LW_MNT"  # the agent unmounts it after us
exit $status
"""


@functools.cache
def _default_xfs_runner() -> GuestRunner:
    """The default guest, for fsck on xfs when the caller gave no guest runner."""
    import argparse

    from logwrites.guestrecord import GuestCheckRunner  # boots guests: only when needed

    return GuestCheckRunner(argparse.Namespace(fs="xfs", kernel=None, modules=None))


@dataclass(slots=True)
class _Ext4Run:
    """One ext4 check: e2fsck's exit status and output and what the journal replay before it
    said; or the earlier check whose answer was `reused`. A recorded run also has `after`
    (the ranges e2fsck read and the bytes there: the image after its journal replay) and,
    when its replay said what it was made from, `journal_reads` (the ranges of the image,
    before the replay, that the replay depends on, with the bytes there) and `outcome`."""

    status: int | None
    replay_out: str
    output: str
    after: tuple[list[tuple[int, int]], list[bytes]] | None = None
    replayed: bool = False
    journal_reads: list[tuple[int, bytes]] | None = None
    outcome: tuple[int, int, int] | None = None  # where the replay's scan stopped (jbd2.Plan)
    reused: _ReadCheck | None = None


def _run_verdict(run: _Ext4Run) -> tuple[str, str, str]:
    reused = run.reused
    if reused is not None:
        return _ext4_verdict(reused.status, run.replay_out, reused.output, reused.label)
    return _ext4_verdict(run.status, run.replay_out, run.output, None)


def _ext4_verdict(status: int | None, replay_out: str, out2: str,
                  reused: str | None) -> tuple[str, str, str]:
    """(verdict, output, detail) for an `e2fsck -fn` status; `reused`: the state whose
    answer this is (e2fsck did not run)."""
    if reused is None:
        output = replay_out + "\n--- e2fsck -fn\n" + out2
        note = ""
    else:
        output = (f"{replay_out}\n--- e2fsck -fn: not run; every byte it read checking state "
                  f"{reused} is unchanged, so its answer then stands:\n{out2}")
        note = f" (reused: read set unchanged since state {reused})"
    answer = _e2fsck_answer(status)
    if answer == "error":
        why = "timed out" if status is None else f"could not check: exit {status}"
        return "error", output, f"e2fsck -fn {why}"
    if answer == "pass":
        return "pass", output, "clean" + note
    return "fail", output, f"e2fsck -fn exit {status}: {_first_problem(out2)}{note}"


def _e2fsck_answer(status: int | None) -> str:
    """What an `e2fsck -fn` exit status says: pass, fail, or error (it could not check)."""
    if status is None or (status >= 8 and status & 4 == 0) or status < 0:
        return "error"
    return "pass" if status == 0 else "fail"


_READSET_HEAD: Final = struct.Struct("<8sQQ")  # magic, flags, count (_readset_recorder.c)
_READSET_MAGIC: Final = b"LWRSET01"
_READSET_INCOMPLETE: Final = 0x1
_READSET_CHUNK: Final = 64 << 10   # compared piecewise: a difference stops the comparison early
_READSET_MAX_BYTES: Final = 256 << 20  # a run that read more is not kept
_S_FEATURE_COMPAT: Final = 0x5C
_S_JOURNAL_INUM: Final = 0xE0
_COMPAT_HAS_JOURNAL: Final = 0x4


def _ext4_journal_elsewhere(superblock: bytes) -> bool:
    """Whether the ext4 superblock says its journal lives on another device."""
    compat = int.from_bytes(superblock[_S_FEATURE_COMPAT:_S_FEATURE_COMPAT + 4], "little")
    inum = int.from_bytes(superblock[_S_JOURNAL_INUM:_S_JOURNAL_INUM + 4], "little")
    return bool(compat & _COMPAT_HAS_JOURNAL) and inum == 0


def load_readset(path: Path) -> list[tuple[int, int]] | None:
    """The (offset, length) ranges the read recorder wrote to `path`, cut into pieces of at
    most `_READSET_CHUNK` bytes; None when there is no complete record of a run that read the
    superblock (no file, torn, marked incomplete, or e2fsck read the image some way unseen)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < _READSET_HEAD.size:
        return None
    magic, flags, count = _READSET_HEAD.unpack_from(data)
    if magic != _READSET_MAGIC or flags & _READSET_INCOMPLETE \
            or len(data) != _READSET_HEAD.size + 16 * count:
        return None
    ranges: list[tuple[int, int]] = []
    total = 0
    for offset, length in struct.iter_unpack("<QQ", data[_READSET_HEAD.size:]):
        total += length
        for at in range(offset, offset + length, _READSET_CHUNK):
            ranges.append((at, min(_READSET_CHUNK, offset + length - at)))
    # The superblock is the first thing e2fsck reads: a record without it saw another file.
    if total > _READSET_MAX_BYTES or not any(
            o <= _SUPERBLOCK_OFFSET and _SUPERBLOCK_OFFSET + _SUPERBLOCK_SIZE <= o + n
            for o, n in ranges):
        return None
    return ranges


@dataclass(slots=True)
class _ReadCheck:
    """One `e2fsck -fn` run: what it was asked (argv, image size), its answer, and two keys:
    the ranges e2fsck read with the bytes there (the image after its journal replay), and
    every range the answer depends on with the bytes there before the replay (None when the
    replay did not say what it read)."""

    argv: tuple[str, ...]
    size: int
    after: tuple[list[tuple[int, int]], list[bytes]]
    before: tuple[list[tuple[int, int]], list[bytes]] | None
    status: int
    replay_out: str  # what the journal replay before it said (the same replay: same words)
    output: str
    label: str
    seen: tuple[ImageChanges, int] | None  # the image's record of writes, its generation then
    outcome: tuple[int, int, int] | None  # the replay's (jbd2.Plan.outcome), None: no replay


class ReadSetCache:
    """The last few `e2fsck -fn` runs of one worker, to answer for a later image without
    running e2fsck again, nor its journal replay when that can be proven the same.

    e2fsck reads the image only through pread (recorded by logwrites/_readset_recorder.c);
    what it does is a function of the bytes it reads, the image's size, its argv, its
    configuration (constant over a loop) and the clock, which it uses (as far as we know) to
    ask whether a time stored in the image lies in the future: later is never earlier, so a
    pass stays a pass (a failure for a future time, which only a wrong clock gives, might
    not). So an image of the same size, checked with the same argv, that holds at every
    range an earlier run read the bytes that run saw makes e2fsck read the same bytes in the
    same order (by induction over its reads) and answer the same: that answer is reused.
    That is the key *after* the journal replay. The in-process replay before it
    (logwrites.jbd2) is worked out first (`jbd2.Plan`, nothing written): given where its
    scan stopped (`Plan.outcome`, which the new journal past the last commit decides alone),
    its writes are a function of the bytes it was made from (`Plan.reads`), the size and the
    checker's fixed write time; so the image e2fsck saw is a function of the image before
    the replay at both read sets, and of the outcome: the key *before* the replay, which
    spares writing and undoing it as well. The key after it serves when the journal was
    replayed by e2fsck, which does not say what it read.
    Compared byte for byte (pread, then `==`), never hashed; pass and fail answers alike."""

    def __init__(self, keep: int = READSET_KEEP) -> None:
        self._checks: deque[_ReadCheck] = deque(maxlen=keep)

    def find(self, image: Path, argv: tuple[str, ...], *, before_replay: bool,
             outcome: tuple[int, int, int] | None = None,
             changes: ImageChanges | None = None) -> _ReadCheck | None:
        """The most recent run whose key (`before_replay` or after it) `image` holds
        unchanged, or None. Before the replay, the run's replay must have had the same
        `outcome` (None: no replay). `changes` (the image's record of writes): a key before
        the replay is compared only where the image was written since the run."""
        with open(image, "rb", buffering=0) as f:
            fd = f.fileno()
            size = os.fstat(fd).st_size
            for check in reversed(self._checks):
                key = check.before if before_replay else check.after
                if (key is None or check.argv != argv or check.size != size
                        or (before_replay and check.outcome != outcome)):
                    continue
                ranges, data = key
                if ranges and os.pread(fd, ranges[0][1], ranges[0][0]) != data[0]:
                    continue  # the piece that changes most often, first: most misses end here
                ranges, data = ranges[1:], data[1:]
                written = None
                if (before_replay and changes is not None and check.seen is not None
                        and check.seen[0] is changes):
                    written = changes.since(check.seen[1])
                if written is None:
                    if _unchanged(fd, ranges, data):
                        return check
                elif written.kept(zip((at for at, _ in ranges), data, strict=True),
                                  lambda at, n: os.pread(fd, n, at)):
                    return check
        return None

    @staticmethod
    def read_ranges(image: Path, ranges: list[tuple[int, int]]
                    ) -> tuple[list[tuple[int, int]], list[bytes]]:
        """`ranges` (cut into comparison pieces) and the bytes `image` holds there."""
        pieces = _chunked(ranges)
        with open(image, "rb", buffering=0) as f:
            fd = f.fileno()
            return pieces, [os.pread(fd, length, offset) for offset, length in pieces]

    def add(self, image: Path, argv: tuple[str, ...], run: _Ext4Run, label: str,
            changes: ImageChanges | None = None) -> None:
        """Keep a recorded run's answer under its key after the replay and, when it has
        one, under its key before the replay, read from `image` now (the replay has been
        undone; `changes` is the image's record of writes)."""
        assert run.after is not None and run.status is not None
        before = None
        if not run.replayed:  # both keys are one
            before = run.after
        elif run.journal_reads is not None:
            ranges, data = self.read_ranges(image, run.after[0])
            before = ([(at, len(d)) for at, d in run.journal_reads] + ranges,
                      [d for _, d in run.journal_reads] + data)
        size = os.stat(image).st_size
        seen = (changes, changes.generation) if changes is not None else None
        self._checks.append(_ReadCheck(argv, size, run.after, before, run.status,
                                       run.replay_out, run.output, label, seen, run.outcome))


def _chunked(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`ranges` in order, cut into pieces of at most `_READSET_CHUNK` bytes (a difference
    stops a comparison early)."""
    out: list[tuple[int, int]] = []
    for offset, length in ranges:
        for at in range(offset, offset + length, _READSET_CHUNK):
            out.append((at, min(_READSET_CHUNK, offset + length - at)))
    return out


def _unchanged(fd: int, ranges: list[tuple[int, int]], data: list[bytes]) -> bool:
    for (offset, length), then in zip(ranges, data, strict=True):
        if os.pread(fd, length, offset) != then:
            return False
    return True


def _needs_recovery(superblock: bytes) -> bool:
    """Whether the ext4 superblock says the journal holds transactions to replay."""
    incompat = int.from_bytes(superblock[0x60:0x64], "little")
    return bool(incompat & _EXT4_RECOVER)


def _ext4_needs_recovery(image: Path) -> bool:
    with open(image, "rb", buffering=0) as f:
        return _needs_recovery(os.pread(f.fileno(), _SUPERBLOCK_SIZE, _SUPERBLOCK_OFFSET))


class UndoFileRefused(Exception):
    """An e2fsck undo file this module will not apply itself (e2undo gets to judge it)."""


_UNDO_HEADER: Final = struct.Struct("<8sQQQIIIIIIII Q 436x I")  # lib/ext2fs/undo_io.c
_UNDO_KEY_BLOCK: Final = struct.Struct("<IIQ")  # magic, crc, reserved; keys follow
_UNDO_KEY: Final = struct.Struct("<QII")        # fsblk, blk_crc, size
_UNDO_MAGIC: Final = b"E2UNDO02"
_UNDO_KEY_MAGIC: Final = 0xCADECADE
_UNDO_FINISHED: Final = 0x1
_UNDO_FS_OFFSET: Final = 0x1  # f_compat: fs_offset is valid
_UNDO_MAX_EXTENT_BLOCKS: Final = 512
_UNDO_MAX_BYTES: Final = 256 << 20  # pre-images held in memory; past it, leave it to e2undo
_SUPERBLOCK_OFFSET: Final = 1024
_SUPERBLOCK_SIZE: Final = 1024
_S_MAGIC_AT: Final = 0x38  # u16 in the superblock; the undo file keeps it inverted
_undo_names = itertools.count()


# libext2fs's crc32c, the one undo files carry (no final inversion), or None.
_crc32c: Final = jbd2.crc32c


def _undo_path(image: Path) -> Path:
    """Where e2fsck writes its undo file: a tmpfs when there is one (the undo file lives for
    one check and undo_io fsyncs it, which costs nothing there), else next to the image."""
    return _scratch_path(image, "e2undo")


def _scratch_path(image: Path, suffix: str) -> Path:
    """A file for one check's scratch output: in a tmpfs when there is one, else beside
    the image."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else image.parent
    return where / f"lw-{os.getpid()}-{threading.get_ident()}-{next(_undo_names)}.{suffix}"


def apply_undo_file(undo: Path, image: Path) -> int | None:
    """Write the pre-images saved in e2fsck's undo file `undo` back onto `image`, as e2undo
    does, with every check e2undo makes first (header and key block checksums, block
    checksums, no unknown feature, the undo file finished, the image's superblock the one the
    undo file was written against); nothing is written unless all pass. No fsync: the image is
    a scratch crash state read back through the same page cache.

    Returns the number of extents written back, or None when the undo file is not one to
    apply here (an unexpected format, a failed check, no crc32c): the caller runs e2undo.
    :raise OSError: when reading or writing fails (the image may be half restored).
    """
    crc = _crc32c()
    if crc is None:
        return None
    try:
        extents, fs_offset, fs_block_size = _read_undo_file(undo, image, crc)
    except UndoFileRefused as err:
        log.debug("undo file %s left to e2undo: %s", undo, err)
        return None
    with open(image, "r+b", buffering=0) as f:
        for fsblk, data in sorted(extents, key=lambda x: x[0]):
            at = fs_offset + fsblk * fs_block_size
            if os.pwrite(f.fileno(), data, at) != len(data):
                raise OSError(f"short write at byte {at} of {image}")
    return len(extents)


def _read_undo_file(undo: Path, image: Path, crc: Callable[[int, bytes], int]
                    ) -> tuple[list[tuple[int, bytes]], int, int]:
    """(extents (fsblk, pre-image), fs_offset, fs_block_size) of a checked undo file."""
    with open(undo, "rb", buffering=0) as f:
        fd = f.fileno()

        def read(offset: int, length: int) -> bytes:
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise UndoFileRefused(f"short read of {length} bytes at {offset}")
            return data

        head = read(0, _UNDO_HEADER.size)
        (magic, num_keys, super_blk, key_blk, block_size, fs_block_size, sb_crc, state,
         f_compat, f_incompat, f_rocompat, _pad, fs_offset, header_crc) = _UNDO_HEADER.unpack(head)
        if magic != _UNDO_MAGIC:
            raise UndoFileRefused(f"magic {magic!r}")
        if crc(0xFFFFFFFF, head[:-4]) != header_crc:
            raise UndoFileRefused("header checksum")
        if not 1024 <= block_size <= 1 << 20 or fs_block_size == 0:
            raise UndoFileRefused(f"block sizes {block_size}, {fs_block_size}")
        if f_incompat or f_rocompat:
            raise UndoFileRefused("unknown undo file features")
        if not state & _UNDO_FINISHED:
            raise UndoFileRefused("undo file not finished")
        if not f_compat & _UNDO_FS_OFFSET:
            fs_offset = 0
        # The undo file applies to the filesystem exactly as e2fsck left it (e2undo's
        # check_filesystem): its copy of the superblock, magic inverted, must match.
        saved = bytearray(read(super_blk * block_size, _SUPERBLOCK_SIZE))
        magic_le = int.from_bytes(saved[_S_MAGIC_AT:_S_MAGIC_AT + 2], "little")
        saved[_S_MAGIC_AT:_S_MAGIC_AT + 2] = (~magic_le & 0xFFFF).to_bytes(2, "little")
        with open(image, "rb", buffering=0) as img:
            current = os.pread(img.fileno(), _SUPERBLOCK_SIZE, fs_offset + _SUPERBLOCK_OFFSET)
        if bytes(saved) != current:
            raise UndoFileRefused("the image's superblock is not the one the undo file expects")
        if crc(0xFFFFFFFF, bytes(saved)) != sb_crc:
            raise UndoFileRefused("superblock checksum")
        keys_per_block = block_size // _UNDO_KEY.size - 1
        extents: list[tuple[int, bytes]] = []
        total = 0
        lblk = key_blk
        for first in range(0, num_keys, keys_per_block):
            block = bytearray(read(lblk * block_size, block_size))
            key_magic, key_crc, _ = _UNDO_KEY_BLOCK.unpack_from(block)
            if key_magic != _UNDO_KEY_MAGIC:
                raise UndoFileRefused(f"key block magic at block {lblk}")
            block[4:8] = bytes(4)
            if crc(0xFFFFFFFF, bytes(block)) != key_crc:
                raise UndoFileRefused(f"key block checksum at block {lblk}")
            lblk += 1
            for k in range(min(keys_per_block, num_keys - first)):
                fsblk, blk_crc, size = _UNDO_KEY.unpack_from(
                    block, _UNDO_KEY_BLOCK.size + k * _UNDO_KEY.size)
                if size > _UNDO_MAX_EXTENT_BLOCKS * block_size:
                    raise UndoFileRefused(f"extent of {size} bytes at fs block {fsblk}")
                total += size
                if total > _UNDO_MAX_BYTES:
                    raise UndoFileRefused("more pre-images than this process holds")
                data = read(lblk * block_size, size)
                if crc(0xFFFFFFFF, data) != blk_crc:
                    raise UndoFileRefused(f"checksum of fs block {fsblk}")
                extents.append((fsblk, data))
                lblk += -(-size // block_size)
    return extents, fs_offset, fs_block_size


def _first_problem(output: str) -> str:
    """The first line of a checker's output that names a problem, for one-line reports."""
    skip = ("e2fsck", "Pass ", "Warning: skipping journal", "--- ", "Checking", "Opening",
            "Phase", "No modify flag set", "        - ")
    for line in output.splitlines():
        text = line.strip()
        if text and not text.startswith(skip):
            return text[:200]
    return _last_line(output)


class HostChecker:
    """`host:CMD`: CMD through the shell with `{image}` replaced by the image path. CMD may
    write, so it gets a copy (reflinked where the filesystem can, else sparse: O(image))."""

    writes_image = True

    def __init__(self, command: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not command.strip():
            raise UsageError("host: needs a command, e.g. host:'e2fsck -fn {image}'")
        self.command, self.timeout_s = command, timeout_s
        self.name = f"host:{command}"

    def check(self, image: Path, *, expect_fs: bool,
              env: Mapping[str, str] | None = None) -> Verdict:
        started = time.perf_counter()
        cmd = self.command.replace("{image}", shlex.quote(str(image)))
        if "{image}" not in self.command:
            cmd = f"{cmd} {shlex.quote(str(image))}"
        status, out = _run(cmd, self.timeout_s, env)
        seconds = time.perf_counter() - started
        if status is None:
            return Verdict("error", self.name, seconds, f"timed out after {self.timeout_s:g} s",
                           out)
        if status == 0:
            return Verdict("pass", self.name, seconds, "exit 0", out)
        if status in (126, 127):
            return Verdict("error", self.name, seconds,
                           f"command could not run (exit {status}): {_last_line(out)}", out)
        if status < 0:  # the checker died (the OOM killer, a crash): it gave no answer
            return Verdict("error", self.name, seconds,
                           f"killed by {signal.Signals(-status).name}: {_last_line(out)}", out)
        return Verdict("fail", self.name, seconds, f"exit {status}: {_last_line(out)}", out)


class GuestChecker:
    """`guest:PATH`: the guest boots on an overlay of the state and runs PATH inside."""

    writes_image = True  # the guest mounts the disk read-write (its recovery writes)

    def __init__(self, script: Path, runner: GuestRunner | None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not script.is_file():
            raise UsageError(f"guest checker {script} is not a file")
        self.script, self.runner, self.timeout_s = script, runner, timeout_s
        self.name = f"guest:{script}"

    def check(self, image: Path, *, expect_fs: bool,
              env: Mapping[str, str] | None = None) -> Verdict:
        started = time.perf_counter()
        if self.runner is None:
            return Verdict("error", self.name, 0.0, "no guest to run the checker in")
        try:
            status, out = self.runner(image, self.script, self.timeout_s, env or {})
        except Exception as err:  # a guest that cannot boot is an error of this state's check
            log.debug("guest checker failed", exc_info=True)
            return Verdict("error", self.name, time.perf_counter() - started, str(err))
        seconds = time.perf_counter() - started
        if status == 0:
            return Verdict("pass", self.name, seconds, "exit 0", out)
        return Verdict("fail", self.name, seconds, f"exit {status}: {_last_line(out)}", out)


def needs_guest(specs: list[str], fs: str | None) -> bool:
    """Whether checkers `specs` on `fs` boot guests: `guest:` ones, and `fsck` on xfs (its
    dirty-log states are recovered by the kernel under test)."""
    return any(s.startswith("guest:") for s in specs) or (fs == "xfs" and "fsck" in specs)


def require_timeout(seconds: float, option: str = "--timeout") -> float:
    """`option` (`--timeout`) as given. :raise UsageError: 0, negative, NaN, infinite or over
    `MAX_TIMEOUT_S` (argparse's float takes "nan", "inf" and "1e30", which sockets and event
    loops refuse, overflow on or never reach)."""
    if not seconds > 0:
        raise UsageError(f"{option} {seconds:g}: must be more than 0 seconds")
    if not math.isfinite(seconds):
        raise UsageError(f"{option} {seconds:g}: must be a finite number of seconds")
    if seconds > MAX_TIMEOUT_S:
        raise UsageError(f"{option} {seconds:g}: must be at most {MAX_TIMEOUT_S} seconds "
                         f"(a week)")
    return seconds


def parse_checker(spec: str, *, fs: str | None, guest_runner: GuestRunner | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> Checker:
    """`fsck`, `host:CMD` or `guest:PATH` as given to `--check`.

    :raise UsageError: for anything else, or `fsck` without a filesystem.
    """
    require_timeout(timeout_s)
    if spec == "fsck":
        if fs in (None, "none"):
            raise UsageError("--check fsck needs a filesystem (--fs ext4|xfs|btrfs)")
        return FsckChecker(fs, timeout_s, guest_runner)
    if spec.startswith("host:"):
        return HostChecker(spec[5:], timeout_s)
    if spec.startswith("guest:"):
        return GuestChecker(Path(spec[6:]), guest_runner, timeout_s)
    raise UsageError(f"--check {spec!r}: use fsck, host:CMD or guest:PATH")


def check_state(checkers: Sequence[Checker], image: Path, scratch: Path, *,
                expect_fs: bool, env: Mapping[str, str] | None = None,
                consume: bool = False, changes: ImageChanges | None = None) -> list[Verdict]:
    """Run every checker on `image`, which is left as it was: checkers that write get their
    own disposable copy at `scratch` (removed afterwards), the others run on it directly.

    With `consume`, the caller no longer needs `image`: the last checker runs on it directly
    whatever it does, saving a copy (the loop rebuilds the rare failing state it keeps).
    `changes`: the record of every write to `image`, for checkers that take it
    (`takes_changes`) and run on it directly.

    :raise ImageNotRestored: (carrying every verdict) when a checker could not promise that
        it left `image` as it found it; the caller must rebuild it.
    """
    verdicts: list[Verdict] = []
    lost: ImageNotRestored | None = None
    for k, checker in enumerate(checkers):
        consumed = consume and k == len(checkers) - 1
        in_place = consumed or not getattr(checker, "writes_image", True)
        target = image if in_place else scratch
        if not in_place:
            clone_file(image, scratch)
        try:
            if in_place and changes is not None and getattr(checker, "takes_changes", False):
                verdict = checker.check(target, expect_fs=expect_fs, env=env, changes=changes)
            else:
                verdict = checker.check(target, expect_fs=expect_fs, env=env)
        except ImageNotRestored as err:
            if not err.verdicts or not in_place:
                raise
            verdict, lost = err.verdicts[0], None if consumed else err
        finally:
            if not in_place:
                scratch.unlink(missing_ok=True)
        log.debug("%s on %s: %s (%s)", checker.name, image, verdict.verdict, verdict.detail)
        verdicts.append(verdict)
        if lost is not None:
            # Later checkers must not see a changed image: stop here, the caller rebuilds.
            raise ImageNotRestored(image, lost.why, verdicts)
    return verdicts


def combine(verdicts: Sequence[Verdict]) -> str:
    """A state passes when every checker passes; a failure outranks an error."""
    names = {v.verdict for v in verdicts}
    return "fail" if "fail" in names else "error" if "error" in names else "pass"


def require_tools(fs: str | None) -> None:
    """:raise UsageError: naming the package, if the fsck for `fs` is not installed."""
    if fs not in _TOOLS:
        return
    tool, package = _TOOLS[fs]
    if shutil.which(tool, path=tool_path()) is None:
        raise UsageError(f"{tool} is not installed: apt-get install {package}")


__all__ = ["READSET_RECORDER", "Checker", "FsckChecker", "GuestChecker", "GuestRunner",
           "HostChecker", "ImageNotRestored", "ReadSetCache", "UndoFileRefused", "Verdict",
           "apply_undo_file", "check_state", "combine", "detect_fs", "load_readset",
           "parse_checker", "require_tools"]
