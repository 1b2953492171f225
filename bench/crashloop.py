#!/usr/bin/env python3
"""Crash-loop cost: our loop (one cursor per worker, states built and undone in place, the
checker on the cursor itself, verdicts of provably identical states reused, and e2fsck's
answer reused while every byte it read for a recent state is unchanged) against xfstests
generic/482's pattern (replay from entry 0 for every FUA/flush point, then check), on the same
recorded ext4 log; optionally the old path (the cursor copied per state) too.

The log: `--log LOG --base IMAGE`, or recorded here on the host without a guest: QEMU's
blklogwrites driver in qemu-storage-daemon, exported through FUSE, attached to a loop device,
mkfs.ext4 + a mount + a workload of fsync'd writes into 50 files (`--files` writes of
`--write-kb` KiB each, appended until the files reach their share of `--image-mb`, then
overwritten in place, as a database would; every 7th a rename and a directory fsync; the host
kernel's ext4 writes it; the mark `mkfs` is added after mkfs's entries, as our agent does).
Needs root, /dev/fuse and loop devices for that.

Replay-from-zero costs grow with the log (its payload and its length) while ours stay flat, so
checking every state that way may take hours: `--sample N` checks N evenly spaced states with
the from-zero (and copy) patterns and extrapolates their mean to the whole set (said so in the
output); our loop always checks every state. Both patterns' images live on the same kind of
filesystem (a tmpfs when the loop's cursor goes there), so the checker costs the same in both.

Printed: entries, payload, states; build ms per state against its position (deciles, each
pattern); per pattern the entries applied, build and check seconds, whole-loop seconds, states
per minute, the checker's share and how ext4 journals were recovered (in process by
logwrites.jbd2, or by e2fsck; `--journal-replay e2fsck` measures the path before jbd2, for
both patterns); how many states took an earlier verdict (`dedup`: a provably identical image;
`reused`: e2fsck not run because no byte it read for one of the last states changed — read
through logwrites/_readset_recorder.so; `--no-readset-reuse` turns that off for our loop, and
the `in-place-noreuse` pattern is our loop without it, i.e. before it, in the same run); the
from-zero/ours ratios; a paired ratio (each sampled
state built and checked both ways back to back, so both see the same load on a shared
machine; the sampled states lie far apart, so read-set reuse seldom applies there: the
whole-loop ratio is the one that shows it); and a verdict line against the issue's goal
(>= 10x over the whole loop on a log of >= 2,000 entries, checker-limited; judged on the
whole-loop ratio). Our loop runs twice when from-zero runs after it, once before and once
after, and its whole-loop time is the mean of the two: the host's speed drifts over a minute.
`--json` for machines; no asserts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from logwrites.check import FsckChecker, check_state
from logwrites.crashstates import CrashState, LogMap, enumerate_states, start_index
from logwrites.logfile import LogReader, LogWriter
from logwrites.loop import LoopOptions, existing_recording, run_loop
from logwrites.statebuild import StateBuilder, build_from_zero, memory_dir

PATTERNS = ("in-place", "in-place-noreuse", "in-place-nodedup", "copy", "from-zero")
OURS = ("in-place", "in-place-noreuse", "in-place-nodedup")
SAMPLED = ("copy", "from-zero")


def record_on_host(workdir: Path, files: int, size_mb: int = 64,
                   write_kb: int = 4, mkfs_opts: Sequence[str] = ()) -> tuple[Path, Path]:
    """An ext4 log from the host kernel through QEMU blklogwrites; returns (log, base).
    `files` fsync'd writes of `write_kb` KiB over 50 files, each file capped at its share of
    half the image (appends until then, overwrites in place after); `mkfs_opts` are added to
    mkfs.ext4's (e.g. `-b 1024`)."""
    for tool in ("qemu-storage-daemon", "mkfs.ext4", "losetup", "mount"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install qemu-system-x86 e2fsprogs util-linux")
    img, raw_log, fuse = workdir / "img", workdir / "raw.log", workdir / "fuse"
    base = workdir / "base.img"
    for path in (img, base):
        with open(path, "wb") as f:
            f.truncate(size_mb << 20)
    raw_log.write_bytes(b"")
    fuse.write_bytes(b"")
    qsd = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=data,filename={img}",
        "--blockdev", f"driver=file,node-name=logf,filename={raw_log}",
        "--blockdev", "driver=blklogwrites,node-name=lw,file=data,log=logf,log-sector-size=512",
        "--export", f"fuse,id=e,node-name=lw,mountpoint={fuse},writable=on"])
    loop = ""
    mnt = workdir / "mnt"
    mnt.mkdir()
    try:
        for _ in range(100):
            if fuse.stat().st_size > 0:
                break
            time.sleep(0.1)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        *mkfs_opts, str(fuse)], check=True)
        with open(raw_log, "rb") as f:
            after_mkfs = int.from_bytes(f.read(24)[16:24], "little")
        loop = subprocess.run(["losetup", "-f", "--show", str(fuse)], check=True,
                              capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", loop, str(mnt)], check=True)
        chunk = write_kb << 10
        cap = max(chunk, (size_mb << 20) // 2 // 50 // chunk * chunk)
        for i in range(files):
            path = mnt / f"f{i % 50}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, os.urandom(chunk), (i // 50) * chunk % cap)
                os.fsync(fd)
            finally:
                os.close(fd)
            if i % 7 == 0:
                os.replace(path, mnt / f"r{i % 13}")
                dirfd = os.open(mnt, os.O_RDONLY)
                os.fsync(dirfd)
                os.close(dirfd)
        subprocess.run(["umount", str(mnt)], check=True)
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        qsd.terminate()
        qsd.wait(30)
    log = workdir / "ext4.log"
    with LogReader(raw_log) as reader, LogWriter.create(log, reader.sectorsize) as writer:
        for e in reader.entries():
            if e.nr_sectors and not e.is_discard:
                writer.append_write(e.sector, e.nr_sectors, [reader.read_payload(e)], e.flags)
            elif e.is_discard:
                writer.append_discard(e.sector, e.nr_sectors, e.flags & ~4)
            elif e.is_mark:
                writer.append_mark(e.mark or "mark")
            else:
                writer.append_flush()
            if e.index == after_mkfs - 1:
                writer.append_mark("mkfs")
        writer.commit()
    return log, base


def deciles(values: list[float]) -> list[float]:
    n = len(values)
    if n == 0:
        return []
    return [sum(part) / len(part) for part in (values[i * n // 10:max((i + 1) * n // 10,
                                                                       i * n // 10 + 1)]
                                               for i in range(10)) if part]


def sample(states: list[CrashState], n: int | None) -> list[CrashState]:
    """`n` evenly spaced states (first and last included), or all of them."""
    if n is None or n >= len(states):
        return states
    if n <= 1:
        return states[-1:]
    return [states[round(k * (len(states) - 1) / (n - 1))] for k in range(n)]


def journal_replays(checker: FsckChecker) -> dict[str, int]:
    """How the checker recovered ext4 journals: in this process (logwrites.jbd2) or by
    e2fsck (`-E journal_only`, rolled back with its undo file)."""
    by_e2fsck = checker.undo_in_process - checker.journal_replays_in_process
    return {"in_process": checker.journal_replays_in_process,
            "by_e2fsck": by_e2fsck + checker.undo_by_e2undo}


def run_ours(log: Path, base: Path, states: list[CrashState], work: Path, dedup: bool,
             readset: bool, check: bool, jbd2: bool) -> dict[str, object]:
    """The loop itself (logwrites.loop.run_loop), one job, the built-in fsck as the checker;
    `dedup`: identical states share verdicts; `readset`: e2fsck's answer is reused while the
    bytes it read are unchanged."""
    fsck = FsckChecker("ext4", in_process_replay=jbd2, readset_reuse=readset)
    checkers = [fsck] if check else [_NoCheck()]
    options = LoopOptions(kinds=("prefix",), jobs=1, shrink=False, dedup=dedup)
    result = run_loop(existing_recording(log, base, "ext4")(work), checkers, options,
                      work / f"loop-{dedup}-{readset}")
    assert len(result.results) == len(states)
    builds = [r.build_seconds for r in result.results]
    checks = [r.seconds - r.build_seconds for r in result.results]
    return {"states_checked": len(result.results), "sampled": False,
            "build_ms_by_decile": [round(x * 1e3, 3) for x in deciles(builds)],
            "entries_applied": result.entries_applied, "build_s": round(sum(builds), 2),
            "check_s": round(sum(checks), 2), "loop_s": round(result.seconds, 2),
            "checker_share": round(sum(checks) / result.seconds, 3),
            "deduplicated": result.deduplicated,
            "readset_reused": result.readset_reused,
            "readset_reused_share": round(result.readset_reused / max(1, len(states)), 3),
            "e2fsck_runs": fsck.fsck_runs,
            "check_ms_per_checked_state": round(
                1e3 * sum(checks) / max(1, len(states) - result.deduplicated), 1),
            "not_pass": [r.state.id for r in result.results if r.verdict != "pass"],
            "journal_replays": journal_replays(fsck),
            "states_per_min": round(60 * len(states) / result.seconds)}


class _NoCheck:
    """--no-check: a checker that passes at once (building only)."""

    name, writes_image, image_only = "none", False, True

    def check(self, image: Path, *, expect_fs: bool, env: object = None) -> object:
        from logwrites.check import Verdict

        return Verdict("pass", self.name, 0.0)


def run_theirs(pattern: str, log: Path, base: Path, logmap: LogMap, every: list[CrashState],
               picked: list[CrashState], work: Path, images: Path, check: bool, jbd2: bool,
               readset: bool) -> dict[str, object]:
    """`from-zero` (generic/482: copy the base, replay entries 0..state, check) or `copy` (the
    cursor copied per state, the old path) on the `picked` states; whole-set figures are the
    sample's mean times the number of states. Theirs runs e2fsck on every state; the paired
    ours has its own checker (read-set reuse as `readset`)."""
    checker = FsckChecker("ext4", in_process_replay=jbd2, readset_reuse=False)
    my_checker = FsckChecker("ext4", in_process_replay=jbd2, readset_reuse=readset)
    builds: list[float] = []
    checks: list[float] = []
    paired: list[float] = []
    applied = 0
    not_pass = []
    img, scratch = images / f"{pattern}.img", images / f"{pattern}-check.img"
    with LogReader(log) as reader:
        builder = StateBuilder(reader, logmap, base, work / f"build-{pattern}")
        ours = StateBuilder(reader, logmap, base, work / f"paired-{pattern}")

        def theirs(s: CrashState) -> None:
            nonlocal applied
            b0 = time.perf_counter()
            if pattern == "copy":
                builder.build_at_cursor(s, img)
            else:
                applied += build_from_zero(reader, logmap, base, s, img)
            c0 = time.perf_counter()
            builds.append(c0 - b0)
            if check:
                verdicts = check_state([checker], img, scratch, expect_fs=True, consume=True)
                if verdicts[0].verdict != "pass":
                    not_pass.append(s.id)
            checks.append(time.perf_counter() - c0)
            img.unlink(missing_ok=True)

        def mine(s: CrashState) -> None:
            # The same state our way, right beside theirs: both see the same machine load
            # (on a shared machine the load moves between two separate runs). Ours here also
            # pays for moving the cursor across the states between two sampled ones.
            p0 = time.perf_counter()
            with ours.view(s, img) as image:
                if check:
                    check_state([my_checker], image, scratch, expect_fs=True,
                                changes=ours.changes_of(image))
            paired.append(time.perf_counter() - p0)

        for k, s in enumerate(picked):
            for step in ((theirs, mine) if k % 2 else (mine, theirs)):
                step(s)
        builder.close()
        ours.close()
        if pattern == "copy":
            applied = builder.entries_applied
    scale = len(every) / len(picked)
    loop_s = (sum(builds) + sum(checks)) * scale
    return {"states_checked": len(picked), "sampled": len(picked) < len(every),
            "build_ms_by_decile": [round(x * 1e3, 3) for x in deciles(builds)],
            "entries_applied": round(applied * scale), "build_s": round(sum(builds) * scale, 2),
            "check_s": round(sum(checks) * scale, 2), "loop_s": round(loop_s, 2),
            "checker_share": round(sum(checks) / max(1e-9, sum(builds) + sum(checks)), 3),
            "not_pass": not_pass, "states_per_min": round(60 * len(every) / loop_s),
            "journal_replays": {k: v + journal_replays(my_checker)[k]  # theirs + paired ours
                                for k, v in journal_replays(checker).items()},
            "paired_ours_readset_reused": my_checker.readset_reused,
            "paired_ms_per_state": round(1e3 * (sum(builds) + sum(checks)) / len(picked), 1),
            "paired_ours_ms_per_state": round(1e3 * sum(paired) / len(picked), 1),
            "paired_ratio": round((sum(builds) + sum(checks)) / sum(paired), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", type=Path)
    ap.add_argument("--base", type=Path)
    ap.add_argument("--files", type=int, default=1000,
                    help="fsync'd writes when recording (1000 x 4 KiB: about 7,700 entries)")
    ap.add_argument("--write-kb", type=int, default=4, help="KiB per fsync'd write")
    ap.add_argument("--image-mb", type=int, default=64, help="size of the recorded image")
    ap.add_argument("--patterns", default="in-place,in-place-noreuse,from-zero",
                    help="in-place (our loop), in-place-noreuse (our loop without read-set "
                         "reuse: e2fsck runs on every state that is not a provable repeat), "
                         "in-place-nodedup (our loop, no verdict reuse of either kind), "
                         "copy (the cursor copied per state, the old path), from-zero "
                         "(xfstests generic/482)")
    ap.add_argument("--no-readset-reuse", action="store_true",
                    help="in-place and the paired ours run e2fsck on every state that is not "
                         "a provable repeat, as before read-set reuse")
    ap.add_argument("--sample", type=int, default=None,
                    help="check only N evenly spaced states with copy and from-zero and "
                         "extrapolate (our loop checks every state)")
    ap.add_argument("--no-check", action="store_true", help="build only, no fsck")
    ap.add_argument("--journal-replay", choices=("jbd2", "e2fsck"), default="jbd2",
                    help="how fsck recovers ext4 journals, in both patterns: in process "
                         "(logwrites.jbd2, e2fsck's path where it refuses) or always with "
                         "e2fsck -E journal_only (the path before jbd2)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the recording and copies live (default: the system's temp)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    patterns = [p.strip() for p in args.patterns.split(",")]
    for p in patterns:
        if p not in PATTERNS:
            ap.error(f"unknown pattern {p!r} (known: {', '.join(PATTERNS)})")
    work = Path(tempfile.mkdtemp(prefix="lw-bench-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        if args.log:
            log, base = args.log, args.base
        else:
            log, base = record_on_host(work, args.files, args.image_mb, args.write_kb)
        record_s = time.perf_counter() - t0
        os.sync()  # the recording's writeback would otherwise land on the first pattern run
        logmap = LogMap.read(log)
        states = enumerate_states(logmap, ["prefix"], start=start_index(logmap))
        picked = sample(states, args.sample)
        payload = sum(e.nr_sectors for e in logmap.entries if e.is_write) * logmap.sectorsize
        # Copies of the other patterns go where our cursor goes, so the checker (whose journal
        # replay fsyncs the image) costs the same for both.
        shm = memory_dir(os.path.getsize(base))
        images = Path(tempfile.mkdtemp(prefix="lw-bench-img-", dir=shm)) if shm else work
        fs_type = subprocess.run(["stat", "-f", "-c", "%T", str(images)], capture_output=True,
                                 text=True, check=False).stdout.strip()
        figures: dict[str, object] = {
            "cores": os.cpu_count(), "python": platform.python_version(),
            "entries": len(logmap.entries), "epochs": len(logmap.epochs),
            "payload_mib": round(payload / (1 << 20), 1), "image_mib": round(
                os.path.getsize(base) / (1 << 20)),
            "states": len(states), "sampled_states": len(picked),
            "record_seconds": round(record_s, 1), "image_filesystem": fs_type,
            "load": [round(x, 2) for x in os.getloadavg()],
            "checker": "none" if args.no_check else (
                "journal replay in process (logwrites.jbd2) + e2fsck -fn"
                if args.journal_replay == "jbd2" else "e2fsck journal replay + e2fsck -fn")}
        def ours_once(pattern: str) -> dict[str, object]:
            return run_ours(log, base, states, work, pattern != "in-place-nodedup",
                            pattern == "in-place" and not args.no_readset_reuse,
                            not args.no_check, args.journal_replay == "jbd2")

        try:
            for pattern in patterns:
                if pattern in OURS:
                    figures[pattern] = ours_once(pattern)
                else:
                    figures[pattern] = run_theirs(pattern, log, base, logmap, states, picked,
                                                  work, images, not args.no_check,
                                                  args.journal_replay == "jbd2",
                                                  not args.no_readset_reuse)
            ours = next((p for p in OURS if p in figures), None)
            if ours and "from-zero" in patterns and patterns.index(ours) < patterns.index(
                    "from-zero"):
                # Once more after from-zero: the host's speed drifts over a minute, and the
                # mean of a run before and one after sees the same drift as from-zero did.
                again, first = ours_once(ours), figures[ours]
                runs = [first["loop_s"], again["loop_s"]]  # type: ignore[index]
                first["loop_s_runs"] = runs  # type: ignore[index]
                first["loop_s"] = round(sum(runs) / 2, 2)  # type: ignore[index]
                first["states_per_min"] = round(60 * len(states) / first["loop_s"])  # type: ignore[index]
        finally:
            if images != work:
                shutil.rmtree(images, ignore_errors=True)
        figures["readset_reuse"] = not args.no_readset_reuse
        if "from-zero" in figures and ours:
            zero, inc = figures["from-zero"], figures[ours]
            figures["build_ratio"] = round(zero["build_s"] / max(inc["build_s"], 1e-6), 1)  # type: ignore[index]
            figures["loop_ratio"] = round(zero["loop_s"] / inc["loop_s"], 1)  # type: ignore[index]
            for other in OURS:
                if other in figures and other != ours:
                    figures[f"loop_ratio_{other.removeprefix('in-place-')}"] = round(
                        zero["loop_s"] / figures[other]["loop_s"], 1)  # type: ignore[index]
            figures["paired_ratio"] = zero["paired_ratio"]  # type: ignore[index]
            figures["goal_met"] = bool(figures["loop_ratio"] >= 10 and len(logmap.entries) >= 2000)
        figures["load_after"] = [round(x, 2) for x in os.getloadavg()]
        if args.json:
            print(json.dumps(figures))
            return
        report(figures, patterns, ours)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(figures: dict, patterns: list[str], ours: str | None) -> None:
    print(f"log: {figures['entries']} entries ({figures['payload_mib']} MiB of payload, "
          f"{figures['image_mib']} MiB image), {figures['epochs']} epochs, {figures['states']} "
          f"prefix states from the mkfs mark; {figures['cores']} cores, one job (recorded in "
          f"{figures['record_seconds']:.0f} s); images on {figures['image_filesystem']}; "
          f"checker: {figures['checker']}; load average {figures['load']} before, "
          f"{figures['load_after']} after")
    if figures["sampled_states"] < figures["states"]:
        print(f"copy/from-zero: {figures['sampled_states']} evenly spaced states checked, "
              "whole-set figures extrapolated from their mean; ours: every state")
    print("build ms per state, by decile of the state's position in the log:")
    for pattern in patterns:
        f = figures[pattern]
        print(f"  {pattern:17}", " ".join(f"{x:7.2f}" for x in f["build_ms_by_decile"]))
    print(f"{'pattern':17} {'entries':>10} {'build s':>9} {'check s':>8} {'loop s':>9} "
          f"{'states/min':>10} {'checker':>8} {'dedup':>6} {'reused':>7} {'e2fsck':>7}")
    for pattern in patterns:
        f = figures[pattern]
        mark = "~" if f["sampled"] else " "
        print(f"{pattern:17} {mark}{f['entries_applied']:9} {f['build_s']:9.2f} "
              f"{f['check_s']:8.2f} {f['loop_s']:9.2f} {f['states_per_min']:10} "
              f"{f['checker_share']:8.0%} {f.get('deduplicated', '-'):>6} "
              f"{f.get('readset_reused', '-'):>7} {f.get('e2fsck_runs', '-'):>7}")
        if f["not_pass"]:
            print(f"  {len(f['not_pass'])} states did not pass: {f['not_pass'][:5]}")
        if "journal_replays" in f and pattern not in SAMPLED:
            j = f["journal_replays"]
            print(f"  journal replays: {j['in_process']} in process (jbd2), {j['by_e2fsck']} "
                  f"by e2fsck")
        elif "journal_replays" in f:
            j = f["journal_replays"]
            print(f"  journal replays (from-zero and the paired ours): {j['in_process']} in "
                  f"process (jbd2), {j['by_e2fsck']} by e2fsck")
    if ours and f"{ours}" in figures and "check_ms_per_checked_state" in figures[ours]:
        f = figures[ours]
        print(f"checker: {f['check_ms_per_checked_state']} ms per checked state (ours); "
              f"e2fsck's answer reused on {f['readset_reused']} of {figures['states']} states "
              f"({f['readset_reused_share']:.0%}) because no byte it read had changed"
              + ("" if figures["readset_reuse"] else " (--no-readset-reuse)"))
    if "loop_ratio" in figures:
        names = {"noreuse": "without read-set reuse", "nodedup": "without verdict reuse"}
        extra = "".join(f" ({figures[f'loop_ratio_{k}']}x {v})" for k, v in names.items()
                        if f"loop_ratio_{k}" in figures)
        runs = figures[ours].get("loop_s_runs")
        when = (f" (ours: mean of {runs[0]} s before from-zero and {runs[1]} s after it)"
                if runs else "")
        print(f"from-zero / ours: building {figures['build_ratio']}x, whole loop "
              f"{figures['loop_ratio']}x{extra}{when}")
        z = figures["from-zero"]
        print(f"paired on the {figures['sampled_states']} sampled states (each state both ways, "
              f"back to back): from-zero {z['paired_ms_per_state']} ms/state, ours "
              f"{z['paired_ours_ms_per_state']} ms/state: {figures['paired_ratio']}x")
        share = figures[ours]["checker_share"]
        print(f"verdict: goal (>= 10x over the whole loop, >= 2,000 entries) "
              f"{'MET' if figures['goal_met'] else 'NOT MET'}: {figures['loop_ratio']}x on "
              f"{figures['entries']} entries ({figures['paired_ratio']}x paired); our loop is "
              f"{share:.0%} checker, "
              f"{'checker-limited' if share >= 0.8 else 'not checker-limited'}")


if __name__ == "__main__":
    main()
