"""Bad options of crash-loop, demo, run and guest build: one line, exit 2, refused before any
guest boots or any file is made, and no input overwritten; and what a loop that could not
check its states says on the terminal. No test here boots a guest: `no_guest` makes a boot
fail the test instead.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from logwrites.errors import NoRoom, UsageError
from logwrites.logfile import LogWriter
from tests.system.test_crash_loop_hostlog import write_txnlog_log
from tests.unit.test_replay_cli import run_cli


@pytest.fixture
def no_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recording or a run that gets as far as a guest fails the test: its options were
    checked too late."""
    import logwrites.commands.run as run_command
    import logwrites.guestrecord as guestrecord

    def booted(*args: object, **kwargs: object) -> None:
        raise AssertionError("a guest would boot: the option was not refused first")

    monkeypatch.setattr(guestrecord, "record_in_guest", booted)
    monkeypatch.setattr(guestrecord, "_guest", lambda kernel, modules: object())
    monkeypatch.setattr(run_command, "_run", booted)
    monkeypatch.setattr(run_command, "default_guest", lambda kernel, modules: object())


@pytest.fixture
def txn(tmp_path: Path) -> tuple[Path, Path]:
    log = write_txnlog_log(tmp_path / "txn.log", 2, barrier=True)
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(8 << 20)
    return log, base


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The only line on stderr, without its `logwrites: `; stdout must be empty."""
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("logwrites: "), captured.err
    return lines[0].removeprefix("logwrites: ")


# ---- --junit and --out: written after the run, so checked before it ------------------------

REPORT_PATHS = [
    (["--junit", "{log}"], "--junit {log}: would overwrite --log {log}"),
    (["--junit", "{base}"], "--junit {base}: would overwrite --base {base}"),
    (["--junit", "{tmp}/link"], "--junit {tmp}/link: would overwrite --log {log}"),
    (["--junit", "{tmp}"], "--junit {tmp}: is a directory, not a file to write"),
    (["--junit", "{tmp}/nodir/j.xml"], "--junit {tmp}/nodir/j.xml: no directory {tmp}/nodir "
                                       "to write it in"),
    (["--out", "{log}"], "--out {log}: exists and is not a directory"),
    (["--out", "{log}/report"], "--out {log}/report: {log} is not a directory"),
    (["--out", "{tmp}/page"], "--out {tmp}/page: its index.html would overwrite --log "
                              "{tmp}/page/index.html"),
]


@pytest.mark.parametrize(("option", "error"), REPORT_PATHS,
                         ids=[" ".join(o) for o, _ in REPORT_PATHS])
def test_report_paths_are_refused_before_the_run(
        txn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        option: list[str], error: str) -> None:
    log, base = txn
    if "page" in option[1]:  # a log kept where --out writes its page
        (tmp_path / "page").mkdir()
        log = log.rename(tmp_path / "page" / "index.html")
    (tmp_path / "link").symlink_to(log)
    before = log.read_bytes(), base.read_bytes(), sorted(tmp_path.rglob("*"))
    names = {"log": log, "base": base, "tmp": tmp_path}
    status = run_cli(["crash-loop", "--log", str(log), "--base", str(base), "--fs", "none",
                      "--check", "host:true", *[o.format(**names) for o in option]])
    assert status == 2
    assert one_line(capsys) == error.format(**names)
    assert (log.read_bytes(), base.read_bytes(), sorted(tmp_path.rglob("*"))) == before


def test_the_api_refuses_a_junit_over_its_log(txn: tuple[Path, Path], tmp_path: Path) -> None:
    from logwrites.api import crash_loop

    log, base = txn
    before = log.read_bytes()
    with pytest.raises(UsageError, match=r"^junit .*: would overwrite log "):
        crash_loop(log=log, base=base, fs="none", checks=["host:true"], junit=log)
    assert log.read_bytes() == before


# ---- values nothing could take, refused before a guest boots or a file is made ------------

REFUSED = [
    (["crash-loop", "--timeout", "1e30"], "--timeout 1e+30: must be at most 604800 seconds "
                                          "(a week)"),
    (["crash-loop", "--image-size", "1.5K"], "--image-size 1.5K: mkfs.ext4 needs a disk of at "
                                             "least 104K with its default options"),
    (["crash-loop", "--fs", "xfs", "--image-size", "299M"],
     "--image-size 299M: mkfs.xfs needs a disk of at least 300M with its default options"),
    (["crash-loop", "--fs", "btrfs", "--image-size", "108M"],
     "--image-size 108M: mkfs.btrfs needs a disk of at least 109M with its default options"),
    (["crash-loop", "--workload", ""], "--workload '': names no workload"),
    (["crash-loop", "--workload", "  "], "--workload '  ': names no workload"),
    (["crash-loop", "--workload", "txnlog", "--fs", "none", "--start-mark", ""],
     "--start-mark '': give a mark's name"),
    (["crash-loop", "--junit", "/nonexistent/j.xml"],
     "--junit /nonexistent/j.xml: no directory /nonexistent to write it in"),
    (["demo", "--image-size", "infK"], "size 'infK': must be at most 1T"),
    (["demo", "--atomic-unit", "1e30K"], "size '1e30K': must be at most 1T"),
    (["demo", "--workload", "'x"], "--workload \"'x\": No closing quotation"),
    (["run", "--workload", "txnlog", "--timeout", "1e30"],
     "--timeout 1e+30: must be at most 604800 seconds (a week)"),
    (["run", "--workload", "txnlog", "--fs", "ext4", "--size", "64K"],
     "--size 64K: mkfs.ext4 needs a disk of at least 104K with its default options"),
    (["run", "--workload", "txnlog", "--size", "2T"], "size '2T': must be at most 1T"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: command"),
]


@pytest.mark.parametrize(("argv", "error"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_options_are_refused_before_a_guest_boots(
        no_guest: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], argv: list[str], error: str) -> None:
    monkeypatch.chdir(tmp_path)   # run's and demo's default output folders
    assert run_cli(argv) == 2
    assert one_line(capsys) == error
    assert list(tmp_path.iterdir()) == []


def test_the_mkfs_minimum_is_not_applied_to_other_mkfs_options(no_guest: None) -> None:
    # btrfs --mixed makes a filesystem in 60 MiB: the user's options are mkfs's to judge.
    from logwrites.guestrecord import require_mkfs_room

    require_mkfs_room("btrfs", 60 << 20, "--mixed", "--image-size 60M")
    with pytest.raises(UsageError, match=r"mkfs\.btrfs needs a disk of at least 109M"):
        require_mkfs_room("btrfs", 60 << 20, "", "--image-size 60M")


@pytest.mark.parametrize(("checks", "error"), [
    (["--check", "bogus"], "--check 'bogus': use fsck, host:CMD or guest:PATH"),
    (["--check", "fsck"], "--check fsck needs a filesystem (--fs ext4|xfs|btrfs)"),
])
def test_a_bad_check_is_refused_before_the_guest_is_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        checks: list[str], error: str) -> None:
    # Before, crash-loop found (or built) the recording's guest first.
    import logwrites.guestrecord as guestrecord

    def found(kernel: object, modules: object) -> None:
        raise AssertionError("the guest was looked for: the check was not refused first")

    monkeypatch.setattr(guestrecord, "_guest", found)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["crash-loop", "--fs", "none", *checks]) == 2
    assert one_line(capsys) == error
    assert list(tmp_path.iterdir()) == []


# ---- a kernel that is not a bzImage we can read --------------------------------------------

@pytest.mark.parametrize("command", [
    ["guest", "build"], ["run", "--workload", "txnlog", "--out", "out"],
    ["crash-loop", "--fs", "none", "--check", "host:true"]])
def test_a_kernel_without_a_version_end_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        command: list[str]) -> None:
    # The setup header's magic and a version pointer, but no NUL after the version.
    head = bytearray(0x400)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x100).to_bytes(2, "little")
    head[0x300:] = b"x" * 0x100
    kernel = tmp_path / "fake.bz"
    kernel.write_bytes(head)
    monkeypatch.chdir(tmp_path)
    assert run_cli([*command, "--kernel", str(kernel)]) == 2
    assert one_line(capsys) == (f"kernel {kernel}: not a bzImage we can read (its version "
                                f"string has no end)")
    assert list(tmp_path.iterdir()) == [kernel]


# ---- a log that cannot be read is one line: no progress bar is drawn above it --------------

@pytest.mark.parametrize(("damage", "error"), [
    ("empty", "log super block: log is 0 bytes, too short for a super block"),
    ("random", "log super block: bad magic"),
    ("truncated", "log entry 4: the super block counts"),
    ("no-mark", "the log has no mark 'nosuch'"),
])
def test_a_log_that_cannot_be_checked_is_one_line(
        txn: tuple[Path, Path], capsys: pytest.CaptureFixture[str], damage: str,
        error: str) -> None:
    log, base = txn
    whole = log.read_bytes()
    log.write_bytes({"empty": b"", "random": bytes(range(256)) * 16,
                     "truncated": whole[:3000], "no-mark": whole}[damage])
    start = ["--start-mark", "nosuch"] if damage == "no-mark" else []
    assert run_cli(["crash-loop", "--log", str(log), "--base", str(base), "--fs", "none",
                    "--check", "host:true", *start]) == 2
    assert one_line(capsys).startswith(error)


# ---- states that could not be checked say why on the terminal -------------------------------

@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminal wide enough that rich wraps no line."""
    monkeypatch.setenv("COLUMNS", "400")


