"""The cffi layer: virtio-blk's config space comes from QEMU 7.2's header (60 bytes, `wce` at
32), the glue's constants are the spec's, and its fallocate punches holes."""

from __future__ import annotations

import os

from vhost import lvu
from vhost.lvu import VirtioBlk


def test_config_space_layout_is_qemu_7_2s() -> None:
    assert lvu.CONFIG_SIZE == 60
    assert lvu.WCE_OFFSET == 32


def test_virtio_blk_numbers() -> None:
    assert (VirtioBlk.T_IN, VirtioBlk.T_OUT, VirtioBlk.T_FLUSH, VirtioBlk.T_GET_ID,
            VirtioBlk.T_DISCARD, VirtioBlk.T_WRITE_ZEROES) == (0, 1, 4, 8, 11, 13)
    assert (VirtioBlk.S_OK, VirtioBlk.S_IOERR, VirtioBlk.S_UNSUPP) == (0, 1, 2)
    assert VirtioBlk.ID_BYTES == 20 and VirtioBlk.F_CONFIG_WCE == 11


def test_fallocate_punches_a_hole(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        rc = lvu.fallocate(fd, lvu.FALLOC_FL_PUNCH_HOLE | lvu.FALLOC_FL_KEEP_SIZE, 0, 4096)
    finally:
        os.close(fd)
    assert rc == 0
    assert path.read_bytes() == bytes(4096) + b"x" * 4096
