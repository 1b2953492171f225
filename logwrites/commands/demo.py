"""`logwrites demo`: README's main job — crash-loop on the default guest with ext4 and the default
filesystem workload (guests/workloads/fs-default), checked by fsck and the workload's own
checker; prints the table of verdicts and the report's path. Sized to finish in under ten
minutes on two cores under TCG; every crash-loop option can still be given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from logwrites.commands import crash_loop

DEMO_MAX_STATES = 8  # reordered states per flush epoch: enough to show them, quick under TCG
# ext4 is quicker on a small disk; another --fs gets crash-loop's default for it (mkfs.xfs
# refuses under 300 MiB, mkfs.btrfs under 109).
DEMO_EXT4_IMAGE_SIZE = "64M"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: crash-loop on the built-in guest and "
                                    "workload (ext4), with an HTML report",
                       description=__doc__.split("\n\n")[0])
    crash_loop.add_loop_arguments(p)
    p.set_defaults(run=run, fs="ext4", max_states=DEMO_MAX_STATES, out=Path("out/demo"))


def run(args: argparse.Namespace) -> int:
    if args.log is None:  # a recording: with --log, crash-loop refuses what shapes one
        args.workload = args.workload or "fs-default"
        if args.image_size is None and args.fs == "ext4":
            args.image_size = DEMO_EXT4_IMAGE_SIZE
    return crash_loop.run(args)
