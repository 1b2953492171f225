"""Hostile-guest requests and the oracle that judges a backend's answers (issue 6).

`hostile_cases()` is a hypothesis strategy of `Case`s: valid requests in odd descriptor layouts,
and malformed ones (short headers, no or read-only status, writable-before-readable, unaligned
lengths, sectors past the end or overflowing, bad discard/write-zeroes segments, unknown types,
short GET_ID buffers, descriptor loops, wild addresses, zero lengths, bad indirect tables, bogus
avail indexes). `HostileSession` sends them through a `BlkFrontend`, keeps a model of the image
(what valid requests allow it to hold), and raises `HostileFailure` when the backend answers
outside what the case allows, touches bytes it may not, or dies. Malformed descriptor chains
make libvhost-user mark the device broken (vu_panic): no completion, and qemu-storage-daemon
hangs up; the session then reconnects. Needs the `test` extra (hypothesis).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from hypothesis import strategies as st

from logwrites.errors import LogwritesError
from vhost.testing.frontend import (
    OUTHDR,
    POISON,
    SECTOR_SIZE,
    SEGMENT,
    BlkFrontend,
    BlkRequest,
    CompletionTimeout,
    Layout,
    Part,
    ReqType,
    Status,
    request_parts,
)
from vhost.testing.protocol import BackendGone, FrontendError
from vhost.testing.virtqueue import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    GuestMemory,
    RawDesc,
)

log = logging.getLogger(__name__)

OK, IOERR, UNSUPP = "ok", "ioerr", "unsupp"
NO_STATUS = "no-status"          # completed, but there was no device-writable status byte
DROPPED = "dropped"              # not completed, connection still up (device broken or ignoring)
HANGUP = "hangup"                # the backend closed the connection
CONFUSED = "confused"            # completed descriptors that head no request (after garbage)
REJECTED: Final = frozenset({IOERR, UNSUPP, NO_STATUS, DROPPED, HANGUP})
KNOWN_TYPES: Final = frozenset({ReqType.IN, ReqType.OUT, ReqType.FLUSH, ReqType.GET_ID,
                                ReqType.DISCARD, ReqType.WRITE_ZEROES})


class HostileFailure(LogwritesError):
    """The backend answered a case outside what it allows (or died)."""


@dataclass(frozen=True)
class Effect:
    """What an OK completion means for the image: `kind` write|zeroes|discard|read."""

    kind: str
    byte_offset: int
    nbytes: int
    seed: int = 0          # write payload = payload(seed, nbytes)


@dataclass(frozen=True)
class Case:
    """One request to send. `parts` (layout-built) or `raw` (descriptor-level, see _RAW)."""

    name: str
    allowed: frozenset[str]
    parts: tuple[Part, ...] = ()
    indirect: bool = False
    raw: str = ""
    raw_arg: int = 0
    effect: Effect | None = None
    effects_if_ok: tuple[Effect, ...] = ()     # discard/write-zeroes segments

    def __repr__(self) -> str:       # hypothesis prints this for a failing example
        lens = [p if isinstance(p, int) else f"r{len(p)}" for p in self.parts]
        head = bytes(self.parts[0][:16]).hex() if self.parts and not isinstance(
            self.parts[0], int) else ""
        return (f"Case({self.name!r}, parts={lens}, hdr={head}, indirect={self.indirect}, "
                f"raw={self.raw!r}/{self.raw_arg}, effect={self.effect})")


def payload(seed: int, nbytes: int) -> bytes:
    out, counter = bytearray(), 0
    while len(out) < nbytes:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:nbytes])


# Strategies ------------------------------------------------------------------------------

def _cuts(total: int, max_cuts: int = 4) -> st.SearchStrategy[tuple[int, ...]]:
    if total <= 1:
        return st.just(())
    return st.lists(st.integers(1, total - 1), max_size=max_cuts).map(
        lambda xs: tuple(sorted(set(xs))))


def hostile_cases(capacity: int, blk_size: int = 512,
                  max_segments: int = 1) -> st.SearchStrategy[Case]:
    """Cases for a device of `capacity` 512-byte sectors and logical block `blk_size` bytes."""
    step = blk_size // SECTOR_SIZE                # sectors per logical block
    blocks = capacity // step

    @st.composite
    def valid_io(draw: st.DrawFn) -> Case:
        write = draw(st.booleans())
        nblocks = draw(st.integers(1, min(16, blocks)))
        req_sector = draw(st.integers(0, blocks - nblocks)) * step
        nbytes = nblocks * blk_size
        indirect = draw(st.booleans())
        if write:
            seed = draw(st.integers(0, 2**32))
            layout = Layout(out_cuts=draw(_cuts(OUTHDR.size + nbytes)), in_cuts=(),
                            indirect=indirect)
            parts = request_parts(ReqType.OUT, req_sector, payload(seed, nbytes), 0, layout)
            effect = Effect("write", req_sector * SECTOR_SIZE, nbytes, seed)
        else:
            layout = Layout(out_cuts=draw(_cuts(OUTHDR.size)),
                            in_cuts=draw(_cuts(nbytes + 1)), indirect=indirect)
            parts = request_parts(ReqType.IN, req_sector, b"", nbytes, layout)
            effect = Effect("read", req_sector * SECTOR_SIZE, nbytes)
        return Case("valid " + ("write" if write else "read"), frozenset({OK}), tuple(parts),
                    indirect, effect=effect)

    @st.composite
    def flush(draw: st.DrawFn) -> Case:
        layout = Layout(out_cuts=draw(_cuts(OUTHDR.size)), indirect=draw(st.booleans()))
        return Case("flush", frozenset({OK}), tuple(request_parts(ReqType.FLUSH, 0,
                                                                  layout=layout)),
                    layout.indirect)

    @st.composite
    def short_header(draw: st.DrawFn) -> Case:
        keep = draw(st.integers(0, OUTHDR.size - 1))
        req_type = draw(st.sampled_from(sorted(KNOWN_TYPES)))
        header = OUTHDR.pack(req_type, 0, draw(st.integers(0, capacity - 1)))[:keep]
        parts: list[Part] = list(_split(header, draw(_cuts(len(header)))))
        parts.append(draw(st.integers(1, 600)))
        return Case("short header", REJECTED, tuple(parts), draw(st.booleans()))

    @st.composite
    def no_status(draw: st.DrawFn) -> Case:
        req_sector = draw(st.integers(0, blocks - 1)) * step
        req_type = draw(st.sampled_from([ReqType.OUT, ReqType.FLUSH, ReqType.DISCARD,
                                         ReqType.WRITE_ZEROES]))
        body = {ReqType.OUT: payload(1, blk_size), ReqType.FLUSH: b"",
                ReqType.DISCARD: SEGMENT.pack(req_sector, step, 0),
                ReqType.WRITE_ZEROES: SEGMENT.pack(req_sector, step, 0)}[req_type]
        parts: list[Part] = [OUTHDR.pack(req_type, 0, req_sector)]
        if body:
            parts.append(body)
        if draw(st.booleans()):
            parts.append(b"\0")                   # a read-only "status" byte
        return Case("no writable status", REJECTED, tuple(parts), draw(st.booleans()))

    @st.composite
    def writable_first(draw: st.DrawFn) -> Case:
        req_sector = draw(st.integers(0, blocks - 1)) * step
        write = draw(st.booleans())
        layout = Layout(writable_first=True, indirect=draw(st.booleans()))
        parts = (request_parts(ReqType.OUT, req_sector, payload(2, blk_size), 0, layout)
                 if write else request_parts(ReqType.IN, req_sector, b"", blk_size, layout))
        return Case("writable before readable", REJECTED, tuple(parts), layout.indirect)

    @st.composite
    def unaligned(draw: st.DrawFn) -> Case:
        write = draw(st.booleans())
        nbytes = draw(st.integers(1, 8 * blk_size).filter(lambda n: n % blk_size))
        # A sector that is not a multiple of the logical block, when blocks are > 512 bytes.
        req_sector = draw(st.integers(0, capacity - 64))
        if nbytes % SECTOR_SIZE == 0 and req_sector % step == 0:
            req_sector += 1 if step > 1 else 0
        parts = (request_parts(ReqType.OUT, req_sector, payload(3, nbytes))
                 if write else request_parts(ReqType.IN, req_sector, b"", nbytes))
        return Case("unaligned length", frozenset({IOERR}), tuple(parts))

    @st.composite
    def past_end(draw: st.DrawFn) -> Case:
        write = draw(st.booleans())
        nblocks = draw(st.integers(1, 8))
        nbytes = nblocks * blk_size
        req_sector = draw(st.one_of(
            st.integers(capacity - nblocks * step + 1, capacity + 64),
            st.sampled_from([2**64 - step, 2**64 - 8 * step, 2**63, 2**55, 2**54 - step,
                             (2**64 - 1) // SECTOR_SIZE, 2**32 * step])))
        req_sector -= req_sector % step
        if req_sector + nblocks * step <= capacity:
            req_sector = capacity
        parts = (request_parts(ReqType.OUT, req_sector, payload(4, nbytes))
                 if write else request_parts(ReqType.IN, req_sector, b"", nbytes))
        return Case("past end", frozenset({IOERR}), tuple(parts))

    @st.composite
    def segments(draw: st.DrawFn) -> Case:
        req_type = draw(st.sampled_from([ReqType.DISCARD, ReqType.WRITE_ZEROES]))
        nseg = draw(st.integers(0, 3))
        segs, effects, all_valid = [], [], True
        for _ in range(nseg):
            seg_sector = draw(st.one_of(st.integers(0, capacity + 8),
                                        st.sampled_from([2**64 - 1, 2**63, 2**64 - step])))
            num = draw(st.one_of(st.integers(0, 64),
                                 st.sampled_from([2**32 - 1, 2**31, capacity, capacity + 1])))
            flags = draw(st.one_of(st.sampled_from([0, 0, 0, 1]), st.integers(0, 2**32 - 1)))
            segs.append(SEGMENT.pack(seg_sector, num, flags))
            ok_flags = flags == 0 or (flags == 1 and req_type == ReqType.WRITE_ZEROES)
            in_range = seg_sector + num <= capacity
            aligned = seg_sector % step == 0 and num % step == 0
            all_valid &= ok_flags and in_range and aligned
            if in_range and num:
                kind = "zeroes" if req_type == ReqType.WRITE_ZEROES else "discard"
                effects.append(Effect(kind, seg_sector * SECTOR_SIZE, num * SECTOR_SIZE))
        garbage = draw(st.sampled_from([b"", b"", b"\x01", b"\0" * 15]))
        all_valid &= 1 <= nseg <= max_segments and not garbage
        body = b"".join(segs) + garbage
        layout = Layout(out_cuts=draw(_cuts(OUTHDR.size + len(body))),
                        indirect=draw(st.booleans()))
        parts = request_parts(req_type, 0, body, 0, layout)
        allowed = frozenset({OK, IOERR, UNSUPP} if all_valid else {IOERR, UNSUPP})
        name = f"{'discard' if req_type == ReqType.DISCARD else 'write-zeroes'} segments"
        return Case(name, allowed, tuple(parts), layout.indirect,
                    effects_if_ok=tuple(effects))

    @st.composite
    def unknown_type(draw: st.DrawFn) -> Case:
        req_type = draw(st.one_of(
            st.sampled_from([2, 3, 5, 6, 7, 9, ReqType.GET_LIFETIME, 12,
                             ReqType.SECURE_ERASE, 15, 16, 255]),
            st.integers(0, 2**31 - 1)).filter(lambda t: t not in KNOWN_TYPES))
        body = payload(5, draw(st.sampled_from([0, 16, 512, 4096])))
        in_len = draw(st.sampled_from([0, 1, 16, 512]))
        parts = request_parts(req_type, draw(st.integers(0, 2**64 - 1)), body, in_len)
        return Case("unknown type", frozenset({UNSUPP}), tuple(parts))

    @st.composite
    def get_id(draw: st.DrawFn) -> Case:
        in_len = draw(st.integers(0, 40))
        layout = Layout(in_cuts=draw(_cuts(in_len + 1)), indirect=draw(st.booleans()))
        parts = request_parts(ReqType.GET_ID, 0, b"", in_len, layout)
        return Case("get-id buffer", frozenset({OK, IOERR, UNSUPP}), tuple(parts),
                    layout.indirect)

    raw = st.builds(lambda kind, arg: Case(f"raw {kind}", _raw_allowed(kind), raw=kind,
                                           raw_arg=arg),
                    st.sampled_from(RAW_KINDS), st.integers(0, 2**16))

    # Pick the family first, uniformly (st.one_of skews towards some branches); valid I/O and
    # raw descriptor cases count twice.
    families = [valid_io(), valid_io(), flush(), short_header(), no_status(), writable_first(),
                unaligned(), past_end(), segments(), unknown_type(), get_id(), raw, raw]
    return st.integers(0, len(families) - 1).flatmap(lambda i: families[i])


def _raw_allowed(kind: str) -> frozenset[str]:
    if kind == "avail-idx-jump":
        # libvhost-user's vu_queue_empty does not bound avail.idx: it pops entry after entry
        # (all naming our harmless flush) until "Virtqueue size exceeded". Completing some is
        # fine; what must not happen is a crash or an image change.
        return REJECTED | {OK, CONFUSED}
    return REJECTED


def _split(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


# Raw descriptor-level cases ---------------------------------------------------------------
# Each builds a write of one block at sector 0 whose chain is broken in one way, so that a
# backend that follows the broken chain anyway would write the image (and be caught). The
# oracle allows no image change for them, so each must really be broken: a "wild" buffer
# reaches outside guest memory (`_wild`), else the case would be a valid write in disguise.

WILD_STATUS_LEN: Final = 16     # a 1-byte status at `end - 8` would fit: a valid request


def _wild(mem: GuestMemory, desc: RawDesc) -> RawDesc:
    """`desc`, once checked to reach outside guest memory."""
    if mem.contains(desc.addr, desc.length):
        raise ValueError(f"raw case: wild buffer {desc.addr:#x}+{desc.length} lies inside "
                         f"guest memory, so its request would be valid")
    return desc


def _raw_write(fe: BlkFrontend, kind: str, arg: int) -> BlkRequest:
    mem, q = fe.memory, fe.queues[0]
    header = mem.alloc(OUTHDR.size)
    mem.write(header, OUTHDR.pack(ReqType.OUT, 0, 0))
    data = mem.alloc(SECTOR_SIZE)
    mem.write(data, payload(6, SECTOR_SIZE))
    status = mem.alloc(1)
    mem.fill(status, 1, POISON)
    allocations = [header, data, status]
    end = mem.gpa_base + mem.size
    free = q.free_slots()
    a, b, c = free[0], free[1], free[2]
    hdr = RawDesc(header, OUTHDR.size, VRING_DESC_F_NEXT, b)
    dat = RawDesc(data, SECTOR_SIZE, VRING_DESC_F_NEXT, c)
    sts = RawDesc(status, 1, VRING_DESC_F_WRITE)
    table = {a: hdr, b: dat, c: sts}
    head = a
    wild = [end, end + 4096, 2**64 - 4096, 2**63, end - 8][arg % 5]
    if kind == "loop":                       # status points back at the data
        table[c] = RawDesc(status, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, b)
    elif kind == "self-loop":
        table[b] = RawDesc(data, SECTOR_SIZE, VRING_DESC_F_NEXT, b)
    elif kind == "next-out-of-table":
        table[b] = RawDesc(data, SECTOR_SIZE, VRING_DESC_F_NEXT, q.num + arg % 1000)
    elif kind == "wild-data":
        table[b] = _wild(mem, RawDesc(wild, SECTOR_SIZE, VRING_DESC_F_NEXT, c))
    elif kind == "wild-header":
        table[a] = _wild(mem, RawDesc(wild, OUTHDR.size, VRING_DESC_F_NEXT, b))
    elif kind == "wild-status":
        # Longer than the 1 byte a status needs, so that at `end - 8` it straddles the end.
        table[c] = _wild(mem, RawDesc(wild, WILD_STATUS_LEN, VRING_DESC_F_WRITE))
    elif kind == "data-crosses-end":
        table[b] = _wild(mem, RawDesc(end - 256, SECTOR_SIZE, VRING_DESC_F_NEXT, c))
    elif kind == "huge-length":
        table[b] = _wild(mem, RawDesc(data, 0xFFFFFFFF, VRING_DESC_F_NEXT, c))
    elif kind == "zero-length-data":
        table[b] = RawDesc(data, 0, VRING_DESC_F_NEXT, c)
    elif kind == "zero-length-status":
        table[c] = RawDesc(status, 0, VRING_DESC_F_WRITE)
    elif kind in ("indirect-bad-size", "indirect-wild", "indirect-nested", "indirect-loop",
                  "indirect-empty"):
        itable = mem.alloc(16 * 4, align=16)
        allocations.append(itable)
        chain = [RawDesc(header, OUTHDR.size, VRING_DESC_F_NEXT, 1),
                 RawDesc(data, SECTOR_SIZE, VRING_DESC_F_NEXT, 2),
                 RawDesc(status, 1, VRING_DESC_F_WRITE)]
        length = 48
        if kind == "indirect-loop":
            chain[2] = RawDesc(status, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
        elif kind == "indirect-nested":
            chain[1] = RawDesc(itable, 48, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 2)
        elif kind == "indirect-bad-size":
            length = 48 - 1 - arg % 15
        elif kind == "indirect-empty":
            length = 0
        fe.write_table(itable, chain)
        address = wild if kind == "indirect-wild" else itable
        table = {a: RawDesc(address, length, VRING_DESC_F_INDIRECT)}
        if kind == "indirect-wild":
            _wild(mem, table[a])
    elif kind == "head-out-of-table":
        table = {}
        head = q.num + arg % 1000
    elif kind == "avail-idx-jump":
        # Claim more new entries than the ring holds ("Guest moved used index"). Every ring
        # entry names one flush, so whatever a backend pops changes nothing.
        mem.write(header, OUTHDR.pack(ReqType.FLUSH, 0, 0))
        table = {a: RawDesc(header, OUTHDR.size, VRING_DESC_F_NEXT, c), c: sts}
        req = fe.submit_raw(table, head, in_buffers=[(status, 1)], allocations=allocations,
                            kick=False)
        for i in range(q.num):
            mem.write(q.avail_gpa + 4 + 2 * i, a.to_bytes(2, "little"))
        q.set_avail_idx(q.avail_idx + q.num + arg % 100)
        fe.kick()
        return req
    return fe.submit_raw(table, head, in_buffers=[(status, 1)], allocations=allocations)


RAW_KINDS: Final = (
    "loop", "self-loop", "next-out-of-table", "wild-data", "wild-header", "wild-status",
    "data-crosses-end", "huge-length", "zero-length-data", "zero-length-status",
    "indirect-bad-size", "indirect-wild", "indirect-nested", "indirect-loop",
    "indirect-empty", "head-out-of-table", "avail-idx-jump")


# The session: send, judge, keep the model -------------------------------------------------

@dataclass
class Tally:
    requests: int = 0
    reconnects: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    # What OK completions allow the log to hold: (byte offset, bytes, sha256) per write or
    # write-zeroes, (byte offset, bytes) per discard segment, in completion order.
    ok_writes: list[tuple[int, int, str]] = field(default_factory=list)
    ok_discards: list[tuple[int, int]] = field(default_factory=list)
    slowest_s: float = 0.0           # the longest a backend took to complete a case
    slowest_case: str = ""


class HostileSession:
    """Sends cases to one backend, reconnecting when a case leaves the connection unusable.

    `image_path` is the backend's data image; `model` what it must hold (bytes), `known`
    which 512-byte sectors the model vouches for (a discard makes them unknown).
    `alive` says whether the backend process still runs. A case that may be dropped is judged
    dropped after `timeout_s` without completion (qemu-storage-daemon drops some silently, so
    this stays short); one the backend must answer gets `answer_timeout_s`, so that a slow
    answer on a loaded machine is not mistaken for none. After the first failure the image
    and the model may have parted, so every later verdict would blame an innocent case: the
    session re-raises that first failure instead (hypothesis replays cases on it).
    """

    def __init__(self, socket_path: Path, image_path: Path, alive: Callable[[], bool],
                 timeout_s: float = 0.4, describe: Callable[[], str] = lambda: "",
                 answer_timeout_s: float = 30.0) -> None:
        self.socket_path, self.image_path, self.alive = socket_path, image_path, alive
        self.timeout_s, self.describe = timeout_s, describe
        self.answer_timeout_s = answer_timeout_s
        self.model = bytearray(image_path.read_bytes())
        self.known = bytearray(b"\1" * (len(self.model) // SECTOR_SIZE))
        self.tally = Tally()
        self.fe: BlkFrontend | None = None
        self.last_case: Case | None = None
        self.failure: HostileFailure | None = None

    def connect(self) -> BlkFrontend:
        if self.fe is None:
            self.fe = BlkFrontend(self.socket_path, queue_size=64, memory_size=4 << 20,
                                  timeout_s=5.0)
            self.tally.reconnects += 1
        return self.fe

    def disconnect(self) -> None:
        if self.fe is not None:
            self.fe.close(graceful=False)
            self.fe = None

    def fail(self, case: Case, problem: str) -> HostileFailure:
        failure = HostileFailure(f"{case!r}: {problem} (previous case: {self.last_case!r}) "
                                 f"{self.describe()}")
        if self.failure is None:
            self.failure = failure
        return failure

    def run(self, case: Case) -> str:
        """Send one case, judge it; returns the outcome. :raise HostileFailure:"""
        if self.failure is not None:
            raise self.failure
        try:
            fe = self.connect()
        except (BackendGone, LogwritesError) as err:
            raise self.fail(case, f"backend refused a new connection: {err}") from err
        self.tally.requests += 1
        started = time.monotonic()
        if case.raw:
            req = _raw_write(fe, case.raw, case.raw_arg)
        else:
            req = fe.prepare(case.parts, indirect=case.indirect)
            fe.publish([req])
            fe.kick()
        outcome = self._outcome(fe, req, self.timeout_s if DROPPED in case.allowed
                                else self.answer_timeout_s)
        elapsed = time.monotonic() - started
        if req.done and elapsed > self.tally.slowest_s:
            self.tally.slowest_s, self.tally.slowest_case = elapsed, case.name
        self.tally.outcomes[f"{case.name}: {outcome}"] = (
            self.tally.outcomes.get(f"{case.name}: {outcome}", 0) + 1)
        try:
            if not self.alive():
                raise self.fail(case, "the backend process died")
            if outcome not in case.allowed:
                raise self.fail(case, f"outcome {outcome}, allowed {sorted(case.allowed)}")
            if req.done and not case.raw and req.violations:
                raise self.fail(case, "; ".join(req.violations))
            if outcome == OK:
                self._apply(case, req)
            self.check_image(case)
        finally:
            if outcome in (DROPPED, HANGUP, CONFUSED) or case.raw == "avail-idx-jump":
                self.disconnect()
            self.last_case = case
        return outcome

    def _outcome(self, fe: BlkFrontend, req: BlkRequest, timeout_s: float) -> str:
        try:
            fe.wait([req], timeout_s)
        except BackendGone:
            return HANGUP if not req.done else self._status_outcome(req)
        except CompletionTimeout:
            return HANGUP if fe.hung_up(0.05) else DROPPED
        except FrontendError:
            return CONFUSED
        return self._status_outcome(req)

    @staticmethod
    def _status_outcome(req: BlkRequest) -> str:
        if not req.in_buffers or req.in_buffers[-1][1] == 0:
            return NO_STATUS
        status = req.status
        if status == POISON:                 # the device wrote no status byte
            return NO_STATUS
        return {Status.OK: OK, Status.IOERR: IOERR, Status.UNSUPP: UNSUPP}.get(
            status, f"status {status:#x}" if status is not None else NO_STATUS)

    def _apply(self, case: Case, req: BlkRequest) -> None:
        effects = [case.effect] if case.effect else list(case.effects_if_ok)
        for e in effects:
            end = e.byte_offset + e.nbytes
            sectors = slice(e.byte_offset // SECTOR_SIZE, end // SECTOR_SIZE)
            if e.kind == "write":
                data = payload(e.seed, e.nbytes)
                self.model[e.byte_offset:end] = data
                self.known[sectors] = b"\1" * (sectors.stop - sectors.start)
                self.tally.ok_writes.append((e.byte_offset, e.nbytes, _sha(data)))
            elif e.kind == "zeroes":
                self.model[e.byte_offset:end] = bytes(e.nbytes)
                self.known[sectors] = b"\1" * (sectors.stop - sectors.start)
                self.tally.ok_writes.append((e.byte_offset, e.nbytes, _sha(bytes(e.nbytes))))
            elif e.kind == "discard":
                self.tally.ok_discards.append((e.byte_offset, e.nbytes))
                self.known[sectors] = bytes(sectors.stop - sectors.start)
            elif e.kind == "read":
                got, want = req.data, bytes(self.model[e.byte_offset:end])
                for i in range(sectors.start, sectors.stop):
                    at = (i - sectors.start) * SECTOR_SIZE
                    if self.known[i] and got[at:at + SECTOR_SIZE] != want[at:at + SECTOR_SIZE]:
                        raise self.fail(case, f"read returned wrong data at sector {i}")

    def check_image(self, case: Case | None = None) -> None:
        """Every sector the model vouches for holds what valid requests put there."""
        image = self.image_path.read_bytes()
        if len(image) != len(self.model):
            raise HostileFailure(f"image size changed to {len(image)} after {case!r}")
        if image == self.model:
            return
        for i, known in enumerate(self.known):
            at = i * SECTOR_SIZE
            if known and image[at:at + SECTOR_SIZE] != self.model[at:at + SECTOR_SIZE]:
                problem = f"image sector {i} changed without a valid request"
                raise (self.fail(case, problem) if case else HostileFailure(problem))

    def close(self) -> None:
        self.disconnect()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
