#!/usr/bin/env python3
"""Crash-loop cost: incremental state building (one cursor, states built and undone in place)
against xfstests generic/482's pattern (replay from entry 0 for every FUA/flush point), on the
same recorded ext4 log; the old path (the cursor copied per state) alongside.

The log: `--log LOG --base IMAGE`, or recorded here on the host without a guest: QEMU's
blklogwrites driver in qemu-storage-daemon, exported through FUSE, attached to a loop device,
mkfs.ext4 + a mount + a workload of small fsync'd files (the host kernel's ext4 writes it; the
mark `mkfs` is added after mkfs's entries, as our agent does). Needs root, /dev/fuse and loop
devices for that; prints the figures and the ratios, `--json` for machines; no asserts.

Printed: entries, states; build ms per state against its position (deciles, each pattern);
per pattern the entries applied, build and check seconds, whole-loop seconds, states per minute
and the checker's share of the loop, with `e2fsck` (journal replay + -fn) as the checker; the
from-zero/in-place ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from logwrites.check import FsckChecker, check_state
from logwrites.crashstates import LogMap, enumerate_states, start_index
from logwrites.logfile import LogReader, LogWriter
from logwrites.statebuild import StateBuilder, build_from_zero


def record_on_host(workdir: Path, files: int, size_mb: int = 64) -> tuple[Path, Path]:
    """An ext4 log from the host kernel through QEMU blklogwrites; returns (log, base)."""
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
                        str(fuse)], check=True)
        with open(raw_log, "rb") as f:
            after_mkfs = int.from_bytes(f.read(24)[16:24], "little")
        loop = subprocess.run(["losetup", "-f", "--show", str(fuse)], check=True,
                              capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", loop, str(mnt)], check=True)
        for i in range(files):
            path = mnt / f"f{i % 50}"
            with open(path, "ab") as f:
                f.write(os.urandom(4096))
                f.flush()
                os.fsync(f.fileno())
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
    return [sum(values[i * n // 10:(i + 1) * n // 10]) / max(1, len(
        values[i * n // 10:(i + 1) * n // 10])) for i in range(10)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", type=Path)
    ap.add_argument("--base", type=Path)
    ap.add_argument("--files", type=int, default=1000,
                    help="fsync'd appends when recording (1000: about 9,000 entries)")
    ap.add_argument("--patterns", default="in-place,copy,from-zero",
                    help="in-place (the loop's path: no copy per state), copy (the cursor "
                         "copied per state, the old path), from-zero (xfstests generic/482)")
    ap.add_argument("--no-check", action="store_true", help="build only, no fsck")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where images live (a reflink-capable filesystem makes copies O(1))")
    ap.add_argument("--reflink-scratch", action="store_true",
                    help="make a loop-mounted XFS (reflink=1) scratch filesystem for the images")
    args = ap.parse_args()
    scratch_mnt = None
    if args.reflink_scratch:
        scratch_mnt = Path(tempfile.mkdtemp(prefix="lw-xfs-"))
        backing = scratch_mnt.with_suffix(".img")
        with open(backing, "wb") as f:
            f.truncate(8 << 30)
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(backing)], check=True)
        subprocess.run(["mount", "-o", "loop", str(backing), str(scratch_mnt)], check=True)
        args.workdir = scratch_mnt
    work = Path(tempfile.mkdtemp(prefix="lw-bench-", dir=args.workdir))
    fs_type = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True,
                             text=True, check=False).stdout.strip()
    try:
        t0 = time.perf_counter()
        if args.log:
            log, base = args.log, args.base
        else:
            log, base = record_on_host(work, args.files)
        record_s = time.perf_counter() - t0
        logmap = LogMap.read(log)
        states = enumerate_states(logmap, ["prefix"], start=start_index(logmap))
        checker = FsckChecker("ext4")
        figures: dict[str, object] = {
            "cores": os.cpu_count(), "python": platform.python_version(),
            "entries": len(logmap.entries), "epochs": len(logmap.epochs),
            "states": len(states), "record_seconds": round(record_s, 1),
            "image_filesystem": fs_type}

        def run(pattern: str) -> dict[str, object]:
            builds: list[float] = []
            check_s = 0.0
            applied = 0
            img, scratch = work / f"{pattern}.img", work / f"{pattern}-check.img"
            started = time.perf_counter()
            with LogReader(log) as reader:
                builder = StateBuilder(reader, logmap, base, work / f"build-{pattern}")
                for s in states:
                    b0 = time.perf_counter()
                    if pattern == "in-place":
                        # The loop's path: the cursor becomes the state, checked in place
                        # (e2fsck's journal replay undone), then the state's writes undone.
                        with builder.view(s, img) as image:
                            c0 = time.perf_counter()
                            builds.append(c0 - b0)
                            if not args.no_check:
                                verdicts = check_state([checker], image, scratch,
                                                       expect_fs=True)
                            check_s += time.perf_counter() - c0
                    else:
                        if pattern == "copy":  # the cursor copied per state (the old path)
                            builder.build_at_cursor(s, img)
                        else:
                            applied += build_from_zero(reader, logmap, base, s, img)
                        c0 = time.perf_counter()
                        builds.append(c0 - b0)
                        if not args.no_check:
                            verdicts = check_state([checker], img, scratch, expect_fs=True,
                                                   consume=True)
                        check_s += time.perf_counter() - c0
                    if not args.no_check:
                        assert verdicts[0].verdict == "pass", (s.id, verdicts[0].detail)
                builder.close()
                if pattern != "from-zero":
                    applied = builder.entries_applied
            total = time.perf_counter() - started
            return {"build_ms_by_decile": [round(x * 1e3, 2) for x in deciles(builds)],
                    "entries_applied": applied, "build_s": round(sum(builds), 2),
                    "check_s": round(check_s, 2), "loop_s": round(total, 2),
                    "checker_share": round(check_s / total, 3),
                    "states_per_min": round(60 * len(states) / total)}

        patterns = [p.strip() for p in args.patterns.split(",")]
        for pattern in patterns:
            figures[pattern] = run(pattern)
        if "from-zero" in figures and "in-place" in figures:
            zero, inc = figures["from-zero"], figures["in-place"]
            figures["build_ratio"] = round(zero["build_s"] / max(inc["build_s"], 1e-6), 1)  # type: ignore[index]
            figures["loop_ratio"] = round(zero["loop_s"] / inc["loop_s"], 1)  # type: ignore[index]
        figures["checker"] = "none" if args.no_check else "e2fsck journal replay + e2fsck -fn"
        if args.json:
            print(json.dumps(figures))
            return
        print(f"log: {figures['entries']} entries, {figures['epochs']} epochs, "
              f"{len(states)} prefix states from the mkfs mark; {os.cpu_count()} cores, "
              f"one job (recorded in {record_s:.0f} s); images on {fs_type}; checker: "
              f"{figures['checker']}")
        print("build ms per state, by decile of the state's position in the log:")
        for pattern in patterns:
            f = figures[pattern]
            print(f"  {pattern:10}", " ".join(f"{x:6.1f}" for x in f["build_ms_by_decile"]))  # type: ignore[index]
        print(f"{'pattern':10} {'entries':>9} {'build s':>8} {'check s':>8} {'loop s':>8} "
              f"{'states/min':>10} {'checker share':>13}")
        for pattern in patterns:
            f = figures[pattern]
            print(f"{pattern:10} {f['entries_applied']:9} {f['build_s']:8.2f} "  # type: ignore[index]
                  f"{f['check_s']:8.2f} {f['loop_s']:8.2f} {f['states_per_min']:10} "  # type: ignore[index]
                  f"{f['checker_share']:12.0%}")  # type: ignore[index]
        if "build_ratio" in figures:
            print(f"from-zero / in-place: building {figures['build_ratio']}x, whole loop "
                  f"{figures['loop_ratio']}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if scratch_mnt is not None:
            subprocess.run(["umount", str(scratch_mnt)], check=False)
            scratch_mnt.with_suffix(".img").unlink(missing_ok=True)
            scratch_mnt.rmdir()


if __name__ == "__main__":
    main()
