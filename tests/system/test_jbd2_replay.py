"""logwrites.jbd2 against e2fsck's own journal recovery, on real ext4 crash states.

Each log is recorded from the host kernel's ext4 through QEMU's blklogwrites driver (as
bench/crashloop.py records it: fsync'd writes, renames, directory fsyncs), so the journals
hold real transactions, revokes, escaped blocks and wrap-arounds. For prefix and reordered
crash states whose superblock asks for recovery, the image after our replay must be byte for
byte the image after `e2fsck -E journal_only -y` on a copy, with two superblock fields taken
from e2fsck's result before comparing (the checksum is then recomputed, so it is checked too):
`s_wtime` (e2fsck stamps its clock: a different second is not a difference) and
`s_kbytes_written` (e2fsck adds what its I/O layer counted, an artefact of its write cache).
Restoring the pre-images must give back the state's bytes exactly.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from logwrites import jbd2
from logwrites.check import FsckChecker, _ext4_needs_recovery, check_state
from logwrites.crashstates import LogMap, enumerate_states, start_index
from logwrites.logfile import LogReader
from logwrites.statebuild import build_from_zero
from tests.conftest import PROJECT, require_tool

# mkfs.ext4 options, then the block size and the journal features they must give.
VARIANTS = {
    # Debian 12's defaults (metadata_csum, 64bit); mkfs picks 1 KiB blocks below 512 MiB.
    "4k-metadata_csum": (("-b", "4096"), 4096,
                         jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V3 | jbd2.JBD2_FEATURE_INCOMPAT_64BIT),
    "1k-metadata_csum": (("-b", "1024"), 1024,
                         jbd2.JBD2_FEATURE_INCOMPAT_CSUM_V3 | jbd2.JBD2_FEATURE_INCOMPAT_64BIT),
    "4k-plain": (("-b", "4096", "-O", "^metadata_csum,^64bit"), 4096, 0),  # 32-bit tags
}


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_crashloop",
                                                  PROJECT / "bench" / "crashloop.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _masked_like(ours: bytes, theirs: bytes) -> bytes:
    """`ours` with e2fsck's s_wtime and s_kbytes_written, its checksum recomputed."""
    sb = bytearray(ours[1024:2048])
    for at, size in ((jbd2.S_WTIME, 4), (jbd2.S_KBYTES_WRITTEN, 8)):
        sb[at:at + size] = theirs[1024 + at:1024 + at + size]
    if int.from_bytes(sb[jbd2.S_FEATURE_RO_COMPAT:jbd2.S_FEATURE_RO_COMPAT + 4],
                      "little") & jbd2.RO_COMPAT_METADATA_CSUM:
        crc = jbd2.crc32c()
        assert crc is not None
        sb[jbd2.S_CHECKSUM:] = crc(0xFFFFFFFF, bytes(sb[:jbd2.S_CHECKSUM])).to_bytes(4, "little")
    return ours[:1024] + bytes(sb) + ours[2048:]


def _journal_super(image: Path) -> jbd2.JournalSuper:
    with open(image, "rb") as f:
        return jbd2.journal_super_of(f.fileno())


