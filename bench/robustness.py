"""Robustness figures for issue 6: hostile requests fuzzed per backend, and crashes.

Runs the hostile-guest cases of vhost/testing/hostile.py against qemu-storage-daemon (the
reference) and/or `logwrites serve`, N examples each, and prints how many requests were sent,
how many connections that took, how the outcomes split, and whether the backend survived
(alive, image untouched, a new connection served). `--json` prints one object per backend.

    .venv/bin/python bench/robustness.py --examples 100000 --backend logwrites
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from vhost.testing.daemons import Daemon, LogwritesServe, QsdExport, qsd_path
from vhost.testing.frontend import BlkFrontend, Status
from vhost.testing.hostile import HostileFailure, HostileSession, hostile_cases, payload

IMAGE_BYTES = 1 << 20


def start(backend: str, workdir: Path, image: Path) -> Daemon:
    if backend == "qsd":
        return QsdExport(image, workdir / "qsd.sock", workdir).start()
    return LogwritesServe(image, workdir / "ours.sock", workdir / "ours.log", workdir).start()


def measure(backend: str, examples: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="logwrites-robustness-") as tmp:
        workdir = Path(tmp)
        image = workdir / "img"
        image.write_bytes(payload(99, IMAGE_BYTES))
        daemon = start(backend, workdir, image)
        failures: list[str] = []
        started = time.monotonic()
        try:
            with BlkFrontend(daemon.socket_path) as fe:
                max_segments = max(1, fe.config.max_discard_seg, fe.config.max_write_zeroes_seg)
            session = HostileSession(daemon.socket_path, image, daemon.alive)

            @settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=hostile_cases(IMAGE_BYTES // 512, 512, max_segments))
            def one(case) -> None:
                session.run(case)

            try:
                one()
            except HostileFailure as err:
                failures.append(str(err))
            except Exception as err:           # hypothesis groups several failures
                failures.append(f"{type(err).__name__}: {err}")
            session.close()
            survived = daemon.alive()
            if survived:
                with BlkFrontend(daemon.socket_path) as fe:
                    survived = fe.read(0, 512).status == Status.OK
        finally:
            exit_status = daemon.stop()
        return {
            "backend": backend,
            "requests": session.tally.requests,
            "connections": session.tally.reconnects,
            "crashes": 0 if survived else 1,
            "failures": failures,
            "exit_status": exit_status,
            "seconds": round(time.monotonic() - started, 1),
            "outcomes": session.tally.outcomes,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--backend", choices=["qsd", "logwrites", "both"], default="both")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    backends = ["qsd", "logwrites"] if args.backend == "both" else [args.backend]
    qemu = subprocess.run([qsd_path(), "--version"], capture_output=True, text=True,
                          check=False).stdout.splitlines()[0]
    if not args.json:
        print(f"environment: {qemu}; {os.cpu_count()} cores; python {sys.version.split()[0]}")
    for backend in backends:
        result = measure(backend, args.examples)
        if args.json:
            print(json.dumps(result))
            continue
        print(f"{backend}: {result['requests']} hostile requests over "
              f"{result['connections']} connections in {result['seconds']} s, "
              f"crashes {result['crashes']}, oracle failures {len(result['failures'])}, "
              f"exit status {result['exit_status']}")
        for failure in result["failures"]:
            print(f"  failure: {failure[:2000]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
