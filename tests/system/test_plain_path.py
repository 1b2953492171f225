"""The C path for plain requests (vhost/_lvu_glue.c, `lw_serve`) against the Python path
(`LOGWRITES_PLAIN_IN_C=0`): the same requests through the test front-end leave byte-identical
logs and images, the same statuses, data and counters, and the C path did serve the plain ones.

The workload mixes what C serves (reads, small writes into the log's zeroed room, FLUSHes) with
what it hands to Python in the middle of a batch: writes that cross the end of the room (about
every 200 records), big writes (the pipeline), FUA writes (write cache off), refused requests,
discards, write-zeroes and marks.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from tests.system.test_backend_control import Control
from vhost.lvu import WCE_OFFSET
from vhost.testing.daemons import LogwritesServe
from vhost.testing.frontend import BlkFrontend, Segment, read_parts, write_parts

IMAGE_BYTES = 32 << 20


def _workload(fe: BlkFrontend, control: Control | None, sectorsize: int) -> list[object]:
    """Run the requests; what the front-end saw (statuses, read data digests)."""
    rng = random.Random(7)
    per_sector = sectorsize // 512
    blocks = IMAGE_BYTES // sectorsize
    seen: list[object] = []

    def sector() -> int:
        return rng.randrange(blocks - (256 << 10) // sectorsize) * per_sector

    def data(nbytes: int) -> bytes:
        return rng.randbytes(nbytes)

    for round_no in range(10):
        batch = [write_parts(sector(), data(rng.choice((4096, 4096, 8192, 61440))))
                 for _ in range(30)]
        batch.insert(7, write_parts(sector(), data(128 << 10)))        # the pipeline's
        batch.insert(11, write_parts(IMAGE_BYTES // 512, data(4096)))  # past the end
        batch.insert(13, write_parts(per_sector // 2, data(sectorsize)) if per_sector > 1
                     else write_parts(sector(), b""))                 # misaligned / empty
        batch.insert(17, read_parts(sector(), 16384))
        seen += [(r.status, hashlib.sha256(r.data).hexdigest()) for r in fe.run(batch)]
        seen.append(fe.discard([(sector(), 8 * per_sector)]).status)
        seen.append(fe.write_zeroes([Segment(sector(), 4 * per_sector, 0)]).status)
        if round_no == 4:
            fe.set_config(WCE_OFFSET, b"\x00")          # write-through: FUA writes
            seen += [fe.write(sector(), data(4096)).status for _ in range(5)]
            fe.set_config(WCE_OFFSET, b"\x01")
        if control is not None and round_no % 3 == 1:
            assert control("mark", name=f"round-{round_no}")["ok"]
        if round_no == 6:
            # Small writes one kick each, Python asleep (Connection.wait): C stages records
            # until its table is nearly full and hands the kick to Python, then again.
            small = max(512, sectorsize)
            seen += [fe.write(sector(), data(small)).status for _ in range(2500)]
        seen.append(fe.flush().status)
        read = fe.read(sector(), 65536)
        seen.append((read.status, hashlib.sha256(read.data).hexdigest()))
    return seen


def _serve(tmp_path: Path, name: str, mode: str, sectorsize: int, in_c: bool
           ) -> tuple[list[object], dict, Path, Path]:
    image = tmp_path / f"{name}.img"
    image.write_bytes(bytes(IMAGE_BYTES))
    log = tmp_path / f"{name}.log"
    control_path = tmp_path / f"{name}.ctl"
    daemon = LogwritesServe(image, tmp_path / f"{name}.sock", log, tmp_path,
                            extra_args=["--mode", mode, "--sector-size", str(sectorsize),
                                        "--control", str(control_path)])
    daemon.env["LOGWRITES_PLAIN_IN_C"] = "1" if in_c else "0"
    with daemon:
        control = Control(control_path)
        try:
            with BlkFrontend(daemon.socket_path) as fe:
                fe.set_config(WCE_OFFSET, b"\x01")
                seen = _workload(fe, control if mode == "logwrites" else None, sectorsize)
            status = control("status")
        finally:
            control.close()
        assert daemon.stop() == 0
    return seen, status, image, log


@pytest.mark.parametrize("sectorsize", [512, 4096])
@pytest.mark.parametrize("mode", ["logwrites", "passthrough"])
def test_plain_requests_in_c_leave_what_python_leaves(tmp_path: Path, mode: str,
                                                      sectorsize: int) -> None:
    seen_c, status_c, image_c, log_c = _serve(tmp_path, "c", mode, sectorsize, True)
    seen_py, status_py, image_py, log_py = _serve(tmp_path, "py", mode, sectorsize, False)

    assert seen_c == seen_py
    assert image_c.read_bytes() == image_py.read_bytes()
    for key in ("requests", "bytes_written", "bytes_read", "entries", "flushes", "log_bytes"):
        assert status_c[key] == status_py[key], key
    assert status_py["served_in_c"] == 0
    assert status_py["kicks_in_c"] == 0
    # Whole kicks served in C while the serve loop waited: at least the reads that end each
    # round and most of the one-write kicks.
    assert status_c["kicks_in_c"] > 1000
    # Every read and every small plain write went through C (the big ones, the refused ones
    # and those crossing the room's end did not).
    assert status_c["served_in_c"] > status_c["requests"]["out"] // 2
    assert status_c["requests"]["failed"] >= 10
    if mode == "logwrites":
        assert status_c["entries"] > 300
        assert log_c.read_bytes() == log_py.read_bytes()
