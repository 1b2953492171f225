"""`logwrites run`'s options: bad ones are refused in one line before anything is made, and
the crash-loop command it prints for a run names the checks crash-loop would pick."""

from __future__ import annotations

from pathlib import Path

import pytest

from logwrites.cli import main
from logwrites.commands.run import crash_loop_command, parse_disk_size
from logwrites.errors import UsageError
from tests.unit.test_replay_cli import run_cli

BAD = [
    (["--size", "0"], "--size 0: must be a whole number of 4 KiB blocks"),
    (["--size", "6K"], "--size 6K: must be a whole number of 4 KiB blocks"),
    (["--size", "lots"], "size 'lots': a number of bytes"),
    (["--timeout", "0"], "--timeout 0: must be more than 0 seconds"),
    (["--timeout", "nan"], "--timeout nan: must be more than 0 seconds"),
    (["--crash-at", "time:-1"], "--crash-at time:-1: time needs seconds, 0 or more"),
    (["--crash-at", "flush:x"], "--crash-at flush:x: flush needs a whole number"),
    (["--mode", "bogus"], "argument --mode: invalid choice: 'bogus'"),
    (["--backend", "qemu-storage-daemon", "--mode", "immediate"],
     "--mode immediate is serve's: qemu-storage-daemon keeps no log"),
    (["--backend", "qemu-storage-daemon", "--crash-at", "mark:x"],
     "--crash-at mark:x needs the logging backend (serve)"),
    (["--kernel", "/nonexistent/bzImage"], "/nonexistent/bzImage"),
    (["--memory", "256"], "--memory 256: the guest needs at least 384 MiB"),
    (["--cpus", "0"], "--cpus 0: from 1 to 64"),
    (["--queues", "65"], "--queues 65: from 1 to 64"),
    (["--cpus", "two"], "argument --cpus: invalid int value: 'two'"),
    (["--size", "99999999999999999999"], "--size 99999999999999999999: must be at most 1T"),
    (["--size", "1e30K"], "size '1e30K': must be at most 1T"),
    (["--size", "infK"], "size 'infK': must be at most 1T"),
    (["--workload", "'x"], "--workload \"'x\": No closing quotation"),
    (["--mkfs-opts", "-L 'my disk'"], "--mkfs-opts \"-L 'my disk'\": the guest splits it at "
                                       "whitespace"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_options_are_one_line_and_make_nothing(
        extra: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    status = run_cli(["run", "--workload", "txnlog", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("logwrites: ") and message in err, err
    assert not out.exists()


def test_an_out_that_is_a_file_is_refused_before_the_guest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.write_text("someone's notes\n")
    assert run_cli(["run", "--workload", "txnlog", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"logwrites: --out {out}: exists and is not a directory\n"
    assert out.read_text() == "someone's notes\n"


def test_unknown_workload_names_the_built_in_ones(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--workload", "no-such-workload", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'no-such-workload' is neither a file nor a built-in one" in err
    assert "fs-default" in err and "txnlog" in err


def test_disk_size_plain_numbers_are_mib() -> None:
    assert parse_disk_size("512") == 512 << 20
    assert parse_disk_size("1G") == 1 << 30
    assert parse_disk_size("64K") == 64 << 10
    assert parse_disk_size("513") == 513 << 20
    with pytest.raises(UsageError, match="4 KiB blocks"):
        parse_disk_size("4097K")


def test_crash_loop_command_names_the_workload_checks(tmp_path: Path) -> None:
    from logwrites.crashloop_job import CHECKERS_DIR, WORKLOADS_DIR

    ext4 = crash_loop_command(tmp_path, "ext4", WORKLOADS_DIR / "fs-default")
    assert f"--log {tmp_path / 'log'} --base {tmp_path / 'base.img'} --fs ext4" in ext4
    assert "--check fsck" in ext4 and str(CHECKERS_DIR / "fs-default") in ext4
    # fs-default's checker reads ext4 only: on xfs, fsck alone.
    xfs = crash_loop_command(tmp_path, "xfs", WORKLOADS_DIR / "fs-default")
    assert xfs.endswith("--fs xfs --check fsck")
    raw = crash_loop_command(tmp_path, "none", WORKLOADS_DIR / "txnlog")
    assert "--check fsck" not in raw and str(CHECKERS_DIR / "txnlog") in raw
    mine = crash_loop_command(tmp_path, "none", tmp_path / "mine.sh")
    assert mine.endswith("--check 'host:YOUR-CHECKER {image}'")
