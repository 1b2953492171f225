"""`logwrites serve --resume --pending-journal`: a killed backend restarted on the same image
and log loses no completed write and the log goes on describing the image.

The test front-end plays QEMU's reconnecting chardev. Without in-flight tracking it reconnects
to the restarted backend and resubmits the requests it had not seen complete itself (then a
write done but unpublished at the kill may be logged twice). With INFLIGHT_SHMFD (as QEMU's
vhost-user-blk) it keeps the guest memory, rings and in-flight region across the restart and
the restarted backend resubmits: every write is then logged exactly once, including those the
backend's failpoints (vhost/pending.py) leave done but unpublished.
"""

from __future__ import annotations

import os
import random
import re
import signal
import struct
import threading
from collections import Counter
from pathlib import Path

import pytest

from vhost.pending import FAILPOINT_ENV
from vhost.testing import protocol as vu
from vhost.testing.daemons import LogwritesServe
from vhost.testing.frontend import (
    BlkFrontend,
    BlkRequest,
    CompletionTimeout,
    Status,
    flush_parts,
    write_parts,
)
from vhost.testing.logcheck import log_records, replay
from vhost.testing.protocol import BackendGone, FrontendError, ProtocolFeature

IMAGE_BYTES = 4 << 20
BLOCK = 4096
KILLS = 10


def serve(tmp_path: Path, image: Path, log: Path, *extra: str,
          failpoint: str | None = None, verbose: bool = False) -> LogwritesServe:
    d = LogwritesServe(image, tmp_path / "s.sock", log, tmp_path,
                       extra_args=["--pending-journal", *extra], verbose=verbose)
    if failpoint is not None:
        d.env = {FAILPOINT_ENV: failpoint}
    return d.start()


def fresh(tmp_path: Path) -> tuple[int, random.Random, Path, Path]:
    """A seed (printed on failure; LOGWRITES_TEST_SEED replays one), its generator, a zeroed
    image and where its log goes."""
    seed = int(os.environ.get("LOGWRITES_TEST_SEED") or random.randrange(1 << 32))
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE_BYTES))
    return seed, random.Random(seed), image, tmp_path / "log"


