"""`logwrites mark NAME --control CTRL`: insert a mark into a running backend's log.

Returns once the mark is durable; prints its entry index. A name the backend refuses
(whitespace, too long, empty) or a backend that keeps no log is one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path
from typing import Any

from logwrites.check import require_timeout
from logwrites.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mark", help="insert a mark into a running backend's log",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="the mark's name (no whitespace)")
    p.add_argument("--control", type=Path, required=True, help="the backend's control socket")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    p.set_defaults(run=run)


def control_request(path: Path, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One request line to the control socket at `path`, one reply line back.

    :raise UsageError: the backend said no (its error), or no reply came.
    :raise UsageError: also when no backend listens there, or `timeout_s` is no timeout.
    """
    require_timeout(timeout_s)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except OSError as err:
            raise UsageError(f"no backend at control socket {path}: "
                             f"{err.strerror or err}") from err
        reply = b""
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise UsageError(f"control socket {path}: closed without a reply")
                reply += chunk
        except TimeoutError as err:
            raise UsageError(f"control socket {path}: no reply within {timeout_s:g} s "
                             f"(--timeout)") from err
    answer = json.loads(reply)
    if not answer.get("ok"):
        raise UsageError(f"backend refused {request['cmd']}: {answer.get('error')}")
    return dict(answer)


def run(args: argparse.Namespace) -> int:
    reply = control_request(args.control, {"cmd": "mark", "name": args.name}, args.timeout)
    print(reply["entry"])
    return 0
