"""Where a crash loop's recording lives and when it goes (logwrites.recordingdir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from logwrites.loop import Recording
from logwrites.recordingdir import SCRATCH_PREFIX, RecordingDir


def recorded(home: RecordingDir) -> RecordingDir:
    (home.path / "disk.log").write_bytes(b"log")
    return home


def test_scratch_recording_goes_when_every_state_passed(tmp_path: Path) -> None:
    home = recorded(RecordingDir.for_loop(None, tmp_path))
    assert home.scratch and home.path.parent == tmp_path
    assert home.path.name.startswith(SCRATCH_PREFIX)
    assert home.settle(needed=False, keep=False) is False
    assert list(tmp_path.iterdir()) == []


def test_scratch_recording_stays_for_a_failing_state_or_when_asked(tmp_path: Path) -> None:
    failing = recorded(RecordingDir.for_loop(None, tmp_path))
    assert failing.settle(needed=True, keep=False) is True
    assert (failing.path / "disk.log").read_bytes() == b"log"
    asked = recorded(RecordingDir.for_loop(None, tmp_path))
    assert asked.settle(needed=False, keep=True) is True
    assert (asked.path / "disk.log").is_file()


def test_a_report_directory_keeps_its_recording(tmp_path: Path) -> None:
    home = RecordingDir.for_loop(tmp_path / "out", tmp_path)
    assert not home.scratch and home.path == tmp_path / "out" / "recording"
    home.path.mkdir(parents=True)
    recorded(home)
    assert home.settle(needed=False, keep=False) is True
    home.drop_if_empty()
    assert (home.path / "disk.log").is_file()


def test_only_an_empty_scratch_directory_is_dropped_after_recording(tmp_path: Path) -> None:
    empty = RecordingDir.for_loop(None, tmp_path)
    empty.drop_if_empty()
    assert not empty.path.exists()
    # A recording that broke after writing its console log keeps it for the user.
    broken = RecordingDir.for_loop(None, tmp_path)
    (broken.path / "run").mkdir()
    (broken.path / "run" / "console.log").write_text("panic")
    broken.drop_if_empty()
    assert (broken.path / "run" / "console.log").read_text() == "panic"


def test_record_drops_the_directory_a_user_log_left_empty(tmp_path: Path) -> None:
    home = RecordingDir.for_loop(None, tmp_path)
    user_log = Recording(tmp_path / "mine.log", tmp_path / "mine.img")
    assert home.record(lambda workdir: user_log) is user_log
    assert list(tmp_path.iterdir()) == []


def test_record_that_broke_before_a_guest_ran_leaves_nothing(tmp_path: Path) -> None:
    home = RecordingDir.for_loop(None, tmp_path)

    def no_backend(workdir: Path) -> Recording:
        for name in ("disk.img", "base.img"):
            (workdir / name).write_bytes(bytes(512))
        raise RuntimeError("serve did not get ready")

    with pytest.raises(RuntimeError):
        home.record(no_backend)
    assert list(tmp_path.iterdir()) == []


def test_record_that_raises_keeps_what_it_wrote(tmp_path: Path) -> None:
    home = RecordingDir.for_loop(None, tmp_path)

    def broken(workdir: Path) -> Recording:
        (workdir / "console.log").write_text("kernel panic")
        raise RuntimeError("guest died")

    with pytest.raises(RuntimeError):
        home.record(broken)
    assert (home.path / "console.log").read_text() == "kernel panic"


def test_a_stopped_loop_drops_its_scratch_recording_unless_kept(tmp_path: Path) -> None:
    home = RecordingDir.for_loop(None, tmp_path)
    with pytest.raises(KeyboardInterrupt), home.dropped_if_stopped(keep=False):
        recorded(home)
        raise KeyboardInterrupt
    assert not home.path.exists()
    kept = RecordingDir.for_loop(None, tmp_path)
    with pytest.raises(KeyboardInterrupt), kept.dropped_if_stopped(keep=True):
        recorded(kept)
        raise KeyboardInterrupt
    assert (kept.path / "disk.log").is_file()


def test_only_a_stop_drops_the_recording(tmp_path: Path) -> None:
    home = RecordingDir.for_loop(None, tmp_path)
    with pytest.raises(RuntimeError), home.dropped_if_stopped(keep=False):
        recorded(home)
        raise RuntimeError("guest died")
    assert (home.path / "disk.log").is_file()
    report = RecordingDir.for_loop(tmp_path / "out", tmp_path)
    report.path.mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt), report.dropped_if_stopped(keep=False):
        recorded(report)
        raise KeyboardInterrupt
    assert (report.path / "disk.log").is_file()
