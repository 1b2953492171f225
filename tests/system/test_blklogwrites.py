"""Logs written by someone else: QEMU's blklogwrites driver, driven by qemu-io (no guest).

QEMU writes the log and the data image; `inspect --json` must list what QEMU logged, and
`replay --limit N` must rebuild, byte for byte, the data image QEMU left after the commands
whose entries are the first N. References come from re-running qemu-io with each prefix of the
command list on a fresh copy of the base image.
"""

from __future__ import annotations

import json
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from logwrites.cli import main
from logwrites.replay import replay
from tests.conftest import require_tool

IMAGE_BYTES = 4 << 20
K, M = 1 << 10, 1 << 20

# (qemu-io command, kind, offset, length); kind: "w" write, "z" write-zeroes, "d" discard,
# "f" flush. Offsets are 4 KiB aligned except one, which the block layer turns into a
# read-modify-write of whole log sectors at sectorsize 4096.
COMMANDS: list[tuple[str, str, int, int]] = [
    ("write -P 0xab 0 64k", "w", 0, 64 * K),
    ("write -P 0xcd 32k 64k", "w", 32 * K, 64 * K),         # overlaps the first
    ("flush", "f", 0, 0),
    ("write -P 0x11 1m 4k", "w", M, 4 * K),
    ("discard 0 16k", "d", 0, 16 * K),
    ("write -z 128k 64k", "z", 128 * K, 64 * K),
    ("write -P 0x22 8k 8k", "w", 8 * K, 8 * K),             # into the discarded range
    ("flush", "f", 0, 0),
    ("write -P 0x55 1536 1k", "w", 1536, 1 * K),            # 512-aligned only
    ("discard 1m 1m", "d", M, M),
    ("write -P 0x33 3m 1m", "w", 3 * M, M),                 # large: copied in the kernel
    ("write -z 3m 4k", "z", 3 * M, 4 * K),
    ("flush", "f", 0, 0),
    ("write -P 0x44 100k 12k", "w", 100 * K, 12 * K),       # volatile: only close flushes it
]


@dataclass
class Run:
    image: bytes
    entries: list[dict]


def qemu_io(tmp: Path, base: bytes, sectorsize: int, commands: list[str], name: str) -> Run:
    qemu_io_bin = require_tool("qemu-io", "qemu-utils")
    data, log = tmp / f"{name}.img", tmp / f"{name}.log"
    data.write_bytes(base)
    log.write_bytes(b"")  # the log child is opened, not created
    opts = (f"driver=blklogwrites,file.driver=file,file.filename={data},log.driver=file,"
            f"log.filename={log},log-sector-size={sectorsize},discard=unmap")
    argv = [qemu_io_bin, "--image-opts", opts]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done
    entries = []
    if commands:
        out = subprocess.run([*_logwrites(), "inspect", "--json", str(log)],
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        entries = [json.loads(line) for line in out.stdout.splitlines()]
    return Run(data.read_bytes(), entries)


def _logwrites() -> list[str]:
    import sys
    return [sys.executable, "-m", "logwrites.cli"]


def data_entries(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e["flags"] != ["flush"]]


def expected_entry(kind: str, offset: int, length: int, sectorsize: int) -> dict:
    first = offset // sectorsize
    end = -(-(offset + length) // sectorsize)
    return {"sector": first, "nr_sectors": end - first,
            "flags": ["discard"] if kind == "d" else [], "data_len": 0, "mark": None}


@pytest.mark.slow
@pytest.mark.parametrize("sectorsize", [512, 4096])
def test_qemu_blklogwrites_log_inspects_and_replays_byte_for_byte(
        tmp_path: Path, sectorsize: int, capsys: pytest.CaptureFixture[str]) -> None:
    base = random.Random(sectorsize).randbytes(IMAGE_BYTES)
    commands = [c[0] for c in COMMANDS]
    full = qemu_io(tmp_path, base, sectorsize, commands, "full")
    log = tmp_path / "full.log"

    # inspect --json (in process this time) lists what QEMU logged, in order.
    capsys.readouterr()
    assert main(["inspect", "--json", str(log)]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [json.loads(line) for line in lines]
    assert listed == full.entries
    assert [e["index"] for e in listed] == list(range(len(listed)))
    assert all(set(e) == {"index", "sector", "nr_sectors", "flags", "data_len", "mark"}
               for e in listed)
    want = [expected_entry(kind, off, length, sectorsize)
            for _, kind, off, length in COMMANDS if kind != "f"]
    got = [{k: v for k, v in e.items() if k != "index"} for e in data_entries(listed)]
    assert got == want
    # every flush command left a FLUSH entry before the next data entry
    kinds = "".join("f" if e["flags"] == ["flush"] else "d" for e in listed)
    assert kinds.count("f") >= sum(1 for c in COMMANDS if c[1] == "f")
    assert listed[-1]["flags"] == ["flush"]  # QEMU counts entries only at a flush

    # Reference images: the data image after each prefix of the commands, keyed by how many
    # data entries (non-flush) the prefix logged; flushes change no data.
    references: dict[int, bytes] = {0: base}
    for k in range(1, len(COMMANDS) + 1):
        run = qemu_io(tmp_path, base, sectorsize, commands[:k], f"prefix{k}")
        prefix_data = data_entries(run.entries)
        assert prefix_data == data_entries(full.entries)[: len(prefix_data)]
        references[len(prefix_data)] = run.image
    assert references[len(want)] == full.image

    target = tmp_path / "target.img"
    for n in range(len(listed) + 1):
        target.write_bytes(base)
        if n == 0:
            assert replay(log, target, limit=0).entries == 0  # (the CLI's 0 means no limit)
        else:
            assert main(["replay", str(log), str(target), "--limit", str(n)]) == 0
        done = len(data_entries(listed[:n]))
        assert target.read_bytes() == references[done], f"replay --limit {n}"
    capsys.readouterr()

    # --find agrees with the listing: the second FLUSH entry
    flushes = [e["index"] for e in listed if e["flags"] == ["flush"]]
    assert main(["replay", str(log), "--find", "--start-entry", str(flushes[0] + 1),
                 "--next-flush"]) == 0
    assert capsys.readouterr().out.split("@")[0] == str(flushes[1])


@pytest.mark.slow
def test_replay_onto_a_block_device(tmp_path: Path) -> None:
    """Onto a loop device: discards go through BLKZEROOUT, payloads past copy_file_range."""
    losetup = require_tool("losetup", "mount")
    base = random.Random(7).randbytes(IMAGE_BYTES)
    full = qemu_io(tmp_path, base, 4096, [c[0] for c in COMMANDS], "full")
    backing = tmp_path / "backing.img"
    backing.write_bytes(base)
    attach = subprocess.run([losetup, "--find", "--show", str(backing)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert attach.returncode == 0, f"losetup needs root and loop devices: {attach.stderr}"
    device = attach.stdout.strip()
    try:
        assert main(["replay", str(tmp_path / "full.log"), device]) == 0
        with open(device, "rb") as f:
            assert f.read() == full.image
    finally:
        subprocess.run([losetup, "--detach", device], timeout=60, check=False)
