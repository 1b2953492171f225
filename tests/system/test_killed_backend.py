"""`logwrites serve` killed with SIGKILL at random moments under a write-heavy workload.

The workload comes from the test front-end (vhost/testing/frontend.py): batches of 1-8 writes
of unique data at random 4 KiB-aligned offsets, most batches followed by a FLUSH, in a loop.
A timer thread SIGKILLs the backend after a random delay; the front-end notices the hang-up.

Each of the 20 rounds restarts `logwrites serve` on the *same image* with a *fresh log* (the
previous round's unflushed writes are on the image but were never logged — a killed backend
loses its in-memory volatile tail, so a resumed log would no longer describe the image; a fresh
log whose starting image is the image as the round found it does). Then, for each round:

- our reader accepts the log and every one of its counted entries (DESIGN §3.7);
- no counted entry is torn: the write entries, in order, are exactly the first N writes the
  front-end submitted (offset and payload byte for byte; one queue, so the backend handles
  them in submission order) followed by FLUSH entries, and nothing else;
- no FLUSH the front-end saw complete lost its writes: N covers every write submitted before
  the last FLUSH that completed;
- replaying the counted log onto the round's starting image gives the state the image had
  after its N-th write, a state it went through;
- the image itself is the state after some M >= (writes seen complete) writes, except that the
  (M+1)-th write may be partly there (a killed pwritev stops between pages).
"""

from __future__ import annotations

import random
import signal
import struct
import threading
from pathlib import Path

import pytest

from vhost.testing.daemons import LogwritesServe
from vhost.testing.frontend import (
    BlkFrontend,
    CompletionTimeout,
    Status,
    flush_parts,
    write_parts,
)
from vhost.testing.logcheck import log_records, replay
from vhost.testing.protocol import BackendGone, FrontendError

ROUNDS = 20
IMAGE_BYTES = 4 << 20
BLOCK = 4096


def _payload(round_no: int, seq: int, nbytes: int, rng: random.Random) -> bytes:
    # Unique per write and per 512 bytes, so a torn or misplaced payload cannot pass.
    out = bytearray()
    for i in range(nbytes // 512):
        out += struct.pack("<III", round_no, seq, i) + rng.randbytes(500)
    return bytes(out)


def _workload(fe: BlkFrontend, round_no: int, rng: random.Random,
              submitted: list[tuple[int, bytes]], progress: dict[str, int]) -> None:
    """Writes + flushes until the backend goes away; records what was submitted/completed."""
    while True:
        batch, parts = [], []
        for _ in range(rng.randint(1, 8)):
            blocks = rng.randint(1, 8)
            offset = rng.randrange(0, IMAGE_BYTES // BLOCK - blocks) * BLOCK
            data = _payload(round_no, len(submitted) + len(batch), blocks * BLOCK, rng)
            batch.append((offset, data))
            parts.append(write_parts(offset // 512, data))
        flush = rng.random() < 0.7
        if flush:
            parts.append(flush_parts())
        requests = [fe.prepare(p) for p in parts]
        submitted.extend(batch)
        fe.publish(requests)
        fe.kick()
        fe.wait(requests)
        assert all(r.status == Status.OK for r in requests), [r.status for r in requests]
        progress["completed"] = len(submitted)
        if flush:
            progress["flushed"] = len(submitted)


def _state(start: bytes, writes: list[tuple[int, bytes]]) -> bytearray:
    image = bytearray(start)
    for offset, data in writes:
        image[offset:offset + len(data)] = data
    return image


def _image_is_history_state(image: bytes, start: bytes, submitted: list[tuple[int, bytes]],
                            completed: int) -> int:
    """The M such that `image` is the state after M writes (the M+1-th maybe partly done)."""
    state = _state(start, submitted[:completed])
    for m in range(completed, len(submitted) + 1):
        differing = [b for b in range(0, IMAGE_BYTES, BLOCK)
                     if image[b:b + BLOCK] != state[b:b + BLOCK]]
        if not differing:
            return m
        if m < len(submitted):
            offset, data = submitted[m]
            fully_done = image[offset:offset + len(data)] == data
            if not fully_done and all(offset <= b < offset + len(data)
                                      and image[b:b + BLOCK] == data[b - offset:b - offset + BLOCK]
                                      for b in differing):
                return m        # the (m+1)-th write partly done; a whole one counts in M
            state[offset:offset + len(data)] = data
    raise AssertionError(f"the image is no state of its history after {completed} completed "
                         f"of {len(submitted)} submitted writes")


@pytest.mark.slow
def test_sigkill_twenty_times_leaves_valid_logs(tmp_path: Path) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE_BYTES))
    survived = 0
    figures = []
    for round_no in range(ROUNDS):
        start = image.read_bytes()
        log_path = tmp_path / f"round{round_no}.log"
        sock = tmp_path / "vhost.sock"
        daemon = LogwritesServe(image, sock, log_path, tmp_path)
        daemon.start()
        submitted: list[tuple[int, bytes]] = []
        progress = {"completed": 0, "flushed": 0}
        assert daemon.proc is not None
        timer = threading.Timer(rng.uniform(0.05, 0.8), daemon.proc.send_signal,
                                (signal.SIGKILL,))
        timer.start()
        try:
            with BlkFrontend(sock, timeout_s=20.0) as fe:
                _workload(fe, round_no, rng, submitted, progress)
        except (BackendGone, CompletionTimeout, FrontendError, OSError):
            pass        # the kill: what follows checks what it left
        finally:
            timer.join()
            daemon.stop()
        assert daemon.returncode == -signal.SIGKILL, (seed, round_no, daemon.stderr_tail())

        sectorsize, records, payloads = log_records(log_path)   # validates every entry
        assert sectorsize == 512
        kinds = {r.kind for r in records}
        assert kinds <= {"write", "flush"}, (seed, round_no, kinds)
        if records:
            assert records[-1].kind == "flush", (seed, round_no)   # logged at FLUSH time
        writes = [(r.byte_offset, data) for r, data in zip(records, payloads, strict=True)
                  if r.kind == "write"]
        n = len(writes)
        assert writes == submitted[:n], f"seed {seed} round {round_no}: torn or foreign entry"
        assert n >= progress["flushed"], (seed, round_no, n, progress)
        assert replay(start, records, payloads) == _state(start, submitted[:n])
        m = _image_is_history_state(image.read_bytes(), start, submitted,
                                    progress["completed"])
        assert m >= n
        survived += 1
        figures.append((len(records), n, m, len(submitted)))
    print(f"\nseed {seed}; per round (entries, logged writes, writes on image, submitted): "
          f"{figures}")
    print(f"SIGKILLs survived with a valid log: {survived}/{ROUNDS}")
    assert survived == ROUNDS
    assert sum(f[1] for f in figures) > 0      # the kills did land mid-workload, not before
