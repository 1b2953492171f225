"""Hostile guests against `logwrites serve` (issue 6), with the log checked at the end.

Same cases and oracle as test_fuzz_hostile.py; in addition the log must hold exactly the
writes, write-zeroes and discards that completed OK, each once, and replaying it onto the
initial image must give the final image.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.system.test_fuzz_hostile import CAPACITY, fuzz, make_image, summary
from vhost.testing.daemons import LogwritesServe
from vhost.testing.frontend import BlkFrontend, Status
from vhost.testing.hostile import HostileSession
from vhost.testing.logcheck import log_records, replay


@pytest.mark.slow
def test_fuzz_logwrites_serve(tmp_path: Path, fuzz_examples: int) -> None:
    image = tmp_path / "img"
    make_image(image)
    initial = image.read_bytes()
    log_path = tmp_path / "log"
    with LogwritesServe(image, tmp_path / "sock", log_path, tmp_path) as ours:
        with BlkFrontend(ours.socket_path) as fe:
            assert fe.capacity == CAPACITY
            max_segments = max(1, fe.config.max_discard_seg, fe.config.max_write_zeroes_seg)
        session = HostileSession(ours.socket_path, image, ours.alive,
                                 describe=lambda: ours.stderr_tail(300))
        try:
            fuzz(session, fuzz_examples, max_segments)
        finally:
            session.close()
            print(summary("logwrites serve", session))
        assert ours.alive(), ours.stderr_tail()
        with BlkFrontend(ours.socket_path) as fe:       # still serving a fresh connection
            assert fe.read(0, 512).status == Status.OK
        session.check_image()
        assert ours.stop() == 0, ours.stderr_tail()

    # The log holds exactly the writes that completed OK, each once, and nothing else.
    _sectorsize, records, payloads = log_records(log_path)
    logged = Counter((r.byte_offset, r.nbytes, r.sha) for r in records if r.kind == "write")
    assert logged == Counter(session.tally.ok_writes)
    discards = Counter((r.byte_offset, r.nbytes) for r in records if r.kind == "discard")
    assert discards == Counter(session.tally.ok_discards)
    replayed = replay(initial, records, payloads)
    final = image.read_bytes()
    for i, known in enumerate(session.known):
        if known:
            assert replayed[i * 512:(i + 1) * 512] == final[i * 512:(i + 1) * 512], i
