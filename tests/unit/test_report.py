"""Reports (logwrites.report) and the Python API's failure message, on a synthetic log whose
checker fails exactly the states that lack one record."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from logwrites.api import assert_no_failures, crash_loop
from logwrites.report import json_lines, junit_xml, svg_plot, table_rows
from tests.conftest import write_log

# Entry 3 writes sector 5 with 0x07; the checker wants that byte whenever entry 5 (0x08 at
# sector 6) is there: dropping 3 but keeping 5 is the bug. Both share the epoch closed by 6.
OPS = [("f",), ("m", "mkfs"), ("w", 1, 1, 1), ("w", 5, 1, 7), ("w", 2, 1, 2), ("w", 6, 1, 8),
       ("f",), ("m", "done")]
CHECK = ("host:python3 -c \"import sys; d=open(sys.argv[1],'rb').read(); "
         "sys.exit(1 if d[6*512]==8 and d[5*512]!=7 else 0)\" {image}")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("report")
    log = write_log(tmp_path / "test.log", OPS)
    base = tmp_path / "base.img"
    base.write_bytes(bytes(16 * 512))
    return crash_loop(log=log, base=base, fs="none", checks=[CHECK], jobs=2,
                      workdir=tmp_path)


def test_counts_table_and_exit(result) -> None:
    assert result.exit_status == 1
    rows = {row[0]: row[1:] for row in table_rows(result)}
    assert rows["prefix"] == (3, 0, 0, 3)  # from the mkfs mark: p:1, p:6, p:7
    assert rows["reorder"][1] > 0
    assert rows["total"][3] == len(result.results)


def test_json_lines_keys_and_summary(result) -> None:
    objs = [json.loads(line) for line in json_lines(result)]
    summary = objs.pop()
    assert summary["summary"] is True and summary["states"] == len(objs)
    # The log was the caller's: it is kept, and no scratch directory was left beside it.
    assert summary["recording_kept"] is True
    assert not list(Path(summary["log"]).parent.glob("logwrites-recording-*"))
    assert summary["fail"] == sum(o["verdict"] == "fail" for o in objs)
    for o in objs:
        assert list(o)[:8] == ["id", "kind", "entry", "dropped", "verdict", "checker",
                               "seconds", "repro"]
        assert "--state " + o["id"] in o["repro"]
    bad = [o for o in objs if o["verdict"] == "fail"]
    assert all(3 in o["dropped"] and 5 not in o["dropped"] for o in bad)
    blamed = {r["entry"] for o in bad for r in o.get("shrunk", o).get("records", [])}
    assert blamed == {3}


def test_junit_counts_match(result) -> None:
    suite = ET.fromstring(junit_xml(result))
    assert suite.get("tests") == str(len(result.results))
    failures = suite.findall("testcase/failure")
    assert len(failures) == len(result.failed()) > 0
    assert all("repro:" in f.text for f in failures)


def test_svg_draws_writes_marks_epochs_and_states(result) -> None:
    svg = svg_plot(result)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count('class="write"') == 4
    assert svg.count('class="mark"') == 2
    assert svg.count('class="state ') == len(result.results)
    assert 'class="state fail"' in svg


def test_assert_no_failures_names_the_repro(result) -> None:
    with pytest.raises(AssertionError) as info:
        assert_no_failures(result)
    text = str(info.value)
    assert "FAIL r:6:-3" in text and "replay" in text and "--state r:6:-3" in text
    assert "missing write entry 3: sectors 5+1" in text
