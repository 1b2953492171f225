"""The QEMU layer with real guests under TCG: boot and agent round trip, disks on a
vhost-user-blk server, in-guest marks, each crash kind, panics, and clear errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest

from qmp.backend import StorageDaemon
from qmp.errors import AgentError, MachineError
from qmp.machine import Machine, PlainDisk

PATTERN = b"logwrites-pattern-" * 1000  # 18000 bytes, recognisable in a raw image


def _write_pattern_script(offset_blocks: int = 100) -> str:
    # conv=fsync: the pattern must have reached the backend before the script says it did.
    return (f"printf '{PATTERN[:18].decode()}%.0s' $(seq 1000) > /tmp/p\n"
            f"dd if=/tmp/p of=$LW_DEV bs=4096 seek={offset_blocks} conv=fsync 2>/dev/null\n"
            "lw-report written yes\n")


@pytest.mark.slow
def test_boot_and_agent_round_trip(default_guest, storage_daemon: StorageDaemon,
                                   raw_image: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with storage_daemon, Machine(default_guest, tmp_path / "run",
                                           disk_socket=storage_daemon.socket) as m:
            assert m.ready is not None and m.ready.kernel == default_guest.kernel_version
            assert [d["name"] for d in m.ready.disks] == ["vda"]
            result = await m.run("echo to-stdout; echo to-stderr >&2; lw-report answer 'forty two'"
                                 "; lw-report empty ''; exit 7", timeout_s=60)
            assert (result.status, result.phase) == (7, "script")
            assert result.stdout == "to-stdout\n" and result.stderr == "to-stderr\n"
            assert result.reports == {"answer": "forty two", "empty": ""}
            # The real e2fsprogs shadow busybox's applets (DESIGN §7).
            tools = await m.run("mke2fs -V 2>&1 | head -1; readlink -f $(which mkfs.ext4)",
                                timeout_s=60)
            assert tools.stdout.startswith("mke2fs 1.") and "busybox" not in tools.stdout
            written = await m.run(_write_pattern_script(), timeout_s=60)
            assert written.ok and written.reports == {"written": "yes"}
            await m.shutdown()
            assert m.returncode == 0
        assert PATTERN in raw_image.read_bytes()[100 * 4096:100 * 4096 + len(PATTERN)]
        run_dir = tmp_path / "run"
        assert "agent ready" in (run_dir / "console.log").read_text()
        assert (run_dir / "qemu-cmdline.sh").read_text().count("vhost-user-blk-pci") == 1

    asyncio.run(scenario())


@pytest.mark.slow
def test_filesystem_job_and_timeout(default_guest, tmp_path: Path, raw_image: Path) -> None:
    async def scenario() -> None:
        async with Machine(default_guest, tmp_path / "run", disks=[PlainDisk(raw_image)]) as m:
            made = await m.run('echo data > "$LW_MNT/f"; sync; cat "$LW_MNT/f"; pwd',
                               fs="ext4", timeout_s=120)
            assert made.ok, made.stderr
            assert made.stdout == "data\n/mnt/test\n"
            # The same filesystem, mounted again without mkfs: the file survived the unmount.
            again = await m.run('cat "$LW_MNT/f"', fs="ext4", mkfs=False, timeout_s=60)
            assert again.stdout == "data\n"
            started = time.monotonic()
            slow = await m.run("echo before; sleep 100", timeout_s=2)
            assert slow.timed_out and slow.stdout == "before\n"
            assert time.monotonic() - started < 30
            await m.quit()
            assert m.returncode == 0

    asyncio.run(scenario())


class _FakeControl:
    """Answers the backend's control protocol for marks: entry numbers from 10, and refuses
    the name "refuse-me" as the backend refuses a bad mark."""

    def __init__(self, path: Path) -> None:
        self.path, self.marks = path, []

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            request = json.loads(line)
            if request.get("cmd") == "mark" and request.get("name") != "refuse-me":
                self.marks.append(request["name"])
                reply = {"ok": True, "entry": 9 + len(self.marks)}
            else:
                reply = {"ok": False, "error": f"refused {request}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()


@pytest.mark.slow
def test_in_guest_marks_speak_the_control_protocol(default_guest, tmp_path: Path,
                                                   raw_image: Path) -> None:
    async def scenario() -> None:
        control = _FakeControl(tmp_path / "ctl.sock")
        await control.start()
        async with Machine(default_guest, tmp_path / "run", disks=[PlainDisk(raw_image)],
                           control_socket=control.path) as m:
            assert m.ready is not None and m.ready.control
            result = await m.run("lw-mark first; lw-mark second; lw-mark refuse-me; "
                                 "echo status=$?; lw-mark 'bad name'; echo status=$?",
                                 fs="ext4", setup_mark="mkfs-done", timeout_s=120)
            assert result.ok, result.stderr
            assert result.stdout == "11\n12\nstatus=1\nstatus=2\n"
            assert "refused" in result.stderr
            assert control.marks == ["mkfs-done", "first", "second"]
            await m.quit()
        control.server.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_power_cut_stops_everything_at_once(default_guest, storage_daemon: StorageDaemon,
                                            raw_image: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with storage_daemon, Machine(default_guest, tmp_path / "run",
                                           disk_socket=storage_daemon.socket) as m:
            assert (await m.run(_write_pattern_script(), timeout_s=60)).ok
            await m.run("while :; do dd if=/dev/urandom of=$LW_DEV bs=4096 count=16 seek=9000 "
                        "conv=fsync 2>/dev/null; done", timeout_s=300, wait=False)
            await asyncio.sleep(2)
            await m.power_cut()
            assert m.returncode == -9
            with pytest.raises(MachineError):
                await m.ping()
        assert PATTERN in raw_image.read_bytes()

    asyncio.run(scenario())


@pytest.mark.slow
def test_reset_reboots_on_the_same_disk_and_quit_is_clean(default_guest, tmp_path: Path,
                                                         storage_daemon: StorageDaemon) -> None:
    async def scenario() -> None:
        async with storage_daemon, Machine(default_guest, tmp_path / "run",
                                           disk_socket=storage_daemon.socket) as m:
            assert (await m.run(_write_pattern_script(), timeout_s=60)).ok
            first = m.ready
            ready = await m.reset()
            assert ready is not None and first is not None and ready.boot_id != first.boot_id
            back = await m.run("dd if=$LW_DEV bs=4096 skip=100 count=4 2>/dev/null | sha256sum",
                               timeout_s=60)
            assert back.stdout.split()[0] == hashlib.sha256(PATTERN[:4 * 4096]).hexdigest()
            await m.quit()
            assert m.returncode == 0
        console = (tmp_path / "run" / "console.log").read_text()
        assert console.count("agent ready") == 2

    asyncio.run(scenario())


@pytest.mark.slow
def test_kernel_without_virtio_gives_clear_error(tmp_path: Path) -> None:
    """A user's kernel that has virtio as modules but was given none cannot see its agent
    channel: the agent says so on the console and the machine raises at once."""
    from guests.build import default_guest, distribution_kernel

    kernel = tmp_path / "bzImage"
    kernel.write_bytes(distribution_kernel().read_bytes())
    guest = default_guest(kernel)
    assert guest.modules == ()

    async def scenario() -> None:
        started = time.monotonic()
        with pytest.raises(AgentError, match="CONFIG_VIRTIO_CONSOLE"):
            async with Machine(guest, tmp_path / "run", boot_timeout_s=150):
                pass
        assert time.monotonic() - started < 150

    asyncio.run(scenario())


@pytest.mark.slow
def test_bring_your_own_kernel_with_modules(tmp_path: Path, raw_image: Path) -> None:
    """The distribution kernel passed in as if it were the user's, with its modules tree
    given as an INSTALL_MOD_PATH-style directory."""
    from guests.build import default_guest, distribution_kernel, kernel_version

    kernel = tmp_path / "linux" / "arch" / "x86" / "boot" / "bzImage"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(distribution_kernel().read_bytes())
    version = kernel_version(kernel)
    install = tmp_path / "install"
    (install / "lib" / "modules").mkdir(parents=True)
    (install / "lib" / "modules" / version).symlink_to(Path("/lib/modules") / version)
    guest = default_guest(kernel, install)
    assert "virtio_blk.ko" in guest.modules and "dm_log_writes.ko" in guest.modules

    async def scenario() -> None:
        async with Machine(guest, tmp_path / "run", disks=[PlainDisk(raw_image)]) as m:
            result = await m.run("uname -r; grep -c log-writes /proc/modules || "
                                 "dmsetup targets | grep -c log-writes", fs="xfs", timeout_s=120)
            assert result.ok, result.stderr
            assert result.stdout.splitlines()[0] == version
            await m.quit()

    asyncio.run(scenario())


@pytest.mark.slow
def test_whole_vm_snapshot_restores_twice(default_guest, storage_daemon: StorageDaemon,
                                          raw_image: Path, tmp_path: Path) -> None:
    """Save a booted guest on a vhost-user-blk disk, restore it twice: each restored guest
    continues where the saved one was (same boot, its tmpfs intact) and runs a job."""
    from qmp.snapshot import clone_image

    state = tmp_path / "state.bin"
    checkpoint = tmp_path / "checkpoint.img"

    async def scenario() -> None:
        async with storage_daemon:
            async with Machine(default_guest, tmp_path / "saved",
                               disk_socket=storage_daemon.socket) as m:
                assert (await m.run("echo before > /tmp/x", timeout_s=60)).ok
                saved_boot = m.ready.boot_id if m.ready else ""
                await m.save_state(state, checkpoint=lambda: clone_image(raw_image, checkpoint))
                await m.power_cut()
            assert state.stat().st_size > 0 and checkpoint.is_file()
            for i in range(2):
                async with Machine(default_guest, tmp_path / f"restored{i}", incoming=state,
                                   disk_socket=storage_daemon.socket) as m:
                    result = await m.run("cat /tmp/x; cat /proc/sys/kernel/random/boot_id",
                                         timeout_s=60)
                    assert result.stdout.split() == ["before", saved_boot]
                    await m.quit()

    asyncio.run(scenario())
