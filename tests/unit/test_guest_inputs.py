"""Bad inputs of `guest build` (and of every command that finds a guest): one line, exit 2,
no hang, no traceback, before any guest is built; and where the guest cache goes when the
environment says something odd. No test here builds or boots a guest.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from guests.build import GuestError, _module_closure, cache_root
from tests.unit.test_option_inputs import one_line
from tests.unit.test_replay_cli import run_cli


def fake_kernel(path: Path, version: bytes = b"6.1.0-test") -> Path:
    """A file whose setup header carries `version`: enough for `kernel_version`."""
    head = bytearray(0x400)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x100).to_bytes(2, "little")
    head[0x300:0x300 + len(version) + 1] = version + b"\0"
    path.write_bytes(head)
    return path


@pytest.mark.timeout(20)
def test_a_fifo_as_kernel_is_refused_without_opening_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "kernel"
    os.mkfifo(fifo)
    # Should the FIFO be opened after all, this writer lets the open return (and the test
    # fail on its message) rather than hang the suite.
    writer = threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True)
    writer.start()
    try:
        assert run_cli(["guest", "build", "--kernel", str(fifo)]) == 2
        assert one_line(capsys) == f"kernel {fifo}: a FIFO, not a regular file"
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer's open return
        writer.join(5)


def test_a_character_device_as_kernel_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["guest", "build", "--kernel", "/dev/null"]) == 2
    assert one_line(capsys) == "kernel /dev/null: a character device, not a regular file"


def test_a_modules_dep_that_is_not_text_is_one_line_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "modules.dep").write_bytes(bytes(range(128, 256)) * 8)
    kernel = fake_kernel(tmp_path / "bzImage")
    assert run_cli(["guest", "build", "--kernel", str(kernel), "--modules", str(modules)]) == 2
    assert one_line(capsys).startswith(f"{modules}/modules.dep: not a text file (")
    assert not (tmp_path / "cache").exists()  # refused before a build began


def test_a_modules_softdep_that_is_not_text_is_one_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text("kernel/virtio_blk.ko:\n")
    (tmp_path / "modules.softdep").write_bytes(b"\xff\xfe softdep")
    with pytest.raises(GuestError, match=r"modules\.softdep: not a text file \("):
        _module_closure(tmp_path)


@pytest.mark.parametrize("xdg", ["banana", "./cache", ""])
def test_a_relative_or_empty_xdg_cache_home_is_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xdg: str) -> None:
    # XDG base directory spec: "If an implementation encounters a relative path in any of
    # these variables it should consider the path invalid and ignore it."
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert cache_root() == tmp_path / "home" / ".cache" / "logwrites" / "guests"


def test_an_absolute_xdg_cache_home_is_used(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "logwrites" / "guests"


def test_an_empty_home_is_taken_as_no_home(monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "")
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    assert cache_root() == home / ".cache" / "logwrites" / "guests"
    assert home != Path("/")  # else this test could not tell /.cache from the right place
