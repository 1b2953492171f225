"""`logwrites run` end to end: a kernel panic gives exit status 3 with the console tail, a
timed crash cuts the machine and leaves the run's files, a disk that fills is the run's
failure, and a built-in workload's run prints the crash-loop that checks its log."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _logwrites(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "logwrites.cli", *args], capture_output=True,
                          text=True, timeout=timeout_s, check=False)


@pytest.mark.slow
def test_run_kernel_panic_exits_3_with_console_tail(default_guest, tmp_path: Path) -> None:
    workload = tmp_path / "panic.sh"
    workload.write_text("echo c > /proc/sysrq-trigger\nsleep 100\n")
    started = time.monotonic()
    done = _logwrites("run", "--workload", str(workload), "--backend", "qemu-storage-daemon",
                      "--out", str(tmp_path / "out"))
    assert done.returncode == 3, done.stderr
    assert "Kernel panic" in done.stderr and "sysrq" in done.stderr.lower()
    assert time.monotonic() - started < 150
    assert "Kernel panic" in (tmp_path / "out" / "console.log").read_text()


@pytest.mark.slow
def test_run_time_crash_power_cut_leaves_the_run(default_guest, tmp_path: Path) -> None:
    workload = tmp_path / "loop.sh"
    workload.write_text('i=0; while :; do echo $i > "$LW_MNT/f$i"; i=$((i+1)); done\n')
    out = tmp_path / "out"
    done = _logwrites("run", "--workload", str(workload), "--fs", "ext4", "--backend",
                      "qemu-storage-daemon", "--crash-at", "time:3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["crash"], summary["qemu_status"]) == ("power-cut", -9)
    assert "result" not in summary  # the workload never finished: it was cut
    assert {"base.img", "disk.img", "console.log", "qemu-cmdline.sh"} <= {
        p.name for p in out.iterdir()}
    assert (out / "base.img").stat().st_size == 512 << 20
    assert "cut before it finished" in done.stdout
    # A power cut is what was asked for: QMP's dropped connection, QEMU's death and the
    # backend's lost guest are not errors to report (qemu.qmp logs one of its own when a
    # connection is lost, which the command line keeps quiet).
    assert "qemu.qmp" not in done.stderr and "ERROR" not in done.stderr, done.stderr


@pytest.mark.slow
def test_run_whose_disk_fills_up_fails_even_when_the_workload_passed(
        default_guest, small_fs, tmp_path: Path) -> None:
    # dd's writes land in the guest's page cache and exit 0; they reach the disk, and fail
    # there, only as the guest shuts down: not the run that was asked for. The log and the
    # image share the full filesystem; whichever runs out first is named.
    workload = tmp_path / "dd.sh"
    workload.write_text('dd if=/dev/zero of="$LW_DEV" bs=1M count=12\necho wrote\n')
    out = small_fs("small", "6M") / "run"
    done = _logwrites("run", "--workload", str(workload), "--fs", "none", "--out", str(out))
    assert done.returncode == 2, done.stderr
    assert "workload: exit 0 (script)" in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert (last.startswith(f"logwrites: log full: log {out / 'log'}: ")
            and "the guest's writes failed from then on" in last) or (
        last.startswith("logwrites: image write of ") and "the guest got an I/O error" in last
        and ("No space left on device" in last or "no room left" in last)), last


@pytest.mark.slow
def test_run_of_a_built_in_workload_prints_the_crash_loop_that_checks_it(
        default_guest, tmp_path: Path) -> None:
    # A built-in workload by name, with its arguments, as crash-loop takes it; the command the
    # run prints then finds what the workload's own checker finds in a crash-loop.
    out = tmp_path / "out"
    done = _logwrites("run", "--workload", "txnlog --no-barrier 3", "--fs", "none",
                      "--size", "16M", "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["workload"], summary["result"]["status"]) == ("txnlog --no-barrier 3", 0)
    assert (out / "base.img").stat().st_size == 16 << 20
    inspect = _logwrites("inspect", "--json", str(out / "log"))
    marks = [json.loads(line)["mark"] for line in inspect.stdout.splitlines()]
    assert [m for m in marks if m and m.startswith("txn-")] == ["txn-0", "txn-1", "txn-2"]
    command = summary["check_with"]
    assert f"its crash states: {command}" in done.stdout
    words = shlex.split(command)
    assert Path(words[0]).name == "logwrites" and words[1] == "crash-loop"
    assert "guests/checkers/txnlog" in command
    checked = _logwrites(*words[1:], "--json", "--no-shrink")
    assert checked.returncode == 1, checked.stderr  # no barrier: a commit can beat its data
    states = [json.loads(line) for line in checked.stdout.splitlines()]
    failed = [s for s in states if s.get("verdict") == "fail"]
    assert failed and all(s["kind"] == "reorder" for s in failed)
    assert all(s["verdict"] == "pass" for s in states if s.get("kind") == "prefix")


@pytest.mark.slow
def test_run_sizes_the_machine_as_asked(default_guest, tmp_path: Path) -> None:
    """--memory, --cpus and --queues reach the guest: a workload's concurrency needs CPUs, and
    the guest starts one queue per CPU of those the disk offers."""
    workload = tmp_path / "size.sh"
    workload.write_text('echo "cpus $(nproc)"\n'
                        'echo "queues $(ls /sys/block/vda/mq | wc -l)"\n'
                        'grep MemTotal /proc/meminfo\n')
    out = tmp_path / "out"
    done = _logwrites("run", "--workload", str(workload), "--cpus", "2", "--queues", "4",
                      "--memory", "768", "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    said = summary["result"]["stdout_tail"]
    assert "cpus 2" in said and "queues 2" in said, said
    mem_kib = int(said.split("MemTotal:")[1].split()[0])
    assert 600 << 10 < mem_kib <= 768 << 10, said
    assert (summary["memory_mib"], summary["cpus"], summary["queues"]) == (768, 2, 4)
