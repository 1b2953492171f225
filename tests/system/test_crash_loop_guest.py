"""crash-loop with the real record step: the default guest on our backend, power cut at the end.

One QEMU at a time (the recording), then host checkers. The raw transaction log shows the bug
class prefix replay cannot see; ext4 with the default workload shows no false alarms.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from logwrites.cli import main
from logwrites.crashstates import SETUP_MARK, LogMap
from tests.conftest import PROJECT

TXN_CHECK = PROJECT / "guests" / "checkers" / "txnlog"


def run_json(capsys, *args: str) -> tuple[int, list[dict]]:
    status = main(["crash-loop", "--json", *args])
    out = capsys.readouterr().out
    return status, [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def txn_no_barrier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One guest recording of `txnlog --no-barrier 4`, shared by the tests below."""
    out = tmp_path_factory.mktemp("txn") / "report"
    status = main(["crash-loop", "--fs", "none", "--workload", "txnlog --no-barrier 4",
                   "--image-size", "16M", "--out", str(out), "--json"])
    assert status == 1
    return out


@pytest.mark.slow
def test_no_barrier_found_shrunk_and_reproduced(txn_no_barrier: Path, tmp_path: Path) -> None:
    objs = [json.loads(x) for x in (txn_no_barrier / "states.jsonl").read_text().splitlines()]
    states = objs[:-1]
    failed = [s for s in states if s["verdict"] == "fail"]
    assert failed and {s["kind"] for s in failed} == {"reorder"}
    for s in failed:
        records = s.get("shrunk", {}).get("records") or s["records"]
        assert len(records) == 1  # the data write whose absence breaks the commit
        assert records[0]["sector"] >= 1024 * 8 and records[0]["nr_sectors"] == 8
    image = tmp_path / "repro.img"
    subprocess.run(failed[0]["repro"].replace("{image}", shlex.quote(str(image))), shell=True,
                   check=True, capture_output=True)
    assert subprocess.run([str(TXN_CHECK), str(image)], capture_output=True).returncode == 1


@pytest.mark.slow
def test_prefix_states_of_the_same_log_all_pass(txn_no_barrier: Path, capsys) -> None:
    rec = txn_no_barrier / "recording"
    status, objs = run_json(capsys, "--fs", "none", "--log", str(rec / "disk.log"),
                            "--base", str(rec / "base.img"), "--states", "prefix",
                            "--check", f"host:{TXN_CHECK} {{image}}")
    assert status == 0 and objs[-1]["fail"] == 0 and objs[-1]["states"] >= 5


@pytest.mark.slow
def test_txnlog_with_barrier_passes_every_kind(tmp_path: Path, capsys) -> None:
    status, objs = run_json(capsys, "--fs", "none", "--workload", "txnlog 4", "--image-size",
                            "16M", "--states", "prefix,reorder,torn", "--out",
                            str(tmp_path / "r"))
    assert status == 0, [o for o in objs if o.get("verdict") == "fail"]
    assert {o["kind"] for o in objs[:-1]} == {"prefix", "reorder", "torn"}
    # Again into the same report: the earlier recording's log is replaced (serve would refuse
    # a log with entries unless told to overwrite it), not appended to.
    status, again = run_json(capsys, "--fs", "none", "--workload", "txnlog 4", "--image-size",
                             "16M", "--states", "prefix", "--out", str(tmp_path / "r"))
    assert status == 0 and again[-1]["recording_kept"] is True
    marks = [e.mark for e in LogMap.read(Path(again[-1]["log"])).entries if e.is_mark]
    assert marks[0] == SETUP_MARK and marks.count(SETUP_MARK) == 1, marks


@pytest.mark.slow
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_ext4_default_workload_has_no_false_alarms(tmp_path: Path, capsys,
                                                   sector_size: int) -> None:
    status, objs = run_json(capsys, "--fs", "ext4", "--image-size", "64M", "--max-states", "4",
                            "--sector-size", str(sector_size), "--out", str(tmp_path / "r"))
    # The guest's disk had these sectors, so the log counts in them.
    assert LogMap.read(tmp_path / "r" / "recording" / "disk.log").sectorsize == sector_size
    summary = objs[-1]
    assert summary["states"] > 20
    assert summary["by_kind"]["reorder"]["pass"] > 0
    assert status == 0, [o for o in objs if o.get("verdict") != "pass"][:3]
    assert all("fsck:ext4" in o["checker"] and "fs-default" in o["checker"]
               for o in objs[:-1])


