"""`logwrites mark NAME --control CTRL`: insert a mark into a running backend's log.

Returns once the mark is durable; prints its entry index. A name the backend refuses
(whitespace, too long, empty) or a backend that keeps no log is one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path
from typing import Any, Final

from logwrites.check import TIMEOUT_LIMIT, require_timeout
from logwrites.errors import UsageError
from logwrites.format import SECTOR_SIZES, validate_mark_name

# A status reply is a few hundred bytes; more without a line end is another protocol.
MAX_REPLY_BYTES: Final = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mark", help="insert a mark into a running backend's log",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="the mark's name (no whitespace)")
    p.add_argument("--control", type=Path, required=True, help="the backend's control socket")
    p.add_argument("--timeout", type=float, default=60.0,
                   help=f"seconds to wait (default 60; {TIMEOUT_LIMIT})")
    p.set_defaults(run=run)


def control_request(path: Path, request: dict[str, Any], timeout_s: float,
                    fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """One request line to the control socket at `path`, one reply line back, which must
    carry `fields` when the backend says yes.

    :raise UsageError: the backend said no (its error), or no reply came.
    :raise UsageError: also when no backend listens there, what listens speaks another
        protocol (a vhost-user socket), or `timeout_s` is no timeout.
    """
    require_timeout(timeout_s)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except OSError as err:
            raise UsageError(f"no backend at control socket {path}: "
                             f"{err.strerror or err}") from err
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = _reply_line(sock, path)
        except TimeoutError as err:
            raise UsageError(f"control socket {path}: no reply within {timeout_s:g} s "
                             f"(--timeout)") from err
        except ConnectionResetError as err:  # what a vhost-user socket does with our JSON
            raise _not_ours(path, f"it reset the connection: {err.strerror}") from err
        except OSError as err:
            raise UsageError(f"control socket {path}: {err.strerror or err}") from err
    answer = _decode_reply(reply, path)
    if not answer.get("ok"):
        raise UsageError(f"backend refused {request['cmd']}: {answer.get('error')}")
    missing = [name for name in fields if name not in answer]
    if missing:
        raise _not_ours(path, f"a reply without {', '.join(missing)}")
    return answer


def _reply_line(sock: socket.socket, path: Path) -> bytes:
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise UsageError(f"control socket {path}: closed without a reply")
        reply += chunk
        if len(reply) > MAX_REPLY_BYTES:  # a stream that never ends a line is no reply of ours
            raise _not_ours(path, f"no line end in {MAX_REPLY_BYTES} bytes")
    return reply


def _decode_reply(reply: bytes, path: Path) -> dict[str, Any]:
    try:
        answer = json.loads(reply)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise _not_ours(path, f"reply {reply[:40]!r} is no JSON") from None
    if not isinstance(answer, dict):
        raise _not_ours(path, f"reply {reply[:40]!r} is no JSON object")
    return answer


def _not_ours(path: Path, why: str) -> UsageError:
    return UsageError(f"control socket {path}: not a logwrites control socket ({why})")


def require_mark_name(name: str) -> None:
    """The backend's rules for a name (logwrites.format.validate_mark_name), checked here so
    that a name it could not take is refused in our words. Its length limit depends on the
    log's sector size, which only the backend knows: it judges that.

    :raise UsageError: empty, whitespace, or not UTF-8 (bytes the shell passed through).
    """
    try:
        validate_mark_name(name, max(SECTOR_SIZES))
    except UnicodeEncodeError:
        raise UsageError(f"mark name {os.fsencode(name)!r}: not UTF-8 text") from None
    except ValueError as err:
        raise UsageError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    require_mark_name(args.name)
    reply = control_request(args.control, {"cmd": "mark", "name": args.name}, args.timeout,
                            fields=("entry",))
    print(reply["entry"])
    return 0
