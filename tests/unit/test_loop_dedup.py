"""The loop reuses verdicts only where it can prove two crash states have the same image."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from pathlib import Path

from logwrites.check import Verdict
from logwrites.crashstates import LogMap, enumerate_states
from logwrites.loop import LoopOptions, _Dedup, existing_recording, run_loop
from tests.unit.test_statebuild import OPS, SECTORS


class Recorder:
    """A checker that remembers the bytes of every image it saw, by state."""

    writes_image = False

    def __init__(self, image_only: bool) -> None:
        self.image_only, self.name = image_only, f"rec-{image_only}"
        self.seen: dict[str, str] = {}

    def check(self, image: Path, *, expect_fs: bool,
              env: Mapping[str, str] | None = None) -> Verdict:
        assert env is not None
        self.seen[env["LW_STATE"]] = hashlib.sha256(image.read_bytes()).hexdigest()
        return Verdict("pass", self.name, 0.0, "looked")


def test_repeats_reuse_image_only_verdicts_and_say_so(make_log, tmp_path: Path) -> None:
    log = make_log(OPS)
    base = tmp_path / "base.img"
    base.write_bytes(b"\xee" * SECTORS * 512)
    rec = existing_recording(log, base, None)(tmp_path)
    fsck_like, marks_reader = Recorder(True), Recorder(False)
    options = LoopOptions(kinds=("prefix", "reorder", "torn"), jobs=2, from_start=True)
    result = run_loop(rec, [fsck_like, marks_reader], options, tmp_path / "work")
    by_id = {r.state.id: r for r in result.results}
    repeats = [r for r in result.results if r.same_as is not None]
    assert repeats and result.deduplicated == len(repeats)
    assert by_id["p:3"].same_as == "p:2" and by_id["p:8"].same_as == "p:7"
    for r in repeats:
        # The image-only checker ran once for the image, and its answer is the original's.
        assert r.state.id not in fsck_like.seen
        assert r.verdicts[0].verdict == by_id[r.same_as].verdicts[0].verdict
        assert "deduplicated: same image as " + r.same_as in r.detail
        assert r.verdicts[0].detail.startswith(f"reused from {r.same_as}")
        # The checker that reads the state's marks ran on every state, and the image it saw
        # is the original's: the reuse was sound.
        assert marks_reader.seen[r.state.id] == marks_reader.seen[r.same_as]
    assert len(fsck_like.seen) == len(result.results) - len(repeats)
    assert len(marks_reader.seen) == len(result.results)
    assert all(r.verdict == "pass" for r in result.results)

    plain = run_loop(rec, [Recorder(True)], LoopOptions(
        kinds=("prefix", "reorder", "torn"), jobs=1, from_start=True, dedup=False),
        tmp_path / "work2")
    assert plain.deduplicated == 0 and len(plain.results) == len(result.results)


def test_repeats_with_only_image_only_checkers_are_not_built(make_log, tmp_path: Path) -> None:
    log = make_log(OPS)
    base = tmp_path / "base.img"
    base.write_bytes(b"\xee" * SECTORS * 512)
    rec = existing_recording(log, base, None)(tmp_path)
    fsck_like = Recorder(True)
    result = run_loop(rec, [fsck_like], LoopOptions(kinds=("prefix",), jobs=1,
                                                    from_start=True), tmp_path / "work")
    repeats = [r for r in result.results if r.same_as is not None]
    assert {r.state.id for r in repeats} >= {"p:3", "p:8"}
    assert all(r.build_seconds == 0.0 and r.verdict == "pass" for r in repeats)
    assert len(fsck_like.seen) == len(result.results) - len(repeats)


def test_a_stop_releases_repeats_waiting_for_their_original(make_log) -> None:
    """A stopped loop never checks some originals: their repeats must stop waiting at once
    (and check their own image) instead of sitting out the wait meant for a slow checker."""
    logmap = LogMap.read(make_log(OPS))
    states = enumerate_states(logmap, ["prefix"], start=-1)
    dedup = _Dedup(logmap, states, lambda state: False, wait_s=3600.0)
    repeat = next(n for n, k in enumerate(dedup.same_as) if k is not None)
    original = dedup.same_as[repeat]
    assert original is not None and dedup.is_original(original)
    answers: list[object] = []
    waiter = threading.Thread(target=lambda: answers.append(dedup.verdicts_of(original)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not answers  # waiting for the original's verdicts
    dedup.release()
    waiter.join(30)
    assert not waiter.is_alive() and answers == [None]


def test_a_published_original_hands_its_verdicts_to_its_repeats(make_log) -> None:
    logmap = LogMap.read(make_log(OPS))
    states = enumerate_states(logmap, ["prefix"], start=-1)
    dedup = _Dedup(logmap, states, lambda state: False, wait_s=3600.0)
    original = next(k for k in dedup.same_as if k is not None)
    verdicts = [Verdict("fail", "fsck", 0.1, "bad")]
    dedup.publish(original, verdicts)
    assert dedup.verdicts_of(original) == verdicts
    # A late stop changes nothing for an original already published.
    dedup.release()
    assert dedup.verdicts_of(original) == verdicts
