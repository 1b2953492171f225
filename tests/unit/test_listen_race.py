"""Backends starting at the same instant on one stale socket path: `listen_unix` probes,
unlinks and binds under a lock on the directory, so exactly one binds and the others are
refused as by a live backend. Without it both found the socket stale, and the second's unlink
removed the first's live socket: a backend that no front-end could ever reach."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import socket
import threading
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path

from vhost.server import SocketPathError, listen_unix, unlisten_unix

PROCESSES = 8
ROUNDS = 15


def stale_socket(path: Path) -> None:
    """A socket file with nobody bound to it: what a killed backend leaves behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


def contender(path: Path, start: Barrier, done: Event, results: multiprocessing.Queue) -> None:
    """One backend starting: listen at `path` once all start together; the one that binds
    takes a front-end."""
    start.wait()
    try:
        sock = listen_unix(path)
    except SocketPathError as err:
        results.put(("refused", str(err)))
        return
    except OSError as err:  # EADDRINUSE: a bind lost the race between another's unlink and bind
        results.put(("failed", str(err)))
        return
    results.put(("bound", os.getpid()))
    with sock:
        sock.setblocking(True)
        sock.settimeout(30)
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            results.put(("no front-end", os.getpid()))
        else:
            conn.close()
            results.put(("front-end", os.getpid()))
        done.wait(30)


def test_one_of_many_concurrent_listeners_binds_a_stale_path(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(ROUNDS):
        path = tmp_path / f"s{round_}.sock"
        stale_socket(path)
        start, done, results = ctx.Barrier(PROCESSES), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=contender, args=(path, start, done, results))
                 for _ in range(PROCESSES)]
        for proc in procs:
            proc.start()
        try:
            said = [results.get(timeout=30) for _ in range(PROCESSES)]
            bound = [pid for what, pid in said if what == "bound"]
            assert len(bound) == 1, f"round {round_}: {said}"
            assert {(what, text) for what, text in said if what != "bound"} == {
                ("refused", f"socket {path}: a backend already listens there")}, said
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as frontend:
                frontend.connect(str(path))
            assert results.get(timeout=30) == ("front-end", bound[0])
        finally:
            done.set()
            for proc in procs:
                proc.join(timeout=5)     # a failed round leaves winners in accept()
                if proc.is_alive():
                    proc.kill()
        assert {p.name for p in tmp_path.iterdir()} == {
            f"s{r}.sock" for r in range(round_ + 1)}     # no lock file left behind


def test_a_stopping_listener_waits_for_a_starting_one(tmp_path: Path) -> None:
    """A backend stopping closes and removes its socket under the same lock: unlocked, one
    starting in between found the closed socket stale, bound its own, and lost it to the
    stopping one's unlink."""
    path = tmp_path / "s.sock"
    sock = listen_unix(path)
    starting = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(starting, fcntl.LOCK_EX)   # a backend between its probe and its bind
        stopping = threading.Thread(target=unlisten_unix, args=(sock, path))
        stopping.start()
        stopping.join(0.3)
        assert stopping.is_alive() and path.exists() and sock.fileno() >= 0
        fcntl.flock(starting, fcntl.LOCK_UN)
        stopping.join(5)
        assert not stopping.is_alive() and not path.exists() and sock.fileno() == -1
    finally:
        os.close(starting)
