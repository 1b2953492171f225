"""`logwrites guest build`: build (or find in the cache) the default guest, or wrap the user's
kernel with the same userland; `--verbose` also boots it once and prints the time to
"agent ready"."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from guests.build import default_guest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("guest", help="build the default guest or wrap your kernel")
    gsub = p.add_subparsers(dest="guest_command", required=True)
    b = gsub.add_parser("build", help="build (or find cached) the default guest",
                        description=__doc__.split("\n\n")[0])
    b.add_argument("--kernel", type=Path, help="your bzImage instead of the distribution kernel")
    b.add_argument("--modules", type=Path,
                   help="its modules: /lib/modules/VERSION or an INSTALL_MOD_PATH directory")
    b.add_argument("--rebuild", action="store_true", help="ignore the cache")
    b.add_argument("--verbose", action="store_true", dest="boot_report",
                   help="also boot the guest once and print the time to 'agent ready'")
    b.add_argument("--accel", choices=("kvm", "tcg"), help="for the --verbose boot")
    b.set_defaults(run=build)


def build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    guest = default_guest(args.kernel, args.modules, rebuild=args.rebuild)
    print(f"guest: {guest.cache_dir} (kernel {guest.kernel_version}, "
          f"initramfs {guest.initrd_bytes / 2**20:.1f} MiB, {len(guest.modules)} modules, "
          f"{time.monotonic() - started:.2f} s)")
    if args.boot_report:  # its own dest: the global -v/--verbose counts log verbosity
        boot = asyncio.run(_boot_once(guest, args.accel))
        print(f"boot: agent ready after {boot[0]:.2f} s on the host clock "
              f"({boot[1]:.2f} s guest uptime, accel {boot[2]})")
    return 0


async def _boot_once(guest: object, accel: str | None) -> tuple[float, float, str]:
    from qmp.machine import Machine  # only --verbose needs QEMU

    with tempfile.TemporaryDirectory(prefix="lw-guest-") as tmp:
        async with Machine(guest, Path(tmp), accel=accel) as machine:  # type: ignore[arg-type]
            ready = machine.ready
            assert ready is not None
            await machine.quit()
            return ready.host_seconds, ready.uptime, machine.accel
