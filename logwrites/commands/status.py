"""`logwrites status --control CTRL [--json]`: a running backend's log position.

Prints the kernel target's status line, `<#logged entries> <highest allocated sector>`; with
`--json`, the backend's whole status object (queues, requests by kind, bytes, unflushed
records, log bytes, mode) on one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from logwrites.check import TIMEOUT_LIMIT
from logwrites.commands.mark import control_request


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="a running backend's log position",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--control", type=Path, required=True, help="the backend's control socket")
    p.add_argument("--json", action="store_true", help="the whole status object")
    p.add_argument("--timeout", type=float, default=30.0,
                   help=f"seconds to wait (default 30; {TIMEOUT_LIMIT})")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    reply = control_request(args.control, {"cmd": "status"}, args.timeout, fields=("line",))
    print(json.dumps(reply) if args.json else reply["line"])
    return 0