@pytest.mark.slow
def test_ext4_guest_checker_reads_back_fsynced_files(tmp_path: Path, capsys) -> None:
    # A guest boots per state (tens of seconds under TCG): only the states from the last
    # round's marks on, prefix kind.
    checker = PROJECT / "guests" / "checkers" / "fs-default-guest"
    status = main(["crash-loop", "--json", "--fs", "ext4", "--image-size", "64M", "--states",
                   "prefix", "--start-mark", "rename-fsync-3", "--check", "fsck",
                   "--check", f"guest:{checker}", "--jobs", "1", "--workdir", str(tmp_path)])
    out, err = capsys.readouterr()
    objs = [json.loads(line) for line in out.splitlines()]
    states, summary = objs[:-1], objs[-1]
    assert states and all(f"guest:{checker}" in o["checker"] for o in states)
    assert status == 0, [o for o in states if o["verdict"] != "pass"]
    # Every state passed and no --out was given: the recording (two 64 MiB images and the
    # log) went with the loop's scratch files.
    assert summary["recording_kept"] is False
    assert not Path(summary["log"]).exists() and list(tmp_path.iterdir()) == []
    assert "every state passed: recording removed" in err


@pytest.mark.slow
def test_mkfs_refusal_stops_the_recording_with_its_reason(tmp_path: Path, capsys) -> None:
    # 64 MiB is under mkfs.xfs's minimum: it prints its reason, then its whole usage. With
    # mkfs's default options that is refused before the guest boots; other options (-f here)
    # may change the minimum, so then mkfs in the guest is the judge, and its reason must come
    # through.
    out = tmp_path / "report"
    status = main(["crash-loop", "--fs", "xfs", "--image-size", "64M", "--mkfs-opts=-f",
                   "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    output = out / "recording" / "workload.out"
    reason = output.read_text().strip().splitlines()[0]
    assert err[-1] == (f"logwrites: workload fs-default exited 1 in phase setup: {reason} "
                       f"(its output: {output})")
    assert "300" in reason and "Usage" in output.read_text()


@pytest.mark.slow
def test_a_full_workdir_while_recording_is_named_as_the_reason(small_fs, capsys) -> None:
    # mkfs's writes fail once the log or the image has no room; the guest's tools can only
    # say "I/O error". Both share the full filesystem; whichever runs out first is named.
    workdir = small_fs("small", "6M")
    status = main(["crash-loop", "--image-size", "64M", "--workdir", str(workdir)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    log_full = (last.startswith("logwrites: log full: log ") and "disk.log: " in last
                and "the guest's writes failed from then on" in last)
    image_full = (last.startswith("logwrites: image write of ")
                  and "the guest got an I/O error" in last)
    assert log_full or image_full, last
    assert "no room left on its filesystem" in last or "No space left" in last
    assert "exited 1 in phase setup" in last and "--workdir" in last


@pytest.mark.slow
def test_a_workload_past_its_timeout_is_named_so(tmp_path: Path, capsys) -> None:
    # The agent kills it (status 137); "Killed" alone did not say by whom or why.
    script = tmp_path / "sleepy.sh"
    script.write_text("#!/bin/sh\necho started\nsleep 120\n")
    script.chmod(0o755)
    out = tmp_path / "report"
    status = main(["crash-loop", "--fs", "none", "--workload", str(script), "--check",
                   "host:true", "--timeout", "3", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    output = out / "recording" / "workload.out"
    assert status == 2
    assert err[-1] == (f"logwrites: workload sleepy.sh ran past --timeout (3 s) in phase "
                       f"script and was killed (its output: {output})")
    assert output.read_text().startswith("started")


@pytest.mark.slow
def test_demo_on_btrfs_gets_a_disk_mkfs_btrfs_accepts(tmp_path: Path, capsys) -> None:
    # The demo's 64M disk is for ext4; mkfs.btrfs refuses anything under 109 MiB.
    status = main(["demo", "--fs", "btrfs", "--json", "--out", str(tmp_path / "r")])
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 0 and objs[-1]["fs"] == "btrfs" and objs[-1]["states"] > 20
    assert (tmp_path / "r" / "recording" / "base.img").stat().st_size == 128 << 20


@pytest.mark.slow
def test_the_recording_guest_is_sized_as_asked(tmp_path: Path, capsys) -> None:
    """--cpus, --queues and --memory size the guest that records the workload: a concurrency
    bug needs its CPUs there."""
    script = tmp_path / "sized.sh"
    script.write_text('#!/bin/sh\necho "cpus $(nproc) queues $(ls /sys/block/vda/mq | wc -l)"\n'
                      'grep MemTotal /proc/meminfo\n'
                      'dd if=/dev/zero of="$LW_DEV" bs=4k count=8 oflag=direct 2>/dev/null\n')
    script.chmod(0o755)
    out = tmp_path / "report"
    status = main(["crash-loop", "--fs", "none", "--workload", str(script), "--check",
                   "host:true", "--cpus", "2", "--queues", "3", "--memory", "640",
                   "--image-size", "16M", "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    said = (out / "recording" / "workload.out").read_text()
    assert "cpus 2 queues 2" in said, said  # one queue per CPU of the three offered
    assert 500 << 10 < int(said.split("MemTotal:")[1].split()[0]) <= 640 << 10, said