def _differing_blocks(a: bytes, b: bytes, bs: int) -> list[int]:
    return [k for k in range(0, min(len(a), len(b)), bs) if a[k:k + bs] != b[k:k + bs]][:10]


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_in_process_replay_matches_e2fsck_journal_only(variant: str, tmp_path: Path) -> None:
    for tool, package in (("qemu-storage-daemon", "qemu-system-x86"), ("e2fsck", "e2fsprogs"),
                          ("losetup", "util-linux")):
        require_tool(tool, package)
    mkfs_opts, blocksize, features = VARIANTS[variant]
    log, base = _bench().record_on_host(tmp_path, files=60, size_mb=32, mkfs_opts=mkfs_opts)
    logmap = LogMap.read(log)
    states = enumerate_states(logmap, ["prefix", "reorder"], start=start_index(logmap),
                              max_states=3)
    fresh, theirs, ours = tmp_path / "fresh.img", tmp_path / "theirs.img", tmp_path / "ours.img"
    compared: collections.Counter[str] = collections.Counter()
    refused: collections.Counter[str] = collections.Counter()
    transactions = replayed = kbytes_same = seen_features = 0
    cache = jbd2.ScanCache()  # as the checker uses it: states in log order
    with LogReader(log) as reader:
        for state in states[::2]:
            build_from_zero(reader, logmap, base, state, fresh)
            if not _ext4_needs_recovery(fresh):
                continue
            want = fresh.read_bytes()
            jsb = _journal_super(fresh)
            assert jsb.blocksize == blocksize
            seen_features |= jsb.incompat  # the kernel sets them at its first mount
            shutil.copyfile(fresh, theirs)
            run = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(theirs)],
                                 capture_output=True, text=True, check=False)
            assert run.returncode < 4, (state.id, run.stdout, run.stderr)
            shutil.copyfile(fresh, ours)
            fd = os.open(ours, os.O_RDWR)
            try:
                try:
                    done = jbd2.replay(fd, cache=cache)
                except jbd2.NotHandled as why:
                    refused[str(why).split(" in transaction")[0]] += 1
                    assert ours.read_bytes() == want, f"{state.id}: refused but changed"
                    continue
                got, expected = ours.read_bytes(), theirs.read_bytes()
                assert got[1024:2048] != want[1024:2048]  # RECOVER cleared at least
                if _masked_like(got, expected) != expected:
                    bs = 1024 << int.from_bytes(want[1024 + 0x18:1024 + 0x1C], "little")
                    pytest.fail(f"{state.id} ({done.transactions} transactions, {done.blocks} "
                                f"blocks): differs from e2fsck's in blocks "
                                f"{_differing_blocks(_masked_like(got, expected), expected, bs)}")
                kb = slice(1024 + jbd2.S_KBYTES_WRITTEN, 1024 + jbd2.S_KBYTES_WRITTEN + 8)
                kbytes_same += got[kb] == expected[kb]
                done.restore()
                assert ours.read_bytes() == want, f"{state.id}: restore left a difference"
            finally:
                os.close(fd)
            compared[state.kind] += 1
            transactions += done.transactions
            replayed += done.blocks
    print(f"{variant}: journal features {seen_features:#x}, {len(logmap.entries)} entries, "
          f"{len(states)} states; compared "
          f"{dict(compared)}, {transactions} transactions, {replayed} blocks replayed; "
          f"s_kbytes_written as e2fsck's in {kbytes_same}; {cache.hits} scans resumed; "
          f"refused {dict(refused)}")
    assert seen_features & ~jbd2.JBD2_FEATURE_INCOMPAT_REVOKE == features
    assert cache.hits > 10  # the incremental scan was exercised, and matched e2fsck
    assert compared["prefix"] >= 10 and compared["reorder"] >= 10
    assert replayed > 100  # the states really carried journal transactions
    assert sum(refused.values()) <= sum(compared.values()) // 4, refused


@pytest.mark.slow
def test_fsck_checker_uses_the_in_process_replay_and_leaves_the_image(tmp_path: Path) -> None:
    # The built-in fsck on states that need recovery: the in-process replay takes them (one
    # e2fsck process each), its verdict is the e2fsck path's, and the image is left as found.
    log, base = _bench().record_on_host(tmp_path, files=30, size_mb=32)
    logmap = LogMap.read(log)
    states = enumerate_states(logmap, ["prefix"], start=start_index(logmap))
    # Without read-set reuse, which may spare a replay (tests/unit/test_readset_reuse.py).
    ours = FsckChecker("ext4", readset_reuse=False)
    old = FsckChecker("ext4", in_process_replay=False)
    fresh = tmp_path / "fresh.img"
    with LogReader(log) as reader:
        for state in states[::3]:
            build_from_zero(reader, logmap, base, state, fresh)
            want = fresh.read_bytes()
            got = check_state([ours], fresh, tmp_path / "c", expect_fs=True)[0]
            assert fresh.read_bytes() == want, state.id
            expected = check_state([old], fresh, tmp_path / "c", expect_fs=True)[0]
            assert fresh.read_bytes() == want, state.id
            assert (got.verdict, state.id) == (expected.verdict, state.id), got.output
    assert ours.journal_replays_in_process > 5
    assert old.journal_replays_in_process == 0
