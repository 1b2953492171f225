"""crash-loop end to end on logs made on the host (no guest): the CLI, reports, repro, exits.

The transaction-log logs are written with LogWriter exactly as the backend records
guests/workloads/txnlog (mark mkfs, then per transaction: data write, [FLUSH], commit write,
FLUSH, mark txn-i), so that the prefix-versus-reordered claim is tested without QEMU.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from logwrites.cli import main
from logwrites.errors import UsageError
from logwrites.logfile import LogWriter
from tests.conftest import PROJECT

CHECKER = PROJECT / "guests" / "checkers" / "txnlog"
BLOCK = 4096


def txn_block(text: str) -> bytes:
    raw = (text + "\n").encode()
    return raw + bytes(BLOCK - len(raw))


def write_txnlog_log(path: Path, n: int, barrier: bool, sectorsize: int = 512) -> Path:
    per_block = BLOCK // sectorsize
    with LogWriter.create(path, sectorsize) as w:
        w.append_flush()          # the agent's `sync` before the set-up mark
        w.append_mark("mkfs")
        w.commit()
        for i in range(n):
            data = 1024 + i
            w.append_write(data * per_block, per_block, [txn_block(f"LWTXN-DATA {i}")])
            if barrier:
                w.append_flush()
                w.commit()
            w.append_write((1 + i) * per_block, per_block,
                           [txn_block(f"LWTXN-COMMIT {i} {data}")])
            w.append_flush()
            w.append_mark(f"txn-{i}")
            w.commit()
    return path


@pytest.fixture
def txn(tmp_path: Path):
    def make(barrier: bool, n: int = 4) -> tuple[Path, Path]:
        log = write_txnlog_log(tmp_path / f"txn-{barrier}.log", n, barrier)
        base = tmp_path / "base.img"
        with open(base, "wb") as f:
            f.truncate(8 << 20)
        return log, base
    return make


def crash_loop(capsys, *args: str) -> tuple[int, list[dict]]:
    status = main(["crash-loop", "--json", "--fs", "none", *args])
    out = capsys.readouterr().out
    return status, [json.loads(line) for line in out.splitlines()]


def check_arg() -> str:
    return f"host:{shlex.quote(str(CHECKER))} {{image}}"


def test_no_barrier_fails_only_reordered_states_and_shrinks(txn, capsys, tmp_path) -> None:
    log, base = txn(barrier=False)
    status, objs = crash_loop(capsys, "--log", str(log), "--base", str(base),
                              "--check", check_arg(), "--states", "prefix,reorder")
    states, summary = objs[:-1], objs[-1]
    assert status == 1
    assert summary["summary"] and summary["fail"] > 0 and summary["error"] == 0
    assert set(states[0]) >= {"id", "kind", "entry", "dropped", "verdict", "checker",
                              "seconds", "repro"}
    failed = [s for s in states if s["verdict"] == "fail"]
    assert {s["kind"] for s in failed} == {"reorder"}
    assert all(s["verdict"] == "pass" for s in states if s["kind"] == "prefix")
    # Dropping the data write of a transaction while keeping its commit is the bug: each
    # failure names exactly that one record (entry of the data write, sector range).
    for s in failed:
        records = s.get("shrunk", {}).get("records") or s["records"]
        assert len(records) == 1
        rec = records[0]
        assert rec["nr_sectors"] == 8 and rec["sector"] >= 1024 * 8
        assert rec["mark_before"] is not None
    # The repro rebuilds an image on which the checker fails.
    image = tmp_path / "repro.img"
    cmd = failed[0]["repro"].replace("{image}", shlex.quote(str(image)))
    subprocess.run(cmd, shell=True, check=True, capture_output=True)
    verdict = subprocess.run([str(CHECKER), str(image)], capture_output=True, text=True)
    assert verdict.returncode == 1, verdict.stdout
    assert "points at block" in verdict.stdout


def test_prefix_states_cannot_see_the_missing_barrier(txn, capsys) -> None:
    log, base = txn(barrier=False)
    status, objs = crash_loop(capsys, "--log", str(log), "--base", str(base),
                              "--check", check_arg(), "--states", "prefix")
    assert status == 0
    assert objs[-1]["fail"] == 0 and objs[-1]["states"] >= 4 * 2


def test_with_the_barrier_every_kind_passes(txn, capsys) -> None:
    log, base = txn(barrier=True)
    status, objs = crash_loop(capsys, "--log", str(log), "--base", str(base),
                              "--check", check_arg(), "--states", "prefix,reorder,torn")
    kinds = {s["kind"] for s in objs[:-1]}
    assert status == 0, [s for s in objs if s.get("verdict") == "fail"]
    assert kinds == {"prefix", "reorder", "torn"}
    assert objs[-1]["pass"] == objs[-1]["states"]


def test_a_log_on_a_block_device_is_read_where_it_is(txn, capsys) -> None:
    # dm-log-writes logs to a block device; a loop device over the same log must give the
    # same states and verdicts as the file.
    from tests.conftest import require_tool

    losetup = require_tool("losetup", "mount")
    log, base = txn(barrier=False)
    status, from_file = crash_loop(capsys, "--log", str(log), "--base", str(base),
                                   "--check", check_arg())
    attach = subprocess.run([losetup, "--find", "--show", str(log)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert attach.returncode == 0, f"losetup needs root and loop devices: {attach.stderr}"
    device = attach.stdout.strip()
    try:
        again, from_device = crash_loop(capsys, "--log", device, "--base", str(base),
                                        "--check", check_arg())
    finally:
        subprocess.run([losetup, "--detach", device], timeout=60, check=False)
    assert status == again == 1
    assert from_device[-1]["log"] == device
    verdicts = [[(s["id"], s["verdict"]) for s in objs[:-1]] for objs in (from_file, from_device)]
    assert verdicts[0] == verdicts[1] and len(verdicts[0]) > 8


def test_a_missing_workdir_is_made(txn, capsys, tmp_path) -> None:
    # As --out is: before, the loop stopped on '<workdir>/logwrites-loop-XXXX: No such file'.
    log, base = txn(barrier=True)
    workdir = tmp_path / "not" / "yet"
    status, objs = crash_loop(capsys, "--log", str(log), "--base", str(base),
                              "--check", check_arg(), "--workdir", str(workdir))
    assert status == 0 and objs[-1]["pass"] == objs[-1]["states"] > 0
    assert workdir.is_dir() and not list(workdir.iterdir())    # its scratch went with the loop


def test_an_atomic_unit_of_a_block_leaves_block_writes_whole(txn, capsys) -> None:
    # Every write of the transaction log is one aligned 4 KiB block: a device that writes
    # 4 KiB atomically cannot tear any of them.
    log, base = txn(barrier=True)
    args = ("--log", str(log), "--base", str(base), "--check", check_arg(),
            "--states", "prefix,torn")
    status, sectors = crash_loop(capsys, *args)
    assert status == 0 and sectors[-1]["atomic_unit"] == 512
    assert {s["kind"] for s in sectors[:-1]} == {"prefix", "torn"}
    status, blocks = crash_loop(capsys, *args, "--atomic-unit", "4K")
    assert status == 0 and blocks[-1]["atomic_unit"] == 4096
    assert [s["id"] for s in blocks[:-1]] == [s["id"] for s in sectors[:-1]
                                             if s["kind"] == "prefix"]
    assert crash_loop(capsys, *args, "--atomic-unit", "3000")[0] == 2


def test_summary_names_only_the_reuse_that_answered(txn, tmp_path) -> None:
    # The real loop's result, then the counts of an xfs or btrfs run (identical images reused,
    # no e2fsck read set) and of an ext4 one (both).
    import dataclasses

    from logwrites.api import crash_loop as api_crash_loop
    from logwrites.commands.crash_loop import summary_line

    log, base = txn(barrier=True)
    result = api_crash_loop(fs="none", log=log, base=base, checks=[check_arg()],
                            workdir=tmp_path)
    assert "verdicts reused" not in summary_line(result)
    other_fs = summary_line(dataclasses.replace(result, deduplicated=3, readset_reused=0))
    assert other_fs.endswith("; verdicts reused: 3 of identical images"), other_fs
    ext4 = summary_line(dataclasses.replace(result, deduplicated=3, readset_reused=5))
    assert ext4.endswith("; verdicts reused: 3 of identical images, 5 where no byte e2fsck "
                         "read had changed"), ext4


def test_junit_html_and_kept_images(txn, capsys, tmp_path) -> None:
    log, base = txn(barrier=False, n=2)
    junit, out = tmp_path / "junit.xml", tmp_path / "report"
    status = main(["crash-loop", "--fs", "none", "--log", str(log), "--base", str(base),
                   "--check", check_arg(), "--junit", str(junit), "--out", str(out),
                   "--jobs", "2"])
    text = capsys.readouterr().out
    assert status == 1
    assert "reorder" in text and "FAIL r:" in text and "repro:" in text
    suite = ET.parse(junit).getroot()
    cases = suite.findall("testcase")
    failures = [c for c in cases if c.find("failure") is not None]
    assert int(suite.get("tests")) == len(cases) > 0
    assert int(suite.get("failures")) == len(failures) > 0
    assert "replay" in failures[0].find("failure").text
    page = (out / "index.html").read_text()
    assert "<svg" in page and 'class="state fail"' in page and 'class="mark"' in page
    assert page.count('class="epoch"') >= 1
    kept = sorted((out / "failing").iterdir())
    assert len(kept) == len(failures)
    assert subprocess.run([str(CHECKER), str(kept[0])], capture_output=True).returncode == 1


def test_bad_input_exits_2(txn, capsys, tmp_path) -> None:
    log, base = txn(barrier=True)
    assert main(["crash-loop", "--log", str(log), "--fs", "none"]) == 2
    assert main(["crash-loop", "--log", str(log), "--base", str(base), "--fs", "none",
                 "--check", "bogus"]) == 2
    assert main(["crash-loop", "--log", str(log), "--base", str(base), "--fs", "none",
                 "--check", "host:true", "--states", "sideways"]) == 2
    assert main(["crash-loop", "--log", str(tmp_path / "nope"), "--base", str(base),
                 "--fs", "none", "--check", "host:true"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--log and --base go together" in err


@pytest.mark.parametrize(("option", "error"), [
    (["--states", "prefix,sideways"],
     "unknown state kinds ['sideways'] (known: prefix, reorder, torn)"),
    (["--states", ","], "--states: name at least one kind"),
    (["--max-states", "0"], "--max-states must be at least 1"),
    (["--jobs", "0"], "--jobs 0: must be at least 1"),
    (["--atomic-unit", "3000"], "--atomic-unit 3000: a power of two of at least 512 bytes"),
    (["--image-size", "100000", "--sector-size", "4096"],
     "--image-size 100000: not a whole number of 4096-byte sectors"),
    (["--image-size", "0"], "size '0': must be more than 0 bytes"),
    (["--image-size", "infK"], "size 'infK': must be at most 1T"),
    (["--atomic-unit", "infK"], "size 'infK': must be at most 1T"),
    (["--workload", "'x"], "--workload \"'x\": No closing quotation"),
    (["--timeout", "-5"], "--timeout -5: must be more than 0 seconds"),
    (["--timeout", "nan"], "--timeout nan: must be more than 0 seconds"),
    (["--kernel", "/nonexistent/bzImage"], "kernel /nonexistent/bzImage: No such file or "
                                           "directory"),
    (["--memory", "200"], "--memory 200: the guest needs at least 384 MiB"),
    (["--cpus", "0"], "--cpus 0: from 1 to 64"),
    (["--queues", "100"], "--queues 100: from 1 to 64"),
    # fs-default's own checker is for ext4: on the raw disk nothing would judge the states.
    (["--fs", "none", "--workload", "fs-default"],
     "no checker: give at least one --check (with --fs none and no built-in checker for the "
     "workload, there is no default)"),
])
def test_bad_loop_options_are_refused_before_the_guest_records(
        capsys, option: list[str], error: str) -> None:
    # One line and exit 2 at once, not after a recording in a guest.
    assert main(["crash-loop", *option]) == 2
    captured = capsys.readouterr()
    assert "recording" not in captured.out + captured.err
    assert captured.err.strip().splitlines() == [f"logwrites: {error}"]


def test_the_api_refuses_a_machine_it_cannot_boot_before_recording(tmp_path) -> None:
    from logwrites.api import crash_loop as api_crash_loop

    with pytest.raises(UsageError, match="--cpus 0: from 1 to 64"):
        api_crash_loop(workload="txnlog", fs="none", checks=["host:true"], cpus=0,
                       workdir=tmp_path / "work")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(("option", "error"), [
    (["--cpus", "2"], "--cpus: only for a recording, and with --log nothing is recorded"),
    (["--workload", "txnlog", "--image-size", "64M", "--sector-size", "4096", "--memory",
      "512", "--queues", "2", "--mkfs-opts", "-b 1024"],
     "--workload, --mkfs-opts, --image-size, --sector-size, --memory, --queues: only for a "
     "recording, and with --log nothing is recorded"),
])
def test_recording_options_with_a_log_are_refused(
        txn, capsys, tmp_path, option: list[str], error: str) -> None:
    # A log made elsewhere was not recorded as these ask: saying nothing would let one think so.
    log, base = txn(barrier=True)
    assert main(["crash-loop", "--log", str(log), "--base", str(base), "--fs", "none",
                 "--check", "host:true", *option]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"logwrites: {error}"]
    demo = ["demo", "--log", str(log), "--base", str(base), "--fs", "none", "--check",
            "host:true", "--json", "--out", str(tmp_path / "out")]
    assert main([*demo, *option]) == 2
    # demo's own recording defaults (its workload, ext4's small disk) are not options given.
    assert main(demo) == 0


def test_the_api_refuses_recording_options_with_a_log(txn, tmp_path) -> None:
    from logwrites.api import crash_loop as api_crash_loop

    log, base = txn(barrier=True)
    with pytest.raises(UsageError, match=r"^workload, cpus: only for a recording, and with "
                                         r"log nothing is recorded$"):
        api_crash_loop(workload="txnlog", fs="none", checks=["host:true"], cpus=2, log=log,
                       base=base, workdir=tmp_path / "work")


def test_replay_state_rejects_other_options(txn, tmp_path, capsys) -> None:
    log, base = txn(barrier=True)
    assert main(["replay", str(log), str(base), "--state", "p:1", "--limit", "3"]) == 2
    assert main(["replay", str(log), str(base), "--state", "r:99:-1"]) == 2
    assert main(["replay", str(log), str(base), "--state", "p:1"]) == 0
    assert "rebuilt crash state p:1" in capsys.readouterr().out


def test_pytest_plugin_fixture_fails_with_the_repro(txn, tmp_path) -> None:
    log, base = txn(barrier=False, n=2)
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text('pytest_plugins = ["logwrites.pytest_plugin"]\n')
    (suite / "test_user.py").write_text(
        "def test_txn(crash_loop):\n"
        f"    result = crash_loop(log={str(log)!r}, base={str(base)!r}, fs='none',\n"
        f"                        checks=[{check_arg()!r}], states=['prefix', 'reorder'])\n"
        "    assert result.counts()['prefix']['fail'] == 0\n"
        "    result.assert_ok()\n")
    done = subprocess.run([str(PROJECT / ".venv" / "bin" / "python"), "-m", "pytest", "-q",
                           "-p", "no:cacheprovider", "--rootdir", str(suite), str(suite)],
                          capture_output=True, text=True, cwd=suite, timeout=600)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "FAIL r:" in done.stdout and "--state r:" in done.stdout
    assert "missing write entry" in done.stdout


@pytest.mark.slow
def test_in_place_states_and_checks_match_fresh_images_on_a_real_ext4_log(
        tmp_path: Path) -> None:
    # A real ext4 log (the host kernel through QEMU blklogwrites, as bench/crashloop.py records
    # it). Every prefix and reordered state built in place on the cursor must be the image a
    # replay from entry 0 gives, the in-place fsck (journal replay undone by e2undo) must give
    # the verdict it gives on a fresh image, and the cursor must come back to its checkpoint.
    import hashlib
    import importlib.util

    from logwrites.check import FsckChecker, _ext4_needs_recovery, check_state
    from logwrites.crashstates import LogMap, enumerate_states, start_index
    from logwrites.logfile import LogReader
    from logwrites.statebuild import StateBuilder, build_from_zero
    from tests.conftest import require_tool

    for tool, package in (("qemu-storage-daemon", "qemu-system-x86"), ("e2undo", "e2fsprogs"),
                          ("losetup", "util-linux")):
        require_tool(tool, package)
    spec = importlib.util.spec_from_file_location("bench_crashloop",
                                                  PROJECT / "bench" / "crashloop.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    log, base = bench.record_on_host(tmp_path, files=40, size_mb=32)
    logmap = LogMap.read(log)
    states = enumerate_states(logmap, ["prefix", "reorder"], start=start_index(logmap),
                              max_states=3)
    assert len(states) > 100

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    checker = FsckChecker("ext4")
    fresh = tmp_path / "fresh.img"
    kinds_checked: set[str] = set()
    recovered = 0
    with LogReader(log) as reader:
        builder = StateBuilder(reader, logmap, base, tmp_path / "build")
        try:
            # Every 6th state of each kind keeps the test short; build order is kept.
            picked = {s.id for kind in ("prefix", "reorder")
                      for s in [s for s in states if s.kind == kind][::6]}
            for state in (s for s in states if s.id in picked):
                build_from_zero(reader, logmap, base, state, fresh)
                want = digest(fresh)
                recovered += _ext4_needs_recovery(fresh)
                expected = check_state([checker], fresh, tmp_path / "c", expect_fs=True,
                                       consume=True)[0].verdict
                with builder.view(state) as image:
                    assert digest(image) == want, state.id
                    got = check_state([checker], image, tmp_path / "c", expect_fs=True)
                    assert digest(image) == want, f"{state.id}: the check changed the image"
                assert got[0].verdict == expected, (state.id, got[0].detail)
                kinds_checked.add(state.kind)
        finally:
            builder.close()
    assert builder.resets == 0
    assert kinds_checked == {"prefix", "reorder"}
    assert recovered > 10  # the journal replay, and so its undo, really ran


def test_a_full_workdir_stops_the_loop_with_one_line(txn, capsys, small_fs) -> None:
    small_dir = small_fs("small", "1M")
    log, base = txn(barrier=True, n=8)
    with open(base, "r+b") as f:  # a checker's copy of every state must need room
        f.write(os.urandom(4 << 20))
    status = main(["crash-loop", "--fs", "none", "--log", str(log), "--base", str(base),
                   "--check", check_arg(), "--workdir", str(small_dir), "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("logwrites: ") and "No space left on device" in err[-1]
    assert "no room to build crash state " in err[-1] and "--workdir" in err[-1]
    assert not any("ERROR" in line for line in err), err  # not one line per state
    assert list(small_dir.iterdir()) == []
