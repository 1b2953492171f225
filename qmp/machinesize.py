"""How big a guest is: RAM, CPUs, and the virtio-blk queues its disk offers, as the commands
that boot a workload's guest take them (`run`, `crash-loop`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Final

from logwrites.errors import UsageError

DEFAULT_MEMORY_MIB: Final = 1024
MIN_MEMORY_MIB: Final = 384   # the default guest's initramfs is unpacked into RAM: 256 panics
MAX_CPUS: Final = 64
MAX_QUEUES: Final = 64


@dataclass(frozen=True)
class MachineSize:
    """A workload guest's RAM, CPUs, and the virtio-blk queues its disk offers."""

    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = 1
    queues: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MachineSize:
        """The size `add_machine_arguments`' options ask for. :raise UsageError: out of
        range."""
        size = cls(args.memory, args.cpus, args.queues)
        if size.memory_mib < MIN_MEMORY_MIB:
            raise UsageError(f"--memory {size.memory_mib}: the guest needs at least "
                             f"{MIN_MEMORY_MIB} MiB")
        if not 1 <= size.cpus <= MAX_CPUS:
            raise UsageError(f"--cpus {size.cpus}: from 1 to {MAX_CPUS}")
        if not 1 <= size.queues <= MAX_QUEUES:
            raise UsageError(f"--queues {size.queues}: from 1 to {MAX_QUEUES}")
        return size

    def machine_args(self) -> dict[str, int]:
        """Keyword arguments for `Machine`."""
        return {"memory_mb": self.memory_mib, "cpus": self.cpus, "num_queues": self.queues}


def add_machine_arguments(p: argparse.ArgumentParser) -> None:
    """--memory, --cpus and --queues of the guest that runs the workload."""
    p.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB, metavar="MIB",
                   help=f"guest RAM in MiB (default {DEFAULT_MEMORY_MIB}; at least "
                        f"{MIN_MEMORY_MIB}: the default guest unpacks into RAM)")
    p.add_argument("--cpus", type=int, default=1,
                   help="guest CPUs (default 1); more for a workload's concurrency")
    p.add_argument("--queues", type=int, default=1,
                   help="virtio-blk queues the disk offers (default 1); the guest starts at "
                        "most one per CPU")
