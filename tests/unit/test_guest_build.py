"""Guest building without booting: kernel versions, the cpio writer, module closure, the
cache, KVM detection and qcow2 overlays."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from guests import build
from qmp import machine, snapshot
from qmp.errors import KernelPanic


def test_kernel_version_read_from_the_bzimage_header() -> None:
    kernel = build.distribution_kernel()
    assert build.kernel_version(kernel) == kernel.name.removeprefix("vmlinuz-")


def test_kernel_version_refuses_a_non_kernel(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(build.GuestError, match="not an x86 bzImage"):
        build.kernel_version(junk)


def test_cpio_writer_output_is_read_by_cpio(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    with archive.open("wb") as f:
        cpio = build._Cpio(f)
        cpio.file("usr/bin/tool", b"#!/bin/sh\necho hi\n")
        cpio.symlink("bin/tool", "/usr/bin/tool")
        cpio.chardev("dev/console", 5, 1)
        cpio.trailer()
    listing = subprocess.run(["cpio", "-tv"], stdin=archive.open("rb"), capture_output=True,
                             text=True, check=True).stdout
    assert "usr/bin/tool" in listing and "bin/tool -> /usr/bin/tool" in listing
    assert "dev/console" in listing and listing.count("usr\n") + listing.count(" usr") >= 1


def test_module_closure_loads_dependencies_first() -> None:
    version = build.kernel_version(build.distribution_kernel())
    order = [build._module_name(p) for p in build._module_closure(Path("/lib/modules") / version)]
    for needed in ("virtio_blk", "virtio_console", "ext4", "xfs", "btrfs", "dm_log_writes"):
        assert needed in order
    assert order.index("dm_mod") < order.index("dm_log_writes")
    assert order.index("virtio") < order.index("virtio_pci") < order.index("virtio_blk")


def test_cache_hit_is_fast_and_stable() -> None:
    first = build.default_guest()
    started = time.monotonic()
    again = build.default_guest()
    assert time.monotonic() - started < 1.0
    assert again == first and first.initrd.is_file() and first.kernel.is_file()


def test_kvm_detection_is_false_here_and_never_hangs() -> None:
    machine.kvm_usable.cache_clear()
    started = time.monotonic()
    usable = machine.kvm_usable()
    assert time.monotonic() - started < 15  # the probe is bounded at 10 s
    if not machine._cpu_has_virtualization():
        assert usable is False
        assert machine.choose_accel(None) == "tcg"
    assert machine.choose_accel("kvm") == "kvm"  # --accel wins


def test_accel_probe_proves_tcg_runs_guest_code() -> None:
    assert machine.accel_works("tcg")


def test_kernel_panic_message_is_one_line() -> None:
    err = KernelPanic("[ 1.0] sysrq: Trigger a crash\n[ 1.1] Kernel panic - not syncing: "
                      "sysrq triggered crash\n[ 1.2] CPU: 0 PID: 1\n")
    assert str(err) == "guest Kernel panic - not syncing: sysrq triggered crash"
    assert "CPU: 0" in err.console_tail


def test_overlay_reads_through_and_keeps_the_base(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"B" * 65536)
    overlay = snapshot.create_overlay(base, tmp_path / "states" / "s1.qcow2")
    assert snapshot.overlay_backing(overlay) == base.resolve()
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 4096", str(overlay)],
                   check=True, capture_output=True)
    read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x41 0 4096",
                           "-c", "read -P 0x42 4096 4096", str(overlay)],
                          capture_output=True, text=True, check=True).stdout
    assert "Pattern verification failed" not in read
    assert base.read_bytes() == b"B" * 65536
    assert overlay.stat().st_size < 1 << 20


def test_direct_boot_kernel_is_the_payload_elf_with_a_pvh_entry() -> None:
    elf = build.direct_boot_kernel(build.distribution_kernel())
    # Debian's kernel has CONFIG_PVH: QEMU boots its decompressed ELF without the
    # bzImage's decompressor (seconds under TCG).
    assert elf is not None and elf[:4] == b"\x7fELF" and build._has_pvh_entry(elf)


def test_direct_boot_kernel_refuses_what_it_cannot_boot(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 8192)
    assert build.direct_boot_kernel(junk) is None
    assert not build._has_pvh_entry(b"\x7fELF\x02\x01" + b"\0" * 100)


def test_modules_dep_lists_on_demand_modules_with_their_dependencies() -> None:
    version = build.kernel_version(build.distribution_kernel())
    mod_dir = Path("/lib/modules") / version
    boot = build._module_closure(mod_dir, build.BOOT_MODULES)
    every = build._module_closure(mod_dir)
    names = {build._module_name(p) for p in boot}
    assert "dm_log_writes" in names and not {"ext4", "xfs", "btrfs"} & names
    aliases = build._fs_aliases(mod_dir).decode().splitlines()
    assert {"alias fs-ext3 ext4", "alias fs-xfs xfs", "alias fs-btrfs btrfs"} <= set(aliases)
    dep = build._modules_dep(mod_dir, every).decode()
    lines = {line.split(":")[0]: line.split(":")[1].split() for line in dep.splitlines()}
    assert "btrfs.ko" in lines and "raid6_pq.ko" in lines["btrfs.ko"]
    assert all("/" not in d for deps in lines.values() for d in deps)  # the guest's flat layout
