"""Bad options of crash-loop, demo, run and guest build: one line, exit 2, refused before any
guest boots or any file is made, and no input overwritten; and what a loop that could not
check its states says on the terminal. No test here boots a guest: `no_guest` makes a boot
fail the test instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from logwrites.errors import UsageError
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
    with pytest.raises(UsageError, match=r"^--junit .*: would overwrite log "):
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
