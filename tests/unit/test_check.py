"""Checkers (logwrites.check): verdicts, disposable copies, filesystem detection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from logwrites.check import (
    FsckChecker,
    HostChecker,
    ImageNotRestored,
    Verdict,
    apply_undo_file,
    check_state,
    combine,
    detect_fs,
    parse_checker,
)
from logwrites.errors import UsageError
from tests.conftest import require_tool


@pytest.fixture
def ext4_image(tmp_path: Path) -> Path:
    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    require_tool("e2fsck", "e2fsprogs")
    image = tmp_path / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run([mkfs, "-q", "-F", str(image)], check=True)
    return image


def test_detect_fs(ext4_image: Path, tmp_path: Path) -> None:
    assert detect_fs(ext4_image) == "ext4"
    blank = tmp_path / "blank"
    blank.write_bytes(bytes(1 << 20))
    assert detect_fs(blank) is None


def test_fsck_passes_a_clean_ext4_and_fails_a_damaged_one(ext4_image: Path,
                                                          tmp_path: Path) -> None:
    checker = FsckChecker("ext4")
    ok = check_state([checker], ext4_image, tmp_path / "copy", expect_fs=True)
    assert [v.verdict for v in ok] == ["pass"], ok[0].output
    # Zero the block group descriptors and bitmaps after the superblock: e2fsck must object.
    with open(ext4_image, "r+b") as f:
        f.seek(4096)
        f.write(bytes(64 << 10))
    bad = check_state([checker], ext4_image, tmp_path / "copy", expect_fs=True)
    assert bad[0].verdict == "fail"
    assert bad[0].checker == "fsck:ext4"
    assert bad[0].detail


def test_no_signature_passes_before_mkfs_and_fails_after(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.write_bytes(bytes(1 << 20))
    checker = FsckChecker("ext4")
    assert checker.check(blank, expect_fs=False).verdict == "pass"
    assert checker.check(blank, expect_fs=True).verdict == "fail"


def test_host_checker_statuses_and_image_substitution(tmp_path: Path) -> None:
    image = tmp_path / "my image"
    image.write_bytes(b"abc")
    assert HostChecker("test -s {image}").check(image, expect_fs=False).verdict == "pass"
    assert HostChecker("grep -q abc").check(image, expect_fs=False).verdict == "pass"
    failed = HostChecker("echo broken >&2; exit 3").check(image, expect_fs=False)
    assert (failed.verdict, failed.detail) == ("fail", "exit 3: broken")
    missing = HostChecker("no-such-tool-xyz {image}").check(image, expect_fs=False)
    assert missing.verdict == "error"
    killed = HostChecker("echo dying; kill -9 $$").check(image, expect_fs=False)
    assert (killed.verdict, killed.detail) == ("error", "killed by SIGKILL: dying")
    slow = HostChecker("sleep 30; true {image}", timeout_s=0.2).check(image, expect_fs=False)
    assert slow.verdict == "error" and "timed out" in slow.detail
    assert slow.seconds < 5  # the shell's child was killed too


def test_a_checker_printing_without_end_is_kept_to_its_tail(tmp_path: Path) -> None:
    # `yes` writes gigabytes a second: all of it held until the timeout filled our memory.
    image = tmp_path / "image"
    image.write_bytes(b"abc")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, from the pytest process.
    program = ("from pathlib import Path\n"
               "from logwrites.check import HostChecker\n"
               f"v = HostChecker('yes flood', timeout_s=0.5).check(Path({str(image)!r}), "
               "expect_fs=False)\n"
               "hwm = next(line for line in open('/proc/self/status')\n"
               "           if line.startswith('VmHWM:')).split()[1]\n"
               "print(v.verdict, len(v.output), v.output.splitlines()[-2], int(hwm) >> 10,\n"
               "      sep='|')\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120, check=True)
    verdict, kept, line, peak_mib = done.stdout.strip().split("|")
    assert (verdict, int(kept), line) == ("error", 64 << 10, f"flood {image}")
    assert int(peak_mib) < 200, f"{peak_mib} MiB resident"


def test_a_checker_finds_the_fsck_tools_outside_the_users_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Debian's PATH for anyone but root has no /usr/sbin, where e2fsck lives.
    require_tool("e2fsck", "e2fsprogs")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    image = tmp_path / "image"
    image.write_bytes(bytes(1 << 20))
    found = HostChecker("e2fsck -V").check(image, expect_fs=False)
    assert found.verdict == "pass" and "e2fsck" in found.output


def test_a_checkers_control_characters_stay_off_the_terminal(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(b"abc")
    rude = HostChecker(r"printf 'bad \033]0;PWNED\007\033[2J state\n'; exit 1")
    verdict = rude.check(image, expect_fs=False)
    assert verdict.detail == "exit 1: bad ?]0;PWNED??[2J state"


def test_checkers_work_on_a_copy_and_leave_the_state_pristine(tmp_path: Path) -> None:
    image = tmp_path / "state.img"
    image.write_bytes(b"pristine")
    scribble = HostChecker("printf changed > {image}; false")
    verdicts = check_state([scribble, scribble], image, tmp_path / "copy", expect_fs=False)
    assert [v.verdict for v in verdicts] == ["fail", "fail"]
    assert image.read_bytes() == b"pristine"
    assert not (tmp_path / "copy").exists()


def test_combine_and_parse() -> None:
    def v(x: str) -> Verdict:
        return Verdict(x, "c", 0.0)
    assert combine([v("pass"), v("pass")]) == "pass"
    assert combine([v("pass"), v("error")]) == "error"
    assert combine([v("error"), v("fail")]) == "fail"
    assert isinstance(parse_checker("fsck", fs="ext4"), FsckChecker)
    assert parse_checker("host:true {image}", fs=None).name == "host:true {image}"
    with pytest.raises(UsageError, match="needs a filesystem"):
        parse_checker("fsck", fs="none")
    with pytest.raises(UsageError, match="use fsck, host:CMD or guest:PATH"):
        parse_checker("fsk", fs="ext4")
    with pytest.raises(UsageError, match="is not a file"):
        parse_checker("guest:/no/such/script", fs="ext4")


def test_fsck_replays_the_journal_on_the_image_and_undoes_it(ext4_image: Path,
                                                             tmp_path: Path) -> None:
    # A superblock that asks for journal recovery: e2fsck's replay writes the image (it clears
    # the flag at least); the built-in checker runs in place and must leave every byte as it was.
    debugfs = require_tool("debugfs", "e2fsprogs")
    subprocess.run([debugfs, "-w", "-R", "feature needs_recovery", str(ext4_image)], check=True,
                   capture_output=True)
    before = ext4_image.read_bytes()
    checker = FsckChecker("ext4")
    assert checker.writes_image is False
    verdicts = check_state([checker], ext4_image, tmp_path / "copy", expect_fs=True)
    assert not (tmp_path / "copy").exists()  # no copy was made
    assert verdicts[0].verdict in ("pass", "fail")
    assert "journal" in verdicts[0].output or "recover" in verdicts[0].output.lower()
    assert ext4_image.read_bytes() == before
    assert not list(tmp_path.glob("*.e2undo"))


def test_a_checker_that_cannot_undo_says_so(tmp_path: Path) -> None:
    image = tmp_path / "state.img"
    image.write_bytes(b"pristine")

    class Sloppy:
        name, writes_image = "sloppy", False

        def check(self, image: Path, *, expect_fs: bool, env=None) -> Verdict:
            raise ImageNotRestored(image, "undo failed", [Verdict("pass", "sloppy", 0.0)])

    with pytest.raises(ImageNotRestored) as err:
        check_state([Sloppy(), HostChecker("true")], image, tmp_path / "copy", expect_fs=False)
    assert [v.verdict for v in err.value.verdicts] == ["pass"]  # the second never ran


def _replayed_with_undo(image: Path, undo: Path) -> bytes:
    """Ask for journal recovery, keep the image's bytes, replay with an undo file."""
    debugfs = require_tool("debugfs", "e2fsprogs")
    subprocess.run([debugfs, "-w", "-R", "feature needs_recovery", str(image)], check=True,
                   capture_output=True)
    before = image.read_bytes()
    subprocess.run(["e2fsck", "-E", "journal_only", "-y", "-z", str(undo), str(image)],
                   capture_output=True, check=False)
    assert image.read_bytes() != before  # the replay wrote something to undo
    return before


