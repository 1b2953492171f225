"""Bad arguments of the Python API's `crash_loop` (and the crash-loop options they mirror): a
`UsageError` with one line, raised before anything is recorded, booted or created. No test
here boots a guest: `no_guest` makes a boot fail the test instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import tests.unit.test_option_inputs as option_inputs
from logwrites.api import assert_no_failures, crash_loop
from logwrites.errors import LogwritesError, UsageError
from tests.unit.test_option_inputs import one_line
from tests.unit.test_replay_cli import run_cli

no_guest, txn = option_inputs.no_guest, option_inputs.txn  # the fixtures, shared
CHECKED: dict[str, Any] = {"fs": "none", "checks": ["host:true"]}


def refused(tmp_path: Path, error: str, **kwargs: Any) -> None:
    """`crash_loop(**kwargs)` raises UsageError matching `error`, and made no file."""
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UsageError, match=error) as raised:
        crash_loop(**kwargs)
    assert "\n" not in str(raised.value)
    assert sorted(tmp_path.rglob("*")) == before


# ---- 1. path arguments may be str ---------------------------------------------------------

def test_a_kernel_given_as_str_is_read_as_a_path(tmp_path: Path) -> None:
    # Not a bzImage we can read: refused by the kernel's check, not by an AttributeError.
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"not a kernel" * 100)
    with pytest.raises(LogwritesError, match=rf"^kernel {kernel}: not an x86 bzImage"):
        crash_loop(**CHECKED, kernel=str(kernel))


def test_path_arguments_reach_the_guest_as_paths(
        no_guest: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logwrites.guestrecord as guestrecord

    seen: list[object] = []
    monkeypatch.setattr(guestrecord, "_guest", lambda kernel, modules: seen.append(kernel))
    with pytest.raises(AssertionError, match="a guest would boot"):
        crash_loop(**CHECKED, kernel=str(tmp_path / "bzImage"), workdir=str(tmp_path))
    assert seen == [tmp_path / "bzImage"]


# ---- 2. fs and mkfs_opts -------------------------------------------------------------------

@pytest.mark.parametrize("fs", ["ntfs", "NONE", ""])
def test_an_unknown_fs_is_refused(txn: tuple[Path, Path], tmp_path: Path, fs: str) -> None:
    log, base = txn
    error = rf"^crash_loop\(fs={fs!r}\): one of ext4, xfs, btrfs, none$"
    refused(tmp_path, error, fs=fs, checks=["host:true"], log=log, base=base)


def test_an_unknown_fs_is_refused_before_a_recording(no_guest: None, tmp_path: Path) -> None:
    refused(tmp_path, r"^crash_loop\(fs='ntfs'\)", fs="ntfs", checks=["host:true"],
            workdir=tmp_path)


@pytest.mark.parametrize(("mkfs_opts", "error"), [
    (5, r"^crash_loop\(mkfs_opts=5\): a str, or None$"),
    ('-O "', r"""^mkfs_opts '-O "': the guest splits it at whitespace and takes quotes"""),
    ("-L 'a b'", r"^mkfs_opts .*: the guest splits it at whitespace"),
    ("-L a\\ b", r"^mkfs_opts .*: the guest splits it at whitespace"),
])
def test_mkfs_opts_the_guest_cannot_take_are_refused(
        no_guest: None, tmp_path: Path, mkfs_opts: object, error: str) -> None:
    refused(tmp_path, error, fs="ext4", checks=["host:true"], mkfs_opts=mkfs_opts,
            workdir=tmp_path)


def test_the_cli_refuses_a_quote_in_mkfs_opts(
        no_guest: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(["crash-loop", "--mkfs-opts", '-O "', "--workdir", str(tmp_path)]) == 2
    assert one_line(capsys).startswith("--mkfs-opts '-O \"': the guest splits it")
    assert list(tmp_path.iterdir()) == []


# ---- 3. wrong types: named, not a TypeError deep inside --------------------------------------

WRONG_TYPES: list[tuple[dict[str, Any], str]] = [
    ({"max_states": "3"}, r"^crash_loop\(max_states='3'\): an int$"),
    ({"max_states": 2.5}, r"^crash_loop\(max_states=2\.5\): an int$"),
    ({"jobs": "2"}, r"^crash_loop\(jobs='2'\): an int of at least 1"),
    ({"jobs": 0}, r"^--jobs 0: must be at least 1$"),
    ({"atomic_unit": 4.0}, r"^crash_loop\(atomic_unit=4\.0\): bytes as an int or a size str"),
    ({"atomic_unit": "4Q"}, r"^size '4Q': a number of bytes"),
    ({"timeout_s": "5"}, r"^crash_loop\(timeout_s='5'\): seconds as an int or float$"),
    ({"timeout_s": 0}, r"^--timeout 0: must be more than 0 seconds$"),
    ({"states": None}, r"^crash_loop\(states=None\): a sequence of str"),
    ({"states": "prefix"}, r"^crash_loop\(states='prefix'\): a sequence of str .*bare str"),
    ({"checks": [None]}, r"^crash_loop\(checks=\[None\]\): a sequence of str"),
    ({"checks": "fsck"}, r"^crash_loop\(checks='fsck'\): a sequence of str"),
    ({"on_progress": 5}, r"^crash_loop\(on_progress=5\): a callable"),
    ({"seed": None}, r"^crash_loop\(seed=None\): an int$"),
    ({"shrink": "no"}, r"^crash_loop\(shrink='no'\): True or False$"),
    ({"out": b"out"}, r"^crash_loop\(out=b'out'\): a str or os\.PathLike \(not bytes"),
    ({"junit": ""}, r"^crash_loop\(junit=''\): a str or os\.PathLike \(not bytes, not empty"),
]


@pytest.mark.parametrize(("kwargs", "error"), WRONG_TYPES,
                         ids=[repr(k)[1:-1] for k, _ in WRONG_TYPES])
def test_wrong_types_are_refused_with_a_log(
        txn: tuple[Path, Path], tmp_path: Path, kwargs: dict[str, Any], error: str) -> None:
    log, base = txn
    refused(tmp_path, error, **({**CHECKED, "log": log, "base": base} | kwargs))


def test_a_log_path_in_bytes_is_refused(txn: tuple[Path, Path], tmp_path: Path) -> None:
    log, base = txn
    refused(tmp_path, r"^crash_loop\(log=b'.*'\): a str or os\.PathLike", **CHECKED,
            log=bytes(log), base=base)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"workload": 123}, r"^crash_loop\(workload=123\): a str or os\.PathLike"),
    ({"image_size": 64.0}, r"^crash_loop\(image_size=64\.0\): bytes as an int or a size str"),
    ({"image_size": 1000}, r"^--image-size 1000: not a whole number of 512-byte sectors$"),
    ({"memory_mib": "1024"}, r"^crash_loop\(memory_mib='1024'\): an int$"),
    ({"cpus": 1.0}, r"^crash_loop\(cpus=1\.0\): an int$"),
], ids=["workload", "image_size-float", "image_size-int", "memory_mib", "cpus"])
def test_wrong_types_are_refused_before_a_recording(
        no_guest: None, tmp_path: Path, kwargs: dict[str, Any], error: str) -> None:
    refused(tmp_path, error, **CHECKED, workdir=tmp_path, **kwargs)


def test_an_int_image_size_is_bytes(no_guest: None, tmp_path: Path) -> None:
    # Accepted: the recording is reached (and no_guest stops it there).
    with pytest.raises(AssertionError, match="a guest would boot"):
        crash_loop(**CHECKED, image_size=8 << 20, workdir=tmp_path)


def test_an_atomic_unit_may_be_a_size_as_the_cli_takes_it(txn: tuple[Path, Path]) -> None:
    log, base = txn
    # The log's writes are 4 KiB blocks: 1 KiB units tear them (a 4K unit would leave no
    # torn state, and so nothing to compare).
    as_size = crash_loop(**CHECKED, log=log, base=base, states=["torn"], atomic_unit="1K")
    as_int = crash_loop(**CHECKED, log=log, base=base, states=["torn"], atomic_unit=1024)
    assert [r.state.id for r in as_size.results] == [r.state.id for r in as_int.results] != []
    assert as_size.exit_status == 0 and as_size.atomic_unit == 1024


# ---- 4. from_start and start_mark: one or the other ---------------------------------------

def test_the_api_refuses_from_start_with_a_start_mark(
        txn: tuple[Path, Path], tmp_path: Path) -> None:
    log, base = txn
    refused(tmp_path, r"^from_start and start_mark 'nosuch': give one", **CHECKED, log=log,
            base=base, from_start=True, start_mark="nosuch")


def test_the_cli_refuses_from_start_with_a_start_mark(
        txn: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    log, base = txn
    assert run_cli(["crash-loop", "--log", str(log), "--base", str(base), "--fs", "none",
                    "--check", "host:true", "--start-mark", "nosuch", "--from-start"]) == 2
    assert one_line(capsys) == ("--from-start and --start-mark 'nosuch': give one (states "
                                "start at the log's first entry, or at the mark)")


# ---- 5. a loop without states checked nothing ----------------------------------------------

def test_a_loop_without_states_is_no_pass(txn: tuple[Path, Path], tmp_path: Path) -> None:
    # 4 KiB units leave the log's 4 KiB writes whole: no torn state. Before, exit_status 0
    # and assert_no_failures passed on a loop that had checked nothing.
    log, base = txn
    junit = tmp_path / "junit.xml"
    result = crash_loop(**CHECKED, log=log, base=base, states=["torn"], atomic_unit="4K",
                        junit=junit)
    assert result.results == [] and result.exit_status == 2
    assert 'tests="0"' in junit.read_text()
    why = ("no crash state was checked: the log's 12 entries have no torn state after the "
           "mark 'mkfs' (entry 1): a torn state needs a write there longer than the atomic "
           "unit, 4096 bytes")
    with pytest.raises(AssertionError, match=re.escape(why)):
        assert_no_failures(result)
