"""The guest cache drops builds nothing can boot again, and never one a process is using."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guests import cache

HOUR = 3600.0


def entry(root: Path, name: str, kernel: Path | None, modules: str = "",
          used_ago_s: float = 2 * HOUR) -> Path:
    """A cache entry built from `kernel` (None: by a version that recorded no sources)."""
    path = root / name
    path.mkdir(parents=True)
    manifest: dict[str, str] = {"initrd": str(path / "initrd.cpio")}
    if kernel is not None:
        manifest |= {"source_kernel": str(kernel), "source_modules": modules}
    (path / cache.MANIFEST).write_text(json.dumps(manifest))
    (path / "initrd.cpio").write_bytes(b"070701")
    when = time.time() - used_ago_s
    os.utime(path / cache.MANIFEST, (when, when))
    return path


@pytest.fixture
def kernels(tmp_path: Path) -> tuple[Path, Path]:
    mine, other = tmp_path / "linux" / "bzImage", tmp_path / "other" / "bzImage"
    for k in (mine, other):
        k.parent.mkdir(parents=True)
        k.write_bytes(b"kernel")
    return mine, other


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "guests"


@pytest.fixture
def new(root: Path, kernels: tuple[Path, Path]) -> Path:
    """The build just made, from the first of `kernels`."""
    return entry(root, "new", kernels[0], used_ago_s=0)


def test_prune_removes_what_no_lookup_can_reach_and_keeps_the_rest(
        tmp_path: Path, kernels: tuple[Path, Path], root: Path, new: Path) -> None:
    mine, other = kernels
    superseded = entry(root, "superseded", mine)
    older_version = entry(root, "older-version", None)
    gone = entry(root, "gone", tmp_path / "deleted" / "bzImage")
    modules_gone = entry(root, "modules-gone", other, str(tmp_path / "no-modules"))
    other_kernel = entry(root, "other-kernel", other)
    same_kernel_other_modules = entry(root, "other-modules", mine, str(tmp_path))
    recent = entry(root, "superseded-but-recent", mine, used_ago_s=60)
    dead_build = root / f"{cache.BUILD_PREFIX}dead"
    dead_build.mkdir()
    os.utime(dead_build, (time.time() - 2 * HOUR,) * 2)
    live_build = root / f"{cache.BUILD_PREFIX}live"
    live_build.mkdir()

    removed = cache.prune(root, new, (str(mine), ""))

    assert set(removed) == {superseded, older_version, gone, modules_gone, dead_build}
    assert {p.name for p in root.iterdir()} == {
        new.name, other_kernel.name, same_kernel_other_modules.name, recent.name,
        live_build.name}


def test_an_entry_in_use_by_another_process_is_never_removed(
        kernels: tuple[Path, Path], root: Path, new: Path) -> None:
    mine = kernels[0]
    in_use = entry(root, "in-use", mine)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from guests import cache; "
         f"cache.hold(__import__('pathlib').Path({str(in_use)!r})); print('held', flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        # hold() marked it used just now: set that back, so that only the lock protects it.
        os.utime(in_use / cache.MANIFEST, (time.time() - 2 * HOUR,) * 2)
        assert cache.prune(root, new, (str(mine), "")) == []
        assert (in_use / "initrd.cpio").is_file()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)
    # The process has exited, its lock with it: the superseded entry goes.
    assert cache.prune(root, new, (str(mine), "")) == [in_use]
    assert not in_use.exists()


def test_hold_marks_an_entry_used_and_fails_on_one_pruned_away(
        kernels: tuple[Path, Path], root: Path) -> None:
    mine = kernels[0]
    looked_up = entry(root, "looked-up", mine)
    cache.hold(looked_up)
    assert time.time() - (looked_up / cache.MANIFEST).stat().st_mtime < 60
    pruned = entry(root, "pruned", mine)
    # What a prune in another process does between this one's lookup and its hold().
    pruned.rename(root / f"{cache.BUILD_PREFIX}removed-pruned")
    with pytest.raises(FileNotFoundError):
        cache.hold(pruned)


def test_a_rebuilt_kernel_replaces_its_previous_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from guests.build import cache_root, default_guest, distribution_kernel

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernel = tmp_path / "linux" / "arch" / "x86" / "boot" / "bzImage"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(distribution_kernel().read_bytes())
    # The first build by a process that has since exited, as a user's run of yesterday.
    done = subprocess.run(
        [sys.executable, "-c", "import pathlib, sys; from guests.build import default_guest; "
         "print(default_guest(pathlib.Path(sys.argv[1])).cache_dir)", str(kernel)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    first = Path(done.stdout.strip())
    assert (first / cache.MANIFEST).is_file()
    os.utime(first / cache.MANIFEST, (time.time() - 2 * HOUR,) * 2)
    os.utime(kernel)  # rebuilt in place: the same path with a new mtime is a new key

    second = default_guest(kernel)

    assert second.cache_dir != first and second.initrd.is_file()
    assert [p.name for p in cache_root().iterdir()] == [second.cache_dir.name]
    # Looked up again, it is a hit and stays.
    assert default_guest(kernel) == second and second.initrd.is_file()


def test_a_rebuilt_entry_is_held_again(kernels: tuple[Path, Path], root: Path) -> None:
    """`guest build --rebuild` replaces the directory of a build this process holds: the hold
    must move to the new one, or another process could prune it under our feet."""
    mine = kernels[0]
    rebuilt = entry(root, "rebuilt", mine)
    cache.hold(rebuilt)
    shutil.rmtree(rebuilt)
    entry(root, "rebuilt", mine)
    cache.hold(rebuilt)
    fd = os.open(rebuilt / cache.LOCK, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