def payload(seq: int, nbytes: int) -> bytes:
    return b"".join(struct.pack("<II", seq, i) * 64 for i in range(nbytes // 512))


@pytest.mark.slow
def test_resume_restores_completed_unflushed_writes(tmp_path: Path) -> None:
    image, log = tmp_path / "disk.img", tmp_path / "log"
    image.write_bytes(bytes(IMAGE_BYTES))
    d = serve(tmp_path, image, log)
    with BlkFrontend(d.socket_path) as fe:
        assert fe.write(0, payload(1, BLOCK)).status == Status.OK
        assert fe.flush().status == Status.OK
        assert fe.write(8, payload(2, BLOCK)).status == Status.OK      # completed, unflushed
        assert fe.write(16, payload(3, BLOCK)).status == Status.OK
        d.stop(signal.SIGKILL)
    d = serve(tmp_path, image, log, "--resume")
    assert "resumed entries=2 restored=2" in d.stdout_lines[-1]
    with BlkFrontend(d.socket_path) as fe:
        assert fe.write(24, payload(4, BLOCK)).status == Status.OK
        assert fe.flush().status == Status.OK
    assert d.stop() == 0
    _, records, payloads = log_records(log)
    got = [(r.kind, r.byte_offset) for r in records]
    assert got[:7] == [("write", 0), ("flush", 0), ("write", 8 * 512), ("write", 16 * 512),
                       ("write", 24 * 512), ("flush", 0), ("mark", 0)]
    assert replay(bytes(IMAGE_BYTES), records, payloads) == image.read_bytes()
    assert not (tmp_path / "log.pending").exists()        # a clean stop removes it


@pytest.mark.slow
def test_ten_kills_and_resumes_lose_no_completed_write(tmp_path: Path) -> None:
    seed, rng, image, log = fresh(tmp_path)
    d = serve(tmp_path, image, log)
    seen_complete: list[int] = []            # write sequence numbers the front-end saw done
    resubmitted = 0
    again: set[int] = set()                  # write sequence numbers resubmitted
    retry: list[tuple[int, int, bytes] | None] = []   # not seen complete (None: a FLUSH)
    seq = 0
    for kill in range(KILLS + 1):
        assert d.proc is not None
        timer = None
        if kill < KILLS:
            timer = threading.Timer(rng.uniform(0.1, 0.6), d.proc.send_signal,
                                    (signal.SIGKILL,))
            timer.start()
        try:
            with BlkFrontend(d.socket_path, timeout_s=20) as fe:
                rounds = 0
                while kill < KILLS or rounds < 5:
                    rounds += 1
                    batch: list[tuple[int, int, bytes] | None] = list(retry)
                    resubmitted += len(retry)
                    again.update(w[0] for w in retry if w is not None)
                    retry = []
                    for _ in range(rng.randint(1, 6)):
                        seq += 1
                        offset = rng.randrange(IMAGE_BYTES // BLOCK - 2) * BLOCK
                        batch.append((seq, offset, payload(seq, 2 * BLOCK)))
                    if rng.random() < 0.6:
                        batch.append(None)
                    requests = [fe.prepare(flush_parts() if w is None
                                           else write_parts(w[1] // 512, w[2])) for w in batch]
                    fe.publish(requests)
                    fe.kick()
                    try:
                        fe.wait(requests)
                    finally:
                        fe.poll_completions()
                        for w, r in zip(batch, requests, strict=True):
                            if r.done:
                                assert r.status == Status.OK
                                if w is not None:
                                    seen_complete.append(w[0])
                            else:
                                retry.append(w)
        except (FrontendError, CompletionTimeout, OSError):
            pass
        if timer is not None:
            timer.join()
        d.stop()
        if kill < KILLS:
            assert d.returncode == -signal.SIGKILL, d.stderr_tail()
            d = serve(tmp_path, image, log, "--resume")
    assert d.returncode == 0
    _, records, payloads = log_records(log)
    logged = Counter(struct.unpack_from("<I", data)[0]
                     for r, data in zip(records, payloads, strict=True) if r.kind == "write")
    lost = [s for s in seen_complete if logged[s] == 0]
    doubled = [s for s, n in logged.items() if n > 1]
    assert not lost, f"seed {seed}: completed writes missing from the log: {lost}"
    # Logged twice only in the window between journal and publication, for a resubmitted one.
    assert set(doubled) <= again, (seed, doubled)
    assert all(logged[s] == 1 or (s in again and logged[s] == 2) for s in seen_complete)
    # The log still describes the image: replaying all of it gives the image as it is.
    assert replay(bytes(IMAGE_BYTES), records, payloads) == image.read_bytes(), seed
    print(f"\nseed {seed}: reconnects survived with nothing lost: {KILLS}/{KILLS} "
          f"({len(seen_complete)} writes completed, {resubmitted} requests resubmitted, "
          f"{len(doubled)} logged twice)")


@pytest.mark.slow
@pytest.mark.parametrize("queues", [1, 2])
def test_inflight_reconnects_log_every_write_exactly_once(tmp_path: Path, queues: int) -> None:
    seed, rng, image, log = fresh(tmp_path)
    # How each backend dies: its failpoint inside a done-but-unpublished window, or a timer.
    plans: list[str | None] = [
        (f"published:{rng.randint(2, 30)}", f"flushed:{rng.randint(1, 5)}", None)[k % 3]
        for k in range(KILLS)]
    qargs = ("--num-queues", str(queues))
    d = serve(tmp_path, image, log, *qargs, failpoint=plans[0], verbose=True)
    writes: dict[int, BlkRequest] = {}       # sequence number -> its request
    requests: list[BlkRequest] = []
    timer: threading.Timer | None = None
    kills = rounds_after = seq = 0
    fe = BlkFrontend(d.socket_path, timeout_s=20, inflight=True, num_queues=queues)
    assert fe.has_protocol(ProtocolFeature.INFLIGHT_SHMFD)
    batch: list[BlkRequest] = []
    while kills < KILLS or rounds_after < 5:
        if kills < KILLS and plans[kills] is None and timer is None:
            assert d.proc is not None
            timer = threading.Timer(rng.uniform(0.1, 0.6), d.proc.send_signal,
                                    (signal.SIGKILL,))
            timer.start()
        try:
            if not batch:
                # With two queues a round has requests in flight on both at once.
                for _ in range(rng.randint(1, 6)):
                    seq += 1
                    offset = rng.randrange(IMAGE_BYTES // BLOCK - 2) * BLOCK
                    r = fe.prepare(write_parts(offset // 512, payload(seq, 2 * BLOCK)),
                                   queue=rng.randrange(queues))
                    writes[seq] = r
                    batch.append(r)
                if rng.random() < 0.6:
                    batch.append(fe.prepare(flush_parts(), queue=rng.randrange(queues)))
                requests += batch
                fe.publish(batch)
                for queue in {r.queue for r in batch}:
                    fe.kick(queue)
            fe.wait(batch)
            batch = []
            rounds_after += kills == KILLS
        except (BackendGone, CompletionTimeout, OSError):
            # The backend died (its failpoint or the timer): restart it, reconnect; what was
            # in flight stays in the rings and completes once the new backend resubmits it.
            assert d.proc is not None
            d.proc.wait(30)
            if timer is not None:
                timer.join()
                timer = None
            d.stop()
            assert d.returncode == -signal.SIGKILL, d.stderr_tail()
            kills += 1
            following = plans[kills] if kills < KILLS else None
            d = serve(tmp_path, image, log, "--resume", *qargs, failpoint=following,
                      verbose=True)
            fe.reconnect(d.socket_path)
    fe.close()
    assert d.stop() == 0, d.stderr_tail()
    # Nothing lost: every request completed OK (a descriptor completed twice would have made
    # the front-end raise); nothing doubled: every write is in the log once.
    assert all(r.done and r.status == Status.OK for r in requests), seed
    _, records, payloads = log_records(log)
    logged = Counter(struct.unpack_from("<I", data)[0]
                     for r, data in zip(records, payloads, strict=True) if r.kind == "write")
    assert set(logged) == set(writes), seed
    doubled = sorted(s for s, n in logged.items() if n > 1)
    assert not doubled, f"seed {seed}: writes logged twice: {doubled}"
    assert replay(bytes(IMAGE_BYTES), records, payloads) == image.read_bytes(), seed
    text = (tmp_path / "logwrites-serve.stderr").read_text(errors="replace")
    resubmitted = sum(int(n) for n in re.findall(r"(\d+) requests resubmitted", text))
    done = sum(int(n) for n in re.findall(r"(\d+) of them already done", text))
    assert done > 0, f"seed {seed}: no resubmission was already done ({resubmitted})"
    print(f"\nseed {seed}, {queues} queue(s): in-flight reconnects survived, every write "
          f"logged once: "
          f"{kills}/{KILLS} ({len(writes)} writes; {resubmitted} requests resubmitted by the "
          f"backend, {done} already done and completed without logging)")


@pytest.mark.slow
@pytest.mark.parametrize("queues,queue_size,file_bytes", [
    (1, 128, 1024),         # a region file smaller than the queue's descriptor states
    (5, 128, 1 << 20),      # more queues than the backend has (1)
    (1, 4096, 1 << 20),     # a queue larger than virtio allows
])
def test_bad_inflight_region_drops_the_front_end_not_the_backend(
        tmp_path: Path, queues: int, queue_size: int, file_bytes: int) -> None:
    image, log = tmp_path / "disk.img", tmp_path / "log"
    image.write_bytes(bytes(IMAGE_BYTES))
    d = serve(tmp_path, image, log)
    try:
        ch = vu.Channel(str(d.socket_path), 5.0, 5.0)
        ch.call_u64(vu.Request.GET_FEATURES)
        ch.call_u64(vu.Request.GET_PROTOCOL_FEATURES)
        ch.set(vu.Request.SET_PROTOCOL_FEATURES,
               vu.U64.pack(vu.bit(ProtocolFeature.INFLIGHT_SHMFD)))
        ch.set(vu.Request.SET_OWNER)
        region = os.memfd_create("inflight", os.MFD_CLOEXEC)
        os.ftruncate(region, file_bytes)
        ch.set(vu.Request.SET_INFLIGHT_FD,
               vu.INFLIGHT.pack(1 << 20, 0, queues, queue_size), [region])
        os.close(region)
        assert ch.hung_up(wait_s=5.0)
        ch.close()
        # The backend lives on and serves the next front-end.
        with BlkFrontend(d.socket_path, inflight=True) as fe:
            assert fe.write(0, payload(1, BLOCK)).status == Status.OK
        assert d.alive()
    finally:
        assert d.stop() == 0, d.stderr_tail()
    assert "SET_INFLIGHT_FD" in d.stderr_tail()
