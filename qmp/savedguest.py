"""A booted guest saved once and restored for every guest check of a crash-replay loop.

A guest check (xfs log recovery, a user's `guest:` checker) booted the guest for every crash
state: about 4 s under TCG here, of which the check itself took about 1. The first check of a
loop now saves its freshly booted guest, with the filesystem's module loaded, before it runs
(QEMU's migration to a file); every later check starts its own QEMU from that file instead of
booting (about 1.5 s for the same check). Each check still runs in a QEMU of its own, so no
kernel state carries over from one crash state to the next.

A restored QEMU gets the state's image as its disk where the saved one had the first state's.
Both are crash states of one recording, so the disk's size, and with it everything QEMU
migrates of the device, is the same; an image of another size boots as before. Linux drops a
block device's page cache when its last user closes it, and nothing holds the disk open when
the guest is saved; the agent still drops it and rereads the partition table before anything
reads the disk (`LW_NEW_DISK`), so that no kernel that kept a page of the first image can
hand it to a check of another.

A guest that cannot be saved or restored (a kernel or device that refuses migration) is
logged once, and every check boots, as before. `LOGWRITES_SAVED_GUEST=0` boots every check.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmp.machine import Machine

log = logging.getLogger(__name__)

NEW_DISK_ENV = {"LW_NEW_DISK": "1"}  # tells the agent the disk changed under a restored guest


def enabled() -> bool:
    return os.environ.get("LOGWRITES_SAVED_GUEST", "1") != "0"


class SavedGuest:
    """The saved guest of one loop's guest checks: at most one machine state per disk size.

    Thread-safe: checks run in worker threads, each with its own event loop. One check saves
    the state for a size (`claim`, then `save`); the others boot meanwhile, rather than wait.
    The state files live in a scratch directory removed by `close` or at exit.
    """

    def __init__(self, fs: str | None, scratch_parent: Path | None = None) -> None:
        self.fs = fs
        self._lock = threading.Lock()
        self._states: dict[int, Path] = {}
        self._saving: set[int] = set()
        self._failed: str | None = None
        self._scratch_parent = scratch_parent
        self._dir: Path | None = None       # made by the first save: a loop may never need it
        self._cleanup: weakref.finalize | None = None
        self.restored = 0   # checks that ran in a restored guest (for tests and reports)

    def state_for(self, image: Path) -> Path | None:
        """The saved machine state to restore for a check of `image`, or None: boot."""
        size = image.stat().st_size
        with self._lock:
            return None if self._failed else self._states.get(size)

    def claim(self, image: Path) -> bool:
        """Whether the caller is to save the state for `image`'s size (after its boot)."""
        size = image.stat().st_size
        with self._lock:
            if self._failed or size in self._states or size in self._saving:
                return False
            self._saving.add(size)
            return True

    async def save(self, machine: Machine, image: Path) -> None:
        """Save `machine`, just booted on `image` and idle, for later checks, then let it go on.
        A failure is logged and turns saving and restoring off; the machine is then in an
        unknown state, and the caller boots another (:raise MachineError: from QEMU)."""
        size = image.stat().st_size
        try:
            state = self._scratch() / f"guest-{size}.state"
        except OSError as err:
            with self._lock:
                self._saving.discard(size)
            self.failed(f"saving the guest for later checks: {err}")
            raise
        partial = state.with_suffix(".partial")
        try:
            if self.fs:
                # Loaded before the save, the module costs a restored check nothing (xfs takes
                # seconds to load under TCG).
                result = await machine.run(f"#!/bin/sh\nmodprobe fs-{self.fs}\n",
                                           dev="/dev/vda", timeout_s=120)
                if result is None or not result.ok:
                    raise OSError(f"modprobe fs-{self.fs} in the guest failed")
            await machine.save_state(partial)
            partial.rename(state)
            await machine.cont()
            with self._lock:
                self._states[size] = state
        except Exception as err:    # a stop (KeyboardInterrupt) is no failure of saving
            partial.unlink(missing_ok=True)     # a full disk stays full otherwise
            self.failed(f"saving the guest for later checks: {err}")
            raise
        finally:
            with self._lock:
                self._saving.discard(size)
        log.info("guest saved for later checks: %s (%d MiB)", state,
                 state.stat().st_size >> 20)

    def failed(self, why: str) -> None:
        """Boot every check from now on, and say why once."""
        with self._lock:
            first, self._failed = self._failed is None, self._failed or why
        if first:
            log.warning("%s; every guest check boots the guest instead", why)

    def count_restored(self) -> None:
        with self._lock:
            self.restored += 1

    def _scratch(self) -> Path:
        with self._lock:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="lw-saved-guest-",
                                                  dir=self._scratch_parent))
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
            return self._dir

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()


__all__ = ["NEW_DISK_ENV", "SavedGuest", "enabled"]