def test_undo_file_applied_in_process_as_e2undo_would(ext4_image: Path,
                                                      tmp_path: Path) -> None:
    undo = tmp_path / "u.e2undo"
    before = _replayed_with_undo(ext4_image, undo)
    twin = tmp_path / "twin.img"
    twin.write_bytes(ext4_image.read_bytes())
    assert apply_undo_file(undo, ext4_image)
    subprocess.run([require_tool("e2undo", "e2fsprogs"), str(undo), str(twin)], check=True,
                   capture_output=True)
    assert ext4_image.read_bytes() == twin.read_bytes() == before
    # Applied once, the image's superblock no longer is the one the undo file expects.
    assert apply_undo_file(undo, ext4_image) is None
    assert ext4_image.read_bytes() == before


def test_a_damaged_undo_file_is_left_to_e2undo(ext4_image: Path, tmp_path: Path) -> None:
    undo = tmp_path / "u.e2undo"
    _replayed_with_undo(ext4_image, undo)
    replayed = ext4_image.read_bytes()
    raw = bytearray(undo.read_bytes())
    raw[-1] ^= 0xFF  # the last saved block: its checksum no longer matches
    undo.write_bytes(bytes(raw))
    assert apply_undo_file(undo, ext4_image) is None
    assert ext4_image.read_bytes() == replayed  # nothing written
    raw[-1] ^= 0xFF
    raw[40] ^= 0x01  # a header field (sb_crc): the header checksum no longer matches
    undo.write_bytes(bytes(raw))
    assert apply_undo_file(undo, ext4_image) is None
    assert ext4_image.read_bytes() == replayed


