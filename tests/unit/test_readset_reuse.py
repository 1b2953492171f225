"""The ext4 fsck reuses e2fsck's answer only while every byte e2fsck read is unchanged
(logwrites/_readset_recorder.c, `logwrites.check.ReadSetCache`): real e2fsck, real images."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from logwrites.check import READSET_RECORDER, FsckChecker, check_state, load_readset
from logwrites.loop import LoopOptions, existing_recording, run_loop
from logwrites.report import json_lines
from tests.conftest import require_tool, write_log

BLOCK = 4096


def _recorder() -> Path:
    if not READSET_RECORDER.is_file():
        pytest.fail(f"{READSET_RECORDER} is not built: run bash scripts/setup.sh")
    return READSET_RECORDER


def _block_of(image: Path, path: str) -> int:
    """The filesystem block holding the first block of `path` (debugfs bmap)."""
    debugfs = require_tool("debugfs", "e2fsprogs")
    out = subprocess.run([debugfs, "-R", f"bmap {path} 0", str(image)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 32 MiB ext4 (4 KiB blocks) holding /f, 20,000 bytes of file data."""
    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    require_tool("e2fsck", "e2fsprogs")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(os.urandom(20000))
    img = tmp_path / "ext4.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run([mkfs, "-q", "-F", "-b", str(BLOCK), "-d", str(tree), str(img)], check=True)
    return img


def _poke(image: Path, offset: int, data: bytes) -> bytes:
    """Write `data` at `offset`; return what was there."""
    with open(image, "r+b") as f:
        f.seek(offset)
        old = f.read(len(data))
        f.seek(offset)
        f.write(data)
    return old


def _check(checker: FsckChecker, image: Path, state: str, scratch: Path):
    [verdict] = check_state([checker], image, scratch, expect_fs=True,
                            env={"LW_STATE": state})
    return verdict


def test_recorder_records_superblock_and_group_descriptors_not_file_data(
        image: Path, tmp_path: Path) -> None:
    out = tmp_path / "reads"
    env = {**os.environ, "LD_PRELOAD": str(_recorder()), "LW_READSET_IMAGE": str(image),
           "LW_READSET_OUT": str(out)}
    done = subprocess.run(["e2fsck", "-fn", str(image)], env=env, capture_output=True)
    assert done.returncode == 0, done.stdout
    ranges = load_readset(out)
    assert ranges is not None

    def covered(offset: int, length: int) -> bool:
        return all(any(o <= at < o + n for o, n in ranges)
                   for at in range(offset, offset + length))

    assert covered(1024, 1024)         # the superblock
    assert covered(BLOCK, BLOCK)       # the group descriptors: the block after it (4 KiB fs)
    data = _block_of(image, "/f") * BLOCK
    assert not any(o < data + BLOCK and data < o + n for o, n in ranges)  # file data unread


_READER = """
import mmap, os, sys
image = sys.argv[1]
with open(image, "rb", buffering=0) as f:       # open + lseek + read
    f.seek(5000)
    f.read(100)
    copy = os.dup(f.fileno())                   # a dup'ed descriptor still counts
    os.pread(copy, 1024, 1024)              # the superblock's place
    os.close(copy)
    os.preadv(f.fileno(), [bytearray(20)], 3000)
    if sys.argv[2] == "mmap":                   # bytes read unseen: no read set at all
        mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ).close()
with open(sys.argv[3], "rb") as other:          # another file's reads are not the image's
    other.read(10)
"""


