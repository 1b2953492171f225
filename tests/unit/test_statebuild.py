"""Incremental state building (logwrites.statebuild) against a model of each crash state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from logwrites.crashstates import CrashState, LogMap, enumerate_states
from logwrites.errors import UsageError
from logwrites.logfile import LogReader
from logwrites.statebuild import (
    ImageKeys,
    StateBuilder,
    build_from_zero,
    build_state,
    clone_file,
    memory_dir,
)

SECTORS = 64
OPS = [("w", 0, 4, 0xA0), ("d", 0, SECTORS), ("f",), ("m", "mkfs"),
       ("w", 1, 1, 1), ("w", 2, 3, 2), ("w", 1, 1, 3), ("f",), ("m", "one"),
       ("w", 10, 4, 4), ("d", 2, 1), ("fua", 20, 1, 5), ("w", 30, 2, 6), ("w", 40, 1, 7)]


def model(logmap: LogMap, ops: list[tuple], state: CrashState, sectorsize: int) -> bytes:
    """What the image of `state` must hold, from the ops alone (base image: 0xEE bytes)."""
    image = bytearray(b"\xee" * SECTORS * sectorsize)
    for index, op in enumerate(ops):
        if index > state.end and not (state.torn and index == state.torn[0]):
            break
        if index in state.dropped:
            continue
        kind = op[0]
        nr = op[2] if kind in ("w", "fua", "d") else 0
        if state.torn and index == state.torn[0]:
            nr = state.torn[1]
        if kind in ("w", "fua"):
            image[op[1] * sectorsize:(op[1] + nr) * sectorsize] = bytes([op[3]]) * nr * sectorsize
        elif kind == "d":
            image[op[1] * sectorsize:(op[1] + nr) * sectorsize] = bytes(nr * sectorsize)
    return bytes(image)


@pytest.fixture(params=[512, 4096])
def setup(request, make_log, tmp_path: Path):
    sectorsize = request.param
    log_path = make_log(OPS, sectorsize)
    base = tmp_path / "base.img"
    base.write_bytes(b"\xee" * SECTORS * sectorsize)
    return log_path, base, sectorsize


def test_every_state_matches_the_model(setup, tmp_path: Path) -> None:
    log_path, base, sectorsize = setup
    logmap = LogMap.read(log_path)
    states = enumerate_states(logmap, ["prefix", "reorder", "torn"], start=-1)
    assert {s.kind for s in states} == {"prefix", "reorder", "torn"}
    with LogReader(log_path) as reader:
        builder = StateBuilder(reader, logmap, base, tmp_path / "work")
        try:
            for state in states:
                builder.checkpoint(state.checkpoint)
                image = builder.build(state, tmp_path / "state.img")
                assert image.read_bytes() == model(logmap, OPS, state, sectorsize), state.id
                builder.release(state.checkpoint)
                scratch = build_from_zero(reader, logmap, base, state, tmp_path / "zero.img")
                assert scratch >= 0
                assert (tmp_path / "zero.img").read_bytes() == image.read_bytes(), state.id
        finally:
            builder.close()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []


def test_incremental_build_applies_each_entry_about_once(make_log, tmp_path: Path) -> None:
    # 200 epochs of 3 writes: building every prefix state from checkpoints touches each entry
    # once for the cursor plus its own epoch, where replaying from zero grows quadratically.
    ops: list[tuple] = [("m", "mkfs")]
    for i in range(200):
        ops += [("w", i % 60, 1, i % 250 + 1), ("w", 61, 1, 1), ("w", 62, 1, 2), ("f",)]
    log_path = make_log(ops)
    base = tmp_path / "base.img"
    base.write_bytes(bytes(SECTORS * 512))
    logmap = LogMap.read(log_path)
    states = enumerate_states(logmap, ["prefix"])
    with LogReader(log_path) as reader:
        builder = StateBuilder(reader, logmap, base, tmp_path / "work")
        for state in states:
            builder.checkpoint(state.checkpoint)
            builder.build(state, tmp_path / "s.img")
            builder.release(state.checkpoint)
        builder.close()
        from_zero = sum(build_from_zero(reader, logmap, base, s, tmp_path / "z.img")
                        for s in states[::20])
    assert builder.entries_applied <= 600
    assert from_zero > 20 * 600 // 10  # every 20th state alone costs more than all of ours


def test_build_state_rebuilds_an_id_onto_a_target(setup, tmp_path: Path) -> None:
    log_path, base, sectorsize = setup
    logmap = LogMap.read(log_path)
    target = tmp_path / "target.img"
    clone_file(base, target)
    state = build_state(log_path, target, "r:7:-5")
    assert state.dropped == (5,)
    assert target.read_bytes() == model(logmap, OPS, state, sectorsize)
    with pytest.raises(UsageError):
        build_state(log_path, target, "r:7:-9")


def test_whole_device_discard_is_one_step(make_log, tmp_path: Path) -> None:
    big = 1 << 30  # a 1 GiB sparse image, discarded whole as mkfs does
    log_path = make_log([("w", 0, 1, 9), ("d", 0, big // 512), ("w", 8, 1, 7), ("f",)])
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(big)
        f.seek(big - 4096)
        f.write(b"\x55" * 4096)
    target = tmp_path / "t.img"
    clone_file(base, target)
    build_state(log_path, target, "p:3")
    with open(target, "rb") as f:
        f.seek(big - 4096)
        assert f.read(4096) == bytes(4096)
        f.seek(8 * 512)
        assert f.read(512) == b"\x07" * 512
    assert os.stat(target).st_blocks * 512 < 1 << 20  # still sparse: no 1 GiB of zeros written


def test_clone_keeps_holes_and_size(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"x" * 8192)
    clone_file(src, tmp_path / "dst")
    dst = tmp_path / "dst"
    assert dst.stat().st_size == 64 << 20
    assert dst.stat().st_blocks * 512 <= 1 << 20
    with open(dst, "rb") as f:
        f.seek(32 << 20)
        assert f.read(8192) == b"x" * 8192


@pytest.mark.parametrize("undo_limit", [None, 1])
def test_view_is_each_state_and_leaves_the_cursor_at_its_checkpoint(
        setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, undo_limit: int | None) -> None:
    # The copy-free path: the cursor itself becomes the state, then goes back. With a tiny
    # UNDO_LIMIT every state with local writes takes the copy fallback instead.
    import logwrites.statebuild as statebuild
    if undo_limit is not None:
        monkeypatch.setattr(statebuild, "UNDO_LIMIT", undo_limit)
    log_path, base, sectorsize = setup
    logmap = LogMap.read(log_path)
    states = enumerate_states(logmap, ["prefix", "reorder", "torn"], start=-1)
    with LogReader(log_path) as reader:
        builder = StateBuilder(reader, logmap, base, tmp_path / "work")
        try:
            for state in states:
                with builder.view(state) as image:
                    assert image.read_bytes() == model(logmap, OPS, state, sectorsize), state.id
                at_checkpoint = CrashState("p", "prefix", state.checkpoint, state.checkpoint, 0)
                assert builder.cursor.read_bytes() == model(logmap, OPS, at_checkpoint,
                                                            sectorsize), state.id
            assert (builder.copies > 0) == (undo_limit is not None)
            builder.reset()  # back to the base; the next view replays from entry 0
            last = states[-1]
            with builder.view(last) as image:
                assert image.read_bytes() == model(logmap, OPS, last, sectorsize)
        finally:
            builder.close()


def test_equal_image_keys_mean_equal_images(setup, tmp_path: Path) -> None:
    log_path, _base, sectorsize = setup
    logmap = LogMap.read(log_path)
    states = enumerate_states(logmap, ["prefix", "reorder", "torn"], start=-1)
    keys = ImageKeys(logmap)
    by_key: dict[object, list[CrashState]] = {}
    for state in states:
        by_key.setdefault(keys.key(state), []).append(state)
    repeats = [group for group in by_key.values() if len(group) > 1]
    # The flush at 2 and the mark at 3 (nothing written between) share an image; so do 7 and 8.
    assert any({"p:2", "p:3"} <= {s.id for s in group} for group in repeats)
    assert any({"p:7", "p:8"} <= {s.id for s in group} for group in repeats)
    for group in repeats:
        images = {model(logmap, OPS, s, sectorsize) for s in group}
        assert len(images) == 1, [s.id for s in group]
    # Writes between two states: different keys.
    assert keys.key(next(s for s in states if s.id == "p:7")) != keys.key(
        next(s for s in states if s.id == "p:3"))


def test_cursor_lives_in_memory_when_there_is_room(setup, tmp_path: Path) -> None:
    log_path, base, _ = setup
    logmap = LogMap.read(log_path)
    with LogReader(log_path) as reader:
        auto = StateBuilder(reader, logmap, base, tmp_path / "a")
        on_disk = StateBuilder(reader, logmap, base, tmp_path / "b", in_memory=False)
        try:
            assert memory_dir(base.stat().st_size) is not None  # /dev/shm on our machines
            assert auto.cursor.parent.parent == Path("/dev/shm")
            assert on_disk.cursor.parent == tmp_path / "b"
            assert auto.cursor.read_bytes() == on_disk.cursor.read_bytes() == base.read_bytes()
        finally:
            auto.close()
            on_disk.close()
        assert not auto.cursor.parent.exists()


def test_the_cursor_record_of_writes_covers_every_changed_byte(setup, tmp_path: Path) -> None:
    # What checkers rely on to compare only written ranges: between two states' views,
    # every byte of the cursor outside `changes.since(then)` is the same.
    log_path, base, _sectorsize = setup
    logmap = LogMap.read(log_path)
    states = enumerate_states(logmap, ["prefix", "reorder", "torn"], start=-1)
    with LogReader(log_path) as reader:
        builder = StateBuilder(reader, logmap, base, tmp_path / "work")
        try:
            last: tuple[bytes, int] | None = None
            for state in states:
                with builder.view(state) as image:
                    now = image.read_bytes()
                    changes = builder.changes_of(image)
                    assert changes is not None
                    if last is not None:
                        written = changes.since(last[1])
                        assert written is not None
                        spans = list(written.within(0, len(now)))
                        masked = bytearray(now), bytearray(last[0])
                        for at, n in spans:
                            for image_bytes in masked:
                                image_bytes[at:at + n] = bytes(n)
                        assert masked[0] == masked[1], state.id
                    last = now, changes.generation
            builder.reset()
            assert builder.changes.since(last[1]) is None  # type: ignore[index]
        finally:
            builder.close()
    assert builder.changes_of(tmp_path / "elsewhere.img") is None
