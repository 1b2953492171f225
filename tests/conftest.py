"""Shared fixtures. A missing tool fails the fixture with the command that installs it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


def require_tool(name: str, package: str) -> str:
    """The tool's path; a missing tool fails loudly (never skips) naming the fix."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                  else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run ./run.sh setup (apt-get install {package})",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT


# ---- guests and machines (issue 4) ------------------------------------------------------------

@pytest.fixture(scope="session")
def default_guest():
    """The default guest, built once per session (a cache hit after `logwrites guest build`)."""
    require_tool("qemu-system-x86_64", "qemu-system-x86")
    require_tool("busybox", "busybox-static")
    from guests.build import default_guest as build_default_guest

    return build_default_guest()


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    """A sparse 512 MiB raw image, the disk under test (mkfs.xfs wants 300 MB)."""
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(512 << 20)
    return image


@pytest.fixture
def storage_daemon(raw_image: Path, tmp_path: Path):
    """qemu-storage-daemon for `raw_image` over vhost-user-blk (stand-in backend), not yet
    started: a test runs `async with storage_daemon:` in its own event loop."""
    require_tool("qemu-storage-daemon", "qemu-system-x86")
    from qmp.backend import StorageDaemon

    return StorageDaemon(raw_image, tmp_path / "qsd")


def write_log(path: Path, ops: list[tuple], sectorsize: int = 512) -> Path:
    """A synthetic log from ops, committed after every FLUSH/FUA/MARK as the backend does:
    ("w", sector, nr_sectors, byte) write filled with byte; ("fua", sector, nr_sectors, byte);
    ("d", sector, nr_sectors) discard; ("z", sector, nr_sectors) write-zeroes; ("f",) flush;
    ("m", name) mark. Sectors count `sectorsize` units."""
    from logwrites.format import EntryFlag
    from logwrites.logfile import LogWriter

    with LogWriter.create(path, sectorsize) as writer:
        for op in ops:
            kind = op[0]
            if kind in ("w", "fua"):
                _, sector, nr, byte = op
                flags = EntryFlag.FUA if kind == "fua" else 0
                writer.append_write(sector, nr, [bytes([byte]) * (nr * sectorsize)], flags)
            elif kind == "d":
                writer.append_discard(op[1], op[2])
            elif kind == "z":
                writer.append_zeroes(op[1], op[2])
            elif kind == "f":
                writer.append_flush()
            elif kind == "m":
                writer.append_mark(op[1])
            else:
                raise ValueError(f"unknown op {op!r}")
            if kind in ("fua", "f", "m"):
                writer.commit()
        writer.commit()
    return path


@pytest.fixture
def make_log(tmp_path: Path):
    """make_log(ops, sectorsize=512, name="log") -> Path of a synthetic log (see write_log)."""
    def make(ops: list[tuple], sectorsize: int = 512, name: str = "test.log") -> Path:
        return write_log(tmp_path / name, ops, sectorsize)
    return make


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="hostile-guest requests per fuzz test (default 300, or "
                          "$LOGWRITES_FUZZ_EXAMPLES)")


@pytest.fixture(scope="session")
def fuzz_examples(request: pytest.FixtureRequest) -> int:
    """How many hypothesis examples each fuzz test runs: bounded in CI, one flag for more."""
    import os
    chosen = request.config.getoption("--fuzz-examples")
    return chosen or int(os.environ.get("LOGWRITES_FUZZ_EXAMPLES", "300"))


@pytest.fixture
def small_fs(tmp_path: Path):
    """`small_fs(name, size)`: a freshly mounted tmpfs of `size` ("64k", "6M"), to run out of
    room in; unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(where)], check=True)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