@pytest.mark.parametrize("how", ["reads", "mmap"])
def test_recorder_tracks_descriptors_and_refuses_unseen_reads(tmp_path: Path, how: str) -> None:
    image, other, out = tmp_path / "image", tmp_path / "other", tmp_path / "reads"
    image.write_bytes(bytes(8192))
    other.write_bytes(bytes(8192))
    env = {**os.environ, "LD_PRELOAD": str(_recorder()), "LW_READSET_IMAGE": str(image),
           "LW_READSET_OUT": str(out)}
    subprocess.run([sys.executable, "-c", _READER, str(image), how, str(other)], env=env,
                   check=True)
    with open(out, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"LWRSET01"
    assert int.from_bytes(head[8:16], "little") == (1 if how == "mmap" else 0)  # incomplete
    ranges = load_readset(out)
    if how == "mmap":
        assert ranges is None
    else:
        assert ranges == [(1024, 1024), (3000, 20), (5000, 100)]


def test_recorder_output_is_refused_when_missing_torn_or_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "reads"
    assert load_readset(path) is None
    head = b"LWRSET01" + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    whole = (0).to_bytes(8, "little") + (4096).to_bytes(8, "little")
    path.write_bytes(head + whole)
    assert load_readset(path) == [(0, 4096)]
    path.write_bytes(head + whole[:8])                        # torn
    assert load_readset(path) is None
    path.write_bytes(head.replace((0).to_bytes(8, "little"), (1).to_bytes(8, "little"), 1)
                     + whole)                                # marked incomplete
    assert load_readset(path) is None
    no_super = (8192).to_bytes(8, "little") + (4096).to_bytes(8, "little")
    path.write_bytes(head + no_super)                         # another file's reads
    assert load_readset(path) is None


def test_file_data_change_reuses_the_verdict(image: Path, tmp_path: Path) -> None:
    _recorder()
    checker = FsckChecker("ext4")
    first = _check(checker, image, "s1", tmp_path / "copy")
    assert first.verdict == "pass" and first.reused_from is None
    _poke(image, _block_of(image, "/f") * BLOCK, os.urandom(BLOCK))
    second = _check(checker, image, "s2", tmp_path / "copy")
    assert second.verdict == "pass", second.output
    assert second.reused_from == "s1"
    assert "reused: read set unchanged since state s1" in second.detail
    assert "not run" in second.output and "Pass 5" in second.output  # the output then
    assert (checker.fsck_runs, checker.readset_reused) == (1, 1)


@pytest.mark.parametrize("where", ["root directory block", "group descriptors"])
def test_metadata_change_in_the_read_set_runs_e2fsck_and_fails(
        image: Path, tmp_path: Path, where: str) -> None:
    _recorder()
    checker = FsckChecker("ext4")
    assert _check(checker, image, "clean", tmp_path / "copy").verdict == "pass"
    if where == "root directory block":
        offset, bad = _block_of(image, "/") * BLOCK, os.urandom(BLOCK)
    else:  # group 0's free blocks count (bg_free_blocks_count_lo, 12 bytes in)
        offset, bad = BLOCK + 12, b"\x01\x00"
    old = _poke(image, offset, bad)
    damaged = _check(checker, image, "damaged", tmp_path / "copy")
    assert damaged.verdict == "fail", damaged.output
    assert damaged.reused_from is None and checker.fsck_runs == 2
    # Put it back: the clean answer is reused; damage it again: the failing one is, output
    # and all.
    _poke(image, offset, old)
    again = _check(checker, image, "clean-again", tmp_path / "copy")
    assert (again.verdict, again.reused_from) == ("pass", "clean")
    _poke(image, offset, bad)
    redamaged = _check(checker, image, "damaged-again", tmp_path / "copy")
    assert (redamaged.verdict, redamaged.reused_from) == ("fail", "damaged")
    assert damaged.output.split("--- e2fsck -fn\n")[1] in redamaged.output
    assert checker.fsck_runs == 2


def test_image_size_is_part_of_the_key(image: Path, tmp_path: Path) -> None:
    _recorder()
    checker = FsckChecker("ext4")
    assert _check(checker, image, "a", tmp_path / "copy").verdict == "pass"
    with open(image, "r+b") as f:
        f.truncate((32 << 20) - BLOCK)  # no byte e2fsck read changed, but the size did
    shorter = _check(checker, image, "b", tmp_path / "copy")
    assert shorter.reused_from is None and checker.fsck_runs == 2


@pytest.mark.parametrize("recorder", ["missing", "not a library"])
def test_without_a_usable_recorder_e2fsck_runs_plain(
        image: Path, tmp_path: Path, recorder: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "recorder.so"
    if recorder == "not a library":
        path.write_text("not an ELF file\n")
    checker = FsckChecker("ext4", readset_recorder=path)
    caplog.set_level(logging.WARNING, logger="logwrites.check")
    verdicts = [_check(checker, image, f"s{k}", tmp_path / "copy").verdict for k in range(4)]
    assert verdicts == ["pass"] * 4
    _poke(image, _block_of(image, "/") * BLOCK, os.urandom(BLOCK))
    assert _check(checker, image, "bad", tmp_path / "copy").verdict == "fail"
    assert checker.readset_reused == 0 and checker.fsck_runs == 5
    assert "e2fsck -fn runs plain" in caplog.text


def test_reuse_can_be_turned_off(image: Path, tmp_path: Path) -> None:
    checker = FsckChecker("ext4", readset_reuse=False)
    for k in range(2):
        assert _check(checker, image, f"s{k}", tmp_path / "copy").reused_from is None
    assert checker.fsck_runs == 2


@pytest.mark.parametrize("jobs", [1, 2])
def test_loop_reports_reused_states_and_agrees_with_plain_e2fsck(
        image: Path, tmp_path: Path, jobs: int) -> None:
    """Prefix states that only rewrite file data take the earlier answer; the state that
    damages the root directory runs e2fsck and fails; every verdict equals plain e2fsck's."""
    _recorder()
    data, root = _block_of(image, "/f") * BLOCK // 512, _block_of(image, "/") * BLOCK // 512
    ops: list[tuple] = []
    for k in range(8):
        ops += [("w", data, 8, k + 1), ("f",)]
    ops += [("w", root, 8, 0xAB), ("f",), ("w", data, 8, 99), ("f",)]
    log = write_log(tmp_path / "test.log", ops)
    rec = existing_recording(log, image, "ext4")(tmp_path)
    options = LoopOptions(kinds=("prefix",), jobs=jobs, from_start=True, shrink=False)
    reusing = run_loop(rec, [FsckChecker("ext4")], options, tmp_path / "w1")
    plain = run_loop(rec, [FsckChecker("ext4", readset_reuse=False)], options, tmp_path / "w2")
    got = {r.state.id: r.verdict for r in reusing.results}
    assert got == {r.state.id: r.verdict for r in plain.results}
    assert list(got.values()).count("fail") >= 2  # the damaged root, and what follows
    reused = [r for r in reusing.results if r.reused_from is not None]
    assert reusing.readset_reused == len(reused) >= 9 - 2 * jobs
    assert plain.readset_reused == 0
    for r in reused:
        assert f"reused: read set unchanged since state {r.reused_from}" in r.detail
    objs = [json.loads(line) for line in json_lines(reusing)]
    summary = objs.pop()
    assert summary["readset_reused"] == reusing.readset_reused
    assert sum("reused_from" in o for o in objs) == len(reused)
    first_fail = min((r for r in reusing.results if r.verdict == "fail"),
                     key=lambda r: r.state.entry)
    assert first_fail.reused_from is None  # the damage was in the read set: e2fsck ran


@pytest.mark.parametrize("forkserver", ["1", "0"])
def test_forked_e2fsck_answers_as_an_execd_one(image: Path, tmp_path: Path, forkserver: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The checker forks e2fsck from a server held before main() (logwrites/forkserver.py):
    # clean and damaged images get the same answers, output and recorded reads as exec'd runs.
    _recorder()
    monkeypatch.setenv("LOGWRITES_FORKSERVER", forkserver)
    checker = FsckChecker("ext4")
    clean = _check(checker, image, "clean", tmp_path / "copy")
    _poke(image, BLOCK + 12, b"\x01\x00")       # group 0's free blocks count
    damaged = _check(checker, image, "damaged", tmp_path / "copy")
    plain = subprocess.run(["e2fsck", "-fn", str(image)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    assert (clean.verdict, damaged.verdict) == ("pass", "fail")
    assert damaged.output.split("--- e2fsck -fn\n")[1] == plain.stdout
    assert checker.fsck_runs == 2 and checker.readset_reused == 0
    assert checker.forked_runs == (2 if forkserver == "1" else 0)
    # Both runs were recorded (the forked copy records its own reads): reused from here on.
    assert _check(checker, image, "damaged-again", tmp_path / "copy").reused_from == "damaged"


def test_an_answer_is_reused_before_the_journal_replay_when_nothing_either_read_changed(
        tmp_path: Path) -> None:
    """Keyed before the replay (what jbd2's plan was made from, where its scan stopped,
    and what e2fsck read): a change elsewhere, or a new uncommitted transaction, spares the
    replay's writes too; a new commit runs e2fsck."""
    _recorder()
    from logwrites import jbd2
    from logwrites.imagechanges import ImageChanges
    from tests.unit.test_jbd2 import V3_64, Image, _payload

    image = Image(tmp_path / "fs.img")
    image.set_features(V3_64 | jbd2.JBD2_FEATURE_INCOMPAT_REVOKE)
    far = image.blocks_count - 10
    two = [[("data", far, _payload(1))], [("data", far + 1, _payload(2))]]
    image.write(two)
    checker = FsckChecker("ext4")
    changes = ImageChanges()

    def check(state: str):
        [verdict] = check_state([checker], image.path, tmp_path / "copy", expect_fs=True,
                                env={"LW_STATE": state}, changes=changes)
        assert verdict.verdict == "pass", verdict.output
        return verdict

    assert check("s1").reused_from is None
    assert (checker.journal_replays_in_process, checker.fsck_runs) == (1, 1)
    free = (far - 20) * image.bs  # a free block: neither jbd2 nor e2fsck reads it
    changes.wrote(free, image.bs)
    _poke(image.path, free, os.urandom(image.bs))
    spared = check("s2")
    assert spared.reused_from == "s1" and "in-process journal replay" in spared.output
    assert (checker.journal_replays_in_process, checker.fsck_runs) == (1, 1)
    # Without a record of writes the whole key is compared: the same answer.
    assert check_state([checker], image.path, tmp_path / "copy", expect_fs=True,
                       env={"LW_STATE": "s2b"})[0].reused_from == "s1"
    changes.wrote(image.offset(1), 9 * image.bs)
    image.write([*two, [("data", far + 2, _payload(3)), "nocommit"]])
    uncommitted = check("s3")
    assert uncommitted.reused_from == "s1"
    assert (checker.journal_replays_in_process, checker.fsck_runs) == (1, 1)
    changes.wrote(image.offset(1), 10 * image.bs)
    image.write([*two, [("data", far + 2, _payload(3))]])
    assert check("s4").reused_from is None
    assert (checker.journal_replays_in_process, checker.fsck_runs) == (2, 2)
    # A write the record is told of, back to the bytes s4 saw: reused, no replay.
    changes.wrote(free, image.bs)
    assert check("s5").reused_from == "s4"
    assert (checker.journal_replays_in_process, checker.fsck_runs) == (2, 2)
    # A journalled copy changed, the outcome the same: the bytes the plan was made from
    # differ, so nothing is reused (jbd2 refuses the copy's checksum; e2fsck recovers).
    changes.wrote(image.offset(2), image.bs)
    _poke(image.path, image.offset(2) + 200, b"changed")
    changed = check_state([checker], image.path, tmp_path / "copy", expect_fs=True,
                          env={"LW_STATE": "s6"}, changes=changes)[0]
    assert changed.reused_from is None and checker.journal_replays_in_process == 2
    assert checker.fsck_runs == 3
