"""crash-loop on xfs with the built-in fsck: dirty-log states are recovered by the guest's
kernel (a mount on a disposable copy), then checked with xfs_repair -n; no state is an error.

One QEMU at a time: the recording, then one guest boot per dirty-log state (jobs 1), so the
states are bounded: prefix and reordered states (at most 2 per epoch) from the last round's
mark of the default workload on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from logwrites.api import crash_loop, failure_message


@pytest.mark.slow
def test_xfs_default_workload_fsck_recovers_dirty_logs_in_the_guest(tmp_path: Path) -> None:
    # No image_size: the default for xfs must be one mkfs.xfs accepts (128 MiB is not).
    result = crash_loop(fs="xfs", states=("prefix", "reorder"),
                        max_states=2, start_mark="rename-fsync-3", jobs=1,
                        workdir=tmp_path)
    states = result.results
    assert states, "no crash state after the mark rename-fsync-3"
    assert all(r.checker == "fsck:xfs" for r in states)
    assert not [r for r in states if r.verdict == "error"], failure_message(result)
    assert result.exit_status == 0, failure_message(result)
    # The dirty-log path ran: the kernel recovered the log before xfs_repair -n judged it.
    recovered = [r for r in states if any("log recovery" in v.detail for v in r.verdicts)]
    assert recovered, [(r.state.id, r.verdicts[0].detail) for r in states]
    assert {r.state.kind for r in states} == {"prefix", "reorder"}
    # One QEMU per recovered state: the first boots and saves its guest, every later one is
    # restored from that (jobs 1: no other check boots meanwhile).
    checked = [r for r in recovered if r.same_as is None and r.reused_from is None]
    assert result.guest_checks == len(checked) >= 1
    assert result.guest_restored == result.guest_checks - 1
