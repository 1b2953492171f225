"""The guest cache's upkeep: which builds are in use, and which nothing can boot again.

Every build is keyed by its inputs (guests/build.py), so the cache only grows: a kernel
developer who rebuilds bzImage gets a new entry (90-160 MiB) for every rebuild, and every
change to the agent or the build recipe leaves the previous entries unreachable. After each
build the cache drops the entries that can never be hit again:

- built from the same kernel and modules paths as the new build (those paths now hold the
  new inputs, so the old key cannot come back);
- built from a kernel or modules path that is gone;
- built by an older logwrites that did not record its inputs (its recipe differs, so this
  version computes other keys).

An entry a running process is using is never removed: every process that takes a guest from
the cache holds a shared lock on it until it exits (a crash-loop boots its guest again for
every check, long after it looked the guest up), and pruning takes each entry's lock
exclusively, without waiting, before removing it. An entry used within `GRACE_S` is kept too,
for processes of older versions, which take no lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

MANIFEST: Final = "guest.json"
LOCK: Final = "in-use"
BUILD_PREFIX: Final = ".build-"  # a build's work directory, renamed into place when complete
GRACE_S: Final = 3600.0

# Build directories this process uses: lock descriptors, kept open until the process exits.
_held: dict[Path, int] = {}


def hold(entry: Path) -> None:
    """Mark `entry` as used by this process from now until it exits, and as used just now."""
    entry = entry.resolve()
    held = _held.pop(entry, None)
    if held is not None:
        try:
            same = os.fstat(held).st_ino == (entry / LOCK).stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            _held[entry] = held
            os.utime(entry / MANIFEST)
            return
        os.close(held)  # that build was replaced (`guest build --rebuild`): lock the new one
    fd = os.open(entry / LOCK, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        # A prune renames an entry aside while it holds the lock: once ours is granted the
        # entry is either still in place, and safe, or gone (FileNotFoundError).
        os.utime(entry / MANIFEST)
    except BaseException:
        os.close(fd)
        raise
    _held[entry] = fd


def _sources(entry: Path) -> tuple[str, str] | None:
    """The (kernel, modules) paths the entry was built from; None if it did not record them
    (or its manifest is unreadable: a build that never completed)."""
    try:
        data = json.loads((entry / MANIFEST).read_text())
        return str(data["source_kernel"]), str(data.get("source_modules") or "")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _unreachable(entry: Path, built_from: tuple[str, str]) -> str | None:
    """Why no lookup can hit `entry` again, or None if one may."""
    sources = _sources(entry)
    if sources is None:
        return "built by an older logwrites"
    if sources == built_from:
        return "superseded by a build from the same kernel"
    gone = [p for p in sources if p and not os.path.exists(p)]
    if gone:
        return f"{gone[0]} is gone"
    return None


def _last_used(entry: Path) -> float:
    try:
        return (entry / MANIFEST).stat().st_mtime
    except OSError:
        return entry.stat().st_mtime


def _remove_if_unused(entry: Path) -> bool:
    """Remove `entry` unless a process holds it; True if it was removed."""
    try:
        fd = os.open(entry / LOCK, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        # Renamed aside under the lock, so no lookup finds it half removed.
        doomed = entry.with_name(f"{BUILD_PREFIX}removed-{entry.name}")
        entry.rename(doomed)
    except OSError:
        return False
    finally:
        os.close(fd)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def prune(root: Path, keep: Path, built_from: tuple[str, str],
          now: float | None = None) -> list[Path]:
    """Remove the entries of `root` that nothing can boot again (see the module's doc), and
    work directories of builds that died; `keep` is the build just made. Returns what went."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return removed
    keep = keep.resolve()
    for entry in entries:
        if entry.resolve() == keep or not entry.is_dir():
            continue
        if entry.name.startswith(BUILD_PREFIX):
            # A build killed part-way leaves its work directory; a live one is younger.
            if now - entry.stat().st_mtime > GRACE_S:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            continue
        why = _unreachable(entry, built_from)
        if why is None or now - _last_used(entry) <= GRACE_S:
            continue
        if _remove_if_unused(entry):
            log.info("removed cached guest %s: %s", entry.name, why)
            removed.append(entry)
    return removed
