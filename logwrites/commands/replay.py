"""`logwrites replay LOG TARGET`: replay a log onto an image or block device.

Options and their meaning follow xfstests' replay-log (src/log-writes/replay-log.c), so that
scripts written for it translate one to one: `--limit N` counts from the start point (0 means
no limit, as there), `--end-mark` replays through the mark, `--start-mark` starts just after
it, `--find` prints `INDEX@BLOCK` of the entry where the stop condition is met (BLOCK: the log
block after that entry) and replays nothing, `--check N|flush|fua --fsck CMD` makes the target
durable and runs CMD after every N entries or every FLUSH/FUA entry (`--fsck-timeout S`: CMD
still running after S seconds fails the check; replay-log waits forever). Two differences, both on
purpose: a stop point that the log does not have (a missing mark, no further flush) is an error
(exit 2) found before the target is touched, where replay-log silently replays everything; and
discards always leave zeros, whatever their size (`--discard-zeroes-data` is accepted for the
old spelling).
"""

from __future__ import annotations

import argparse
import sys

from logwrites.check import TIMEOUT_LIMIT, require_timeout
from logwrites.errors import UsageError
from logwrites.logfile import LogReader
from logwrites.replay import CheckWhen, find_stop, replay, resolve_start, shell_checker


def _check_when(text: str) -> CheckWhen:
    if text in ("flush", "fua"):
        return text  # type: ignore[return-value]
    try:
        number = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, flush or fua, not {text!r}") \
            from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"the number of entries must be positive, not {number}")
    return number


def _count(text: str) -> int:
    try:
        number = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid entry number {text!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"invalid entry number {number}")
    return number


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="replay a log onto an image or block device",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("log", help="the log file (or block device)")
    p.add_argument("target", nargs="?",
                   help="image file (created if missing) or block device; not with --find")
    stop = p.add_argument_group("where to stop (inclusive; whichever comes first)")
    stop.add_argument("--limit", type=_count, metavar="N",
                      help="replay N entries counted from the start point (0: no limit)")
    stop.add_argument("--end-mark", metavar="NAME", help="replay through this mark")
    stop.add_argument("--next-flush", action="store_true", help="replay through the next FLUSH")
    stop.add_argument("--next-fua", action="store_true", help="replay through the next FUA")
    start = p.add_argument_group("where to start").add_mutually_exclusive_group()
    start.add_argument("--start-entry", type=_count, metavar="N", default=0,
                       help="start at entry N (entries before it are passed over by header)")
    start.add_argument("--start-mark", metavar="NAME", help="start just after this mark")
    p.add_argument("--find", action="store_true",
                   help="print INDEX@BLOCK of the entry where the stop condition is met; "
                        "replay nothing")
    p.add_argument("--check", type=_check_when, metavar="N|flush|fua",
                   help="run --fsck after every N entries, or after every FLUSH or FUA entry")
    p.add_argument("--fsck", metavar="CMD",
                   help="shell command checking the target; non-zero exit stops the replay "
                        "(exit 1). The entry just replayed is in $LOGWRITES_ENTRY")
    p.add_argument("--fsck-timeout", type=float, metavar="SECONDS",
                   help="a --fsck command still running after SECONDS fails the check, and "
                        f"is killed with its children (default: no bound, as in replay-log; "
                        f"{TIMEOUT_LIMIT})")
    p.add_argument("--discard-zeroes-data", action="store_true",
                   help="accepted for compatibility: discards always leave zeros")
    # --- crash states (owned by the crash-loop engineer; logwrites.statebuild) ---
    p.add_argument("--state", metavar="ID",
                   help="rebuild the crash state ID (p:E, r:E:-i,-j, t:I:K, as crash-loop "
                        "prints it) onto TARGET, which must hold the log's base image")
    # --- end crash states ---
    p.set_defaults(run=run)


def _run_state(args: argparse.Namespace) -> int:
    """`--state ID`: the crash-loop's repro path; alone, no other start/stop options."""
    from logwrites.statebuild import build_state

    others = [name for name, on in (
        ("--limit", args.limit), ("--end-mark", args.end_mark), ("--next-flush", args.next_flush),
        ("--next-fua", args.next_fua), ("--start-entry", args.start_entry),
        ("--start-mark", args.start_mark), ("--find", args.find), ("--check", args.check),
        ("--fsck-timeout", args.fsck_timeout is not None)) if on]
    if others:
        raise UsageError(f"--state goes alone, not with {', '.join(others)}")
    if args.target is None:
        raise UsageError("replay --state needs a TARGET holding the base image")
    state = build_state(args.log, args.target, args.state)
    what = f", without records {', '.join(map(str, state.dropped))}" if state.dropped else ""
    torn = (f", then {state.torn[1]} sectors of entry {state.torn[0]}" if state.torn else "")
    print(f"rebuilt crash state {state.id} ({state.kind}): entries 0..{state.end}{what}{torn}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.state is not None:
        return _run_state(args)
    if (args.check is None) != (args.fsck is None):
        raise UsageError("--check and --fsck go together")
    if args.fsck_timeout is not None:
        if args.fsck is None:
            raise UsageError("--fsck-timeout goes with --fsck")
        require_timeout(args.fsck_timeout, "--fsck-timeout")
    limit = args.limit or None  # replay-log: a limit of 0 is no limit
    if args.find:
        if args.target is not None:
            raise UsageError(f"--find replays nothing: no TARGET ({args.target}) with it")
        return _find(args, limit)
    if args.target is None:
        raise UsageError("replay needs a TARGET (or --find)")
    _check_start_entry(args)
    result = replay(
        args.log, args.target,
        start_entry=args.start_entry, start_mark=args.start_mark, limit=limit,
        end_mark=args.end_mark, next_flush=args.next_flush, next_fua=args.next_fua,
        check=args.check,
        checker=shell_checker(args.fsck, args.fsck_timeout) if args.fsck else None,
    )
    span = (f"entries {result.start_index}..{result.last_index}" if result.entries
            else "no entries")
    print(f"replayed {span} ({result.entries} entries: {result.writes} writes, "
          f"{result.discards} discards, {result.flushes} flushes, {result.marks} marks; "
          f"{result.bytes_written / 2**20:.1f} MiB written"
          + (f", {result.checks} checks passed" if args.check else "")
          + f") in {result.seconds:.2f} s")
    return 0


def _check_start_entry(args: argparse.Namespace) -> None:
    # replay-log refuses a start entry past the last one ("Invalid entry number").
    if args.start_mark is None and args.start_entry:
        with LogReader(args.log) as reader:
            if args.start_entry >= reader.nr_entries:
                raise UsageError(f"--start-entry {args.start_entry}: the log has "
                                 f"{reader.nr_entries} entries (0..{reader.nr_entries - 1})")


def _find(args: argparse.Namespace, limit: int | None) -> int:
    if limit is None and args.end_mark is None and not (args.next_flush or args.next_fua):
        raise UsageError("--find needs --limit, --end-mark, --next-flush or --next-fua")
    _check_start_entry(args)
    with LogReader(args.log) as reader:
        index, block = resolve_start(reader, start_entry=args.start_entry,
                                     start_mark=args.start_mark)
        stop = find_stop(reader, index, block, limit=limit, end_mark=args.end_mark,
                         next_flush=args.next_flush, next_fua=args.next_fua)
        print(f"{stop.index}@{stop.next_block(reader.sectorsize)}")
        sys.stdout.flush()
    return 0
