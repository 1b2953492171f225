"""The cffi extension is built and calls into libvhost-user for real."""

from __future__ import annotations


def test_vu_request_to_string() -> None:
    from vhost._lvu import ffi, lib

    assert ffi.string(lib.vu_request_to_string(1)) == b"VHOST_USER_GET_FEATURES"
