"""`logwrites replay` on the command line: replay-log's options, --find, --check/--fsck."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from logwrites.cli import main

# Entry 5's payload is text that the "fsck" below looks for.
OPS = [("w", 0, 2, 0x11), ("f",), ("m", "setup-done"), ("w", 4, 1, 0x22), ("fua", 6, 1, 0x23),
       ("w", 8, 1, ord("Z")), ("d", 0, 1), ("f",), ("w", 9, 1, 0x44), ("f",), ("m", "end")]


def run_cli(argv: list[str]) -> int:
    """main(argv), with argparse's usage errors (SystemExit 2) as a return value."""
    try:
        return main(argv)
    except SystemExit as leaving:
        return int(leaving.code or 0)


def image(tmp_path: Path) -> Path:
    target = tmp_path / "target.img"
    target.write_bytes(bytes(64 * 512))
    return target


def test_check_flush_stops_at_the_failing_entry(make_log, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    log = make_log(OPS)
    target = image(tmp_path)
    fsck = f"! grep -q ZZZZZZZZ {target}"
    assert main(["replay", str(log), str(target), "--check", "flush", "--fsck", fsck]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "log entry 7" in err and "exited with status 1" in err
    data = target.read_bytes()
    assert data[:512] == bytes(512) and data[9 * 512 : 10 * 512] == bytes(512)  # 8 not replayed


def test_check_every_n_and_fua(make_log, tmp_path: Path) -> None:
    log = make_log(OPS)
    seen = tmp_path / "seen"
    fsck = f'echo "$LOGWRITES_ENTRY" >> {seen}'
    assert main(["replay", str(log), str(image(tmp_path)), "--check", "4", "--fsck", fsck]) == 0
    assert seen.read_text().split() == ["3", "7"]
    seen.unlink()
    assert main(["replay", str(log), str(image(tmp_path)), "--check", "fua", "--fsck", fsck]) == 0
    assert seen.read_text().split() == ["4"]
    seen.unlink()
    assert main(["replay", str(log), str(image(tmp_path)), "--start-mark", "setup-done",
                 "--check", "2", "--fsck", fsck]) == 0
    assert seen.read_text().split() == ["4", "6", "8", "10"]


def test_find_prints_index_at_block(make_log, capsys: pytest.CaptureFixture[str]) -> None:
    log = make_log(OPS)
    capsys.readouterr()
    assert main(["replay", str(log), "--find", "--end-mark", "setup-done"]) == 0
    # entries 0 (1 + 2 blocks), 1 and 2 take blocks 1..5: the next header is at block 6
    assert capsys.readouterr().out == "2@6\n"
    assert main(["replay", str(log), "--find", "--next-flush", "--start-entry", "2"]) == 0
    assert capsys.readouterr().out.startswith("7@")
    assert main(["replay", str(log), "--find", "--limit", "2", "--start-mark", "setup-done"]) == 0
    assert capsys.readouterr().out.startswith("4@")


@pytest.mark.parametrize("argv", [
    ["--end-mark", "no-such-mark"],
    ["--start-mark", "no-such-mark"],
    ["--start-entry", "11"],
    ["--check", "flush"],
    ["--fsck", "true"],
    ["--check", "0", "--fsck", "true"],
    ["--start-entry", "1", "--start-mark", "end"],
    ["--limit", "-1"],
])
def test_bad_requests_are_exit_2_and_touch_nothing(
        make_log, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    log = make_log(OPS)
    target = image(tmp_path)
    before = target.read_bytes()
    assert run_cli(["replay", str(log), str(target), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert target.read_bytes() == before


@pytest.mark.parametrize(("argv", "said"), [
    (["--fsck-timeout", "0"], "--fsck-timeout 0: must be more than 0 seconds"),
    (["--fsck-timeout", "nan"], "--fsck-timeout nan: must be more than 0 seconds"),
    (["--fsck-timeout", "inf"], "--fsck-timeout inf: must be a finite number of seconds"),
    (["--fsck-timeout", "1e30"], "--fsck-timeout 1e+30: must be at most 604800 seconds"),
    (["--fsck-timeout", "soon"], "argument --fsck-timeout: invalid float value: 'soon'"),
])
def test_a_bad_fsck_timeout_is_refused_before_the_replay(
        make_log, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
        said: str) -> None:
    target = image(tmp_path)
    before = target.read_bytes()
    assert run_cli(["replay", str(make_log(OPS)), str(target), "--check", "1",
                    "--fsck", "true", *argv]) == 2
    assert capsys.readouterr().err.startswith(f"logwrites: {said}")
    assert target.read_bytes() == before


def test_an_fsck_timeout_needs_an_fsck(make_log, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["replay", str(make_log(OPS)), str(image(tmp_path)),
                    "--fsck-timeout", "5"]) == 2
    assert capsys.readouterr().err == "logwrites: --fsck-timeout goes with --fsck\n"


def test_find_without_a_stop_condition_or_target_missing(make_log,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    log = make_log(OPS)
    assert main(["replay", str(log), "--find"]) == 2
    assert main(["replay", str(log)]) == 2
    assert main(["replay", str(log), "--find", "--next-flush", "--start-entry", "10"]) == 2
    assert "no flush at or after entry 10" in capsys.readouterr().err


def test_end_mark_and_limit_zero(make_log, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    log = make_log(OPS)
    target = image(tmp_path)
    assert main(["replay", str(log), str(target), "--end-mark", "setup-done",
                 "--discard-zeroes-data"]) == 0
    assert "entries 0..2" in capsys.readouterr().out
    assert target.read_bytes()[:1024] == b"\x11" * 1024
    # --limit 0 is no limit, as in replay-log
    assert main(["replay", str(log), str(target), "--limit", "0"]) == 0
    assert "entries 0..10" in capsys.readouterr().out


def test_replay_through_a_subprocess(make_log, tmp_path: Path) -> None:
    log = make_log(OPS)
    target = image(tmp_path)
    done = subprocess.run([sys.executable, "-m", "logwrites.cli", "replay", str(log),
                           str(target), "--next-fua"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    data = target.read_bytes()
    assert data[6 * 512 : 7 * 512] == b"\x23" * 512 and data[8 * 512 : 9 * 512] == bytes(512)