def test_fsck_undoes_its_replay_in_process(ext4_image: Path, tmp_path: Path) -> None:
    debugfs = require_tool("debugfs", "e2fsprogs")
    subprocess.run([debugfs, "-w", "-R", "feature needs_recovery", str(ext4_image)],
                   check=True, capture_output=True)
    before = ext4_image.read_bytes()
    checker = FsckChecker("ext4")
    checker.check(ext4_image, expect_fs=True)
    assert (checker.undo_in_process, checker.undo_by_e2undo) == (1, 0)
    assert ext4_image.read_bytes() == before
    assert not list(Path("/dev/shm").glob(f"lw-{os.getpid()}-*.e2undo"))


def test_xfs_dirty_log_goes_to_the_guest_on_a_copy(tmp_path: Path, monkeypatch) -> None:
    import logwrites.check as check

    image = tmp_path / "state.img"
    image.write_bytes(b"XFSB" + bytes(8188))
    dirty = ("ALERT: The filesystem has valuable metadata changes in a log which is being\n"
             "ignored because the -n option was used.")  # xfs_repair 6.1, wrapped as it is
    host = {"status": 1, "out": dirty}
    monkeypatch.setattr(check, "_run", lambda argv, timeout_s, env=None: (
        host["status"], host["out"]))
    calls: list[tuple[Path, str]] = []
    answer = {"status": 0, "out": "[script] xfs_repair -n /dev/vda\nPhase 7 done"}

    def runner(copy: Path, script: Path, timeout_s: float, env) -> tuple[int, str]:
        calls.append((copy, script.read_text()))
        assert copy != image and copy.read_bytes() == image.read_bytes()
        return answer["status"], answer["out"]

    checker = FsckChecker("xfs", guest_runner=runner)
    ok = checker.check(image, expect_fs=True)
    assert (ok.verdict, ok.checker) == ("pass", "fsck:xfs") and "log recovery" in ok.detail
    assert len(calls) == 1 and "xfs_repair -n" in calls[0][1] and "umount" in calls[0][1]
    assert not calls[0][0].exists() and checker.guest_recoveries == 1
    answer.update(status=32, out="[setup] mount: /mnt/test: cannot mount")
    assert checker.check(image, expect_fs=True).verdict == "fail"
    answer.update(status=1, out="[script] xfs_repair -n /dev/vda\nagi unlinked bucket 3 bad")
    bad = checker.check(image, expect_fs=True)
    assert bad.verdict == "fail" and "agi unlinked bucket" in bad.detail
    # A clean log stays on the host: no guest.
    host.update(status=0, out="Phase 7 - verify link counts...\nNo modify flag set")
    assert checker.check(image, expect_fs=True).verdict == "pass" and len(calls) == 3