def test_unchecked_states_are_told_once_per_reason(
        txn: tuple[Path, Path], wide: None, capsys: pytest.CaptureFixture[str]) -> None:
    log, base = txn
    assert run_cli(["crash-loop", "--log", str(log), "--base", str(base), "--fs", "none",
                    "--check", "host:/nonexistent/checker {image}"]) == 2
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 1, out
    assert errors[0].startswith("ERROR 11 states (p:1, p:3, r:3:-2, ...) not checked: "
                                "host:/nonexistent/checker {image}: command could not run "
                                "(exit 127)")
    assert out.count("  repro: ") == 1 and "--state p:1" in out


def test_a_timeout_is_said_with_its_states(txn: tuple[Path, Path], wide: None,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # The table alone would show every state as an error; --json alone said why.
    log, base = txn
    assert run_cli(["crash-loop", "--log", str(log), "--base", str(base), "--fs", "none",
                    "--check", "host:sleep 5 #", "--timeout", "0.2", "--states", "prefix",
                    "--jobs", "8"]) == 2
    out = capsys.readouterr().out
    assert "ERROR 7 states (p:1, p:3, p:5, ...) not checked: host:sleep 5 #: timed out after " \
           "0.2 s" in out, out


# ---- a loop that finds no crash state checked nothing: it does not pass ---------------------

def write_sector_log(path: Path, writes: int = 3) -> Path:
    """A log of one-sector writes after the mark mkfs, each flushed: no write can tear."""
    with LogWriter.create(path, 512) as w:
        w.append_flush()
        w.append_mark("mkfs")
        w.commit()
        for i in range(writes):
            w.append_write(8 + i, 1, [bytes([i + 1]) * 512])
            w.append_flush()
            w.commit()
    return path


@pytest.fixture
def sectors(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(1 << 20)
    return write_sector_log(tmp_path / "sectors.log"), base


def err_lines(err: str) -> list[str]:
    """stderr's lines but the empty one rich's Progress.stop() ends a bar with on a file (a
    transient one too: the --json loop's, which stayed empty)."""
    return [line for line in err.splitlines() if line]


TORN_NONE = ("no crash state was checked: the log's 8 entries have no torn state after the "
             "mark 'mkfs' (entry 1): a torn state needs a write there longer than the atomic "
             "unit, 512 bytes")


@pytest.mark.parametrize("command", ["crash-loop", "demo"])
def test_a_loop_without_states_exits_2_after_its_reports(
        sectors: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        command: str) -> None:
    # Before, "0 states" and exit 0: a CI job read a loop that checked nothing as a pass.
    import xml.etree.ElementTree as ET

    log, base = sectors
    junit, out = tmp_path / "junit.xml", tmp_path / "report"
    assert run_cli([command, "--log", str(log), "--base", str(base), "--fs", "none",
                    "--states", "torn", "--check", "host:true", "--json", "--junit",
                    str(junit), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert err_lines(captured.err) == [f"logwrites: {TORN_NONE}"]
    summary = json.loads(captured.out)  # the summary alone: no state
    assert summary["states"] == 0 and summary["exit_status"] == 2
    assert ET.parse(junit).getroot().get("tests") == "0"
    assert (out / "index.html").is_file()


def test_a_loop_without_states_shows_its_table_then_says_why(
        sectors: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    log, base = sectors
    assert run_cli(["crash-loop", "--log", str(log), "--base", str(base), "--fs", "none",
                    "--states", "torn", "--check", "host:true"]) == 2
    captured = capsys.readouterr()
    assert "0 states in " in captured.out
    assert captured.err.splitlines()[-1] == f"logwrites: {TORN_NONE}"


@pytest.mark.parametrize(("make", "options", "why"), [
    ("txn", ["--states", "torn", "--atomic-unit", "4K"],
     "the log's 12 entries have no torn state after the mark 'mkfs' (entry 1): a torn state "
     "needs a write there longer than the atomic unit, 4096 bytes"),
    ("last-mark", ["--states", "reorder,torn", "--start-mark", "end"],
     "the log's 13 entries have no reorder or torn state after the mark 'end' (entry 12): "
     "a reorder state needs a write there that no later write of its epoch overwrites; a torn "
     "state needs a write there longer than the atomic unit, 512 bytes"),
    ("empty", ["--states", "prefix", "--from-start"],
     "the log's 0 entries have no prefix state from the log's first entry: a prefix state "
     "needs an entry there"),
], ids=["atomic-unit", "start-mark", "empty-log"])
def test_no_states_says_where_they_would_start(
        txn: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        make: str, options: list[str], why: str) -> None:
    log, base = txn
    if make == "last-mark":
        with LogWriter.resume(log) as w:
            w.append_mark("end")
            w.commit()
    elif make == "empty":
        log = log.with_name("empty.log")
        LogWriter.create(log, 512).close()
    assert run_cli(["crash-loop", "--log", str(log), "--base", str(base), "--fs", "none",
                    "--check", "host:true", "--json", *options]) == 2
    assert err_lines(capsys.readouterr().err) == [f"logwrites: no crash state was checked: "
                                                  f"{why}"]


# ---- an error once the states began: one line, the progress bar taken away -----------------

def test_an_error_while_checking_leaves_no_bar_above_it(
        txn: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Before, the bar (drawn at the loop's first progress call) stayed above the error line.
    import logwrites.loop as loop

    def full(*args: object, **kwargs: object) -> None:
        raise NoRoom("no room to build crash state p:1: No space left on device")

    monkeypatch.setattr(loop, "_check_one", full)
    log, base = txn
    assert run_cli(["crash-loop", "--log", str(log), "--base", str(base), "--fs", "none",
                    "--check", "host:true", "--jobs", "1"]) == 2
    assert one_line(capsys) == "no room to build crash state p:1: No space left on device"


@pytest.mark.parametrize("terminal", [False, True], ids=["file", "terminal"])
def test_the_bar_stays_after_the_states_and_goes_on_an_error(terminal: bool) -> None:
    import io

    from rich.console import Console

    from logwrites.commands.crash_loop import state_progress

    def drawn(error: bool) -> str:
        written = io.StringIO()
        console = Console(file=written, force_terminal=terminal, width=100)
        with contextlib.suppress(RuntimeError), \
                state_progress(console, transient=False) as on_progress:
            assert on_progress is not None
            on_progress(0, 5, None)
            on_progress(2, 5, None)
            if error:
                raise RuntimeError("a checker broke")
        return written.getvalue()

    assert "crash states" in drawn(error=False)
    on_error = drawn(error=True)
    if terminal:  # drawn while it ran, then the cursor goes up over it and erases its line
        assert on_error.endswith("\x1b[1A\x1b[2K") and not drawn(False).endswith("\x1b[2K")
    else:         # a file gets the bar once, at the end: not at all after an error
        assert on_error == ""


def test_a_transient_bar_on_a_file_writes_nothing() -> None:
    """--json with stderr in a file: the bar, erased at the end anyway, would leave only an
    empty line there."""
    import io

    from rich.console import Console

    from logwrites.commands.crash_loop import state_progress

    written = io.StringIO()
    with state_progress(Console(file=written, width=100), transient=True) as on_progress:
        assert on_progress is not None
        on_progress(0, 5, None)
        on_progress(5, 5, None)
    assert written.getvalue() == ""
