"""Where a crash loop's recording (log, base image, consoles) lives, and whether it outlives
the loop.

With `--out` it goes into the report's directory and stays: the report points at it. Otherwise
it goes into a scratch directory that is kept only while something needs it: a failing or
unchecked state (every repro line names its log and base image), a recording that broke (its
console logs say why), or a user who asked to keep it. A loop whose every state passed, or that
was stopped (Ctrl-C, or SIGTERM from a CI job's timeout), leaves nothing behind, so a loop run
again and again in CI does not fill the disk (each recording holds two disk images and the log).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from logwrites.loop import Recorder, Recording

SCRATCH_PREFIX = "logwrites-recording-"
BLANK_IMAGES = frozenset({"disk.img", "base.img"})  # made sparse before the guest boots


def make_workdir(workdir: Path | None) -> Path | None:
    """The loop's scratch root (`--workdir`), made if it is missing, as `--out` is."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    return workdir


@dataclass(frozen=True, slots=True)
class RecordingDir:
    path: Path
    scratch: bool           # made for this loop alone: it may go when the loop is done

    @classmethod
    def for_loop(cls, out: Path | None, workdir: Path | None) -> RecordingDir:
        """The report's `recording/` under `out`, or a new scratch directory in `workdir` (the
        system's temporary directory when None)."""
        if out is not None:
            return cls(Path(out) / "recording", scratch=False)
        return cls(Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=workdir)), scratch=True)

    def settle(self, *, needed: bool, keep: bool) -> bool:
        """After the loop: remove a scratch recording that nothing `needed` (a failing or
        unchecked state's repro), unless `keep`. Whether the recording is still there."""
        if self.scratch and not needed and not keep:
            shutil.rmtree(self.path, ignore_errors=True)
        return self.path.exists()

    @contextmanager
    def dropped_if_stopped(self, *, keep: bool) -> Iterator[RecordingDir]:
        """Around recording and checking: a loop stopped by the user or by a CI job's timeout
        (KeyboardInterrupt, which SIGTERM becomes in the CLI) reports no state, so no repro
        needs the scratch recording: it goes, half-made or whole, unless `keep`."""
        try:
            yield self
        except KeyboardInterrupt:
            self.settle(needed=False, keep=keep)
            raise

    def record(self, recorder: Recorder) -> Recording:
        """Run `recorder` into this directory; whether it returns or raises, a scratch
        directory it left with nothing to read goes."""
        try:
            return recorder(self.path)
        finally:
            self.drop_if_empty()

    def drop_if_empty(self) -> None:
        """After recording: a scratch directory with nothing to read (the log was the user's,
        or the recording broke before a guest ran: at most the blank disk images the recorder
        makes first) goes. One with more stays; after a recording that broke, its console logs
        say why."""
        if self.scratch and self.path.is_dir() and all(
                p.name in BLANK_IMAGES and p.is_file() for p in self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)
