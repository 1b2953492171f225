"""Reports of a crash-replay loop: table data, JSON lines, JUnit XML, and an HTML page.

Pure rendering of a `LoopResult`: strings and data structures out, files only in
`write_html_report` (the `--out DIR` directory: index.html with an inline SVG plot of the log,
the console logs copied beside it, the images of failing states kept by the loop). The command
module prints; nothing here does.

The plot draws each write as a vertical bar at its entry index spanning its sector range (the
data device's address space on the y axis), discards in grey, flush epochs shaded in
alternating bands, marks as labelled dashed lines, and each crash state as a dot in a strip
above the plot at its entry, coloured by verdict.
"""

from __future__ import annotations

import html
import json
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from logwrites.crashstates import describe_record
from logwrites.loop import VERDICT_ORDER, LoopResult, StateResult

COLOURS: Final = {"pass": "#2e9d4a", "fail": "#d62728", "error": "#ff9f1c"}
# What `write_html_report` writes into `--out`, besides console logs and failing/.
PAGE_NAME: Final = "index.html"
STATES_NAME: Final = "states.jsonl"
REPORT_FILES: Final = (PAGE_NAME, STATES_NAME)
_MAX_PLOTTED_ENTRIES: Final = 20000


def state_object(result: LoopResult, r: StateResult) -> dict[str, Any]:
    """The `--json` object of one state (DESIGN/issue keys first, then extras)."""
    obj: dict[str, Any] = {
        "id": r.state.id,
        "kind": r.state.kind,
        "entry": r.state.entry,
        "dropped": list(r.state.dropped),
        "verdict": r.verdict,
        "checker": r.checker,
        "seconds": round(r.seconds, 4),
        "repro": r.repro,
        "epoch": r.state.epoch,
        "detail": r.detail,
    }
    if r.same_as is not None:
        obj["same_as"] = r.same_as
    if r.reused_from is not None:
        obj["reused_from"] = r.reused_from  # the checker did not run: that state's answer
    if r.state.torn:
        obj["torn"] = {"entry": r.state.torn[0], "sectors": r.state.torn[1]}
    if r.image is not None:
        obj["image"] = str(r.image)
    if r.shrunk is not None:
        obj["shrunk"] = {
            "id": r.shrunk.state.id,
            "minimal": r.shrunk.minimal,
            "tries": r.shrunk.tries,
            "repro": r.repro.replace(f"--state {r.state.id}", f"--state {r.shrunk.state.id}"),
            "records": [describe_record(result.logmap, i) for i in r.shrunk.state.dropped],
        }
    elif r.verdict == "fail" and r.state.dropped:
        obj["records"] = [describe_record(result.logmap, i) for i in r.state.dropped]
    return obj


def summary_object(result: LoopResult) -> dict[str, Any]:
    totals = dict.fromkeys(VERDICT_ORDER, 0)
    for r in result.results:
        totals[r.verdict] += 1
    return {
        "summary": True,
        "states": len(result.results),
        **totals,
        "by_kind": result.counts(),
        "entries": len(result.logmap.entries),
        "epochs": len(result.logmap.epochs),
        "start_entry": result.start,
        "log": str(result.recording.log),
        "base_image": str(result.recording.base_image),
        # False where every state passed and the scratch recording was removed.
        "recording_kept": result.recording.log.exists(),
        "fs": result.recording.fs,
        "workload": result.recording.workload,
        "jobs": result.jobs,
        "deduplicated": result.deduplicated,
        "readset_reused": result.readset_reused,
        "atomic_unit": result.atomic_unit,
        "guest_checks": result.guest_checks,
        "guest_restored": result.guest_restored,
        "seconds": round(result.seconds, 3),
        "states_per_minute": round(60 * len(result.results) / result.seconds, 1)
        if result.seconds else None,
        "exit_status": result.exit_status,
    }


def json_lines(result: LoopResult) -> Iterator[str]:
    """One JSON object per state, in log order, then the summary object."""
    for r in sorted(result.results, key=lambda r: (r.state.entry, r.state.id)):
        yield json.dumps(state_object(result, r), sort_keys=False)
    yield json.dumps(summary_object(result))


def table_rows(result: LoopResult) -> list[tuple[str, int, int, int, int]]:
    """(kind, pass, fail, error, total) per state kind, then a 'total' row."""
    rows = []
    sums = [0, 0, 0]
    for kind, counts in result.counts().items():
        values = [counts[v] for v in VERDICT_ORDER]
        sums = [a + b for a, b in zip(sums, values, strict=True)]
        rows.append((kind, *values, sum(values)))
    rows.append(("total", *sums, sum(sums)))
    return rows  # type: ignore[return-value]


def failure_lines(result: LoopResult) -> Iterator[str]:
    """Human lines for each failing state: what failed, the records to blame, the repro."""
    for r in sorted(result.failed(), key=lambda r: (r.state.entry, r.state.id)):
        yield f"FAIL {r.state.id} ({r.state.kind}, epoch {r.state.epoch}): {r.detail}"
        blamed = r.shrunk.state if r.shrunk else r.state
        if r.shrunk is not None:
            yield (f"  shrunk to {blamed.id} ({'minimal' if r.shrunk.minimal else 'not minimal'}"
                   f", {r.shrunk.tries} tries)")
        for index in blamed.dropped:
            d = describe_record(result.logmap, index)
            kind = "discard" if d["discard"] else "write"
            yield (f"  missing {kind} entry {index}: sectors {d['sector']}+{d['nr_sectors']} "
                   f"in epoch {d['epoch']} (entries {d['epoch_entries'][0]}..."
                   f"{d['epoch_entries'][1]}), after mark {d['mark_before']}, before mark "
                   f"{d['mark_after']}")
        repro = r.repro if r.shrunk is None else r.repro.replace(
            f"--state {r.state.id}", f"--state {blamed.id}")
        yield f"  repro: {repro}"


def error_lines(result: LoopResult, examples: int = 3) -> Iterator[str]:
    """Human lines for the states that could not be checked, one group per distinct reason
    (a timeout or a missing tool repeats over every state): the count, a few of the states,
    and one's repro."""
    groups: dict[str, list[StateResult]] = {}
    for r in sorted(result.results, key=lambda r: (r.state.entry, r.state.id)):
        if r.verdict == "error":
            groups.setdefault(error_reason(r), []).append(r)
    for reason, states in groups.items():
        ids = ", ".join(r.state.id for r in states[:examples])
        more = ", ..." if len(states) > examples else ""
        yield (f"ERROR {len(states)} state{'s' if len(states) > 1 else ''} ({ids}{more}) "
               f"not checked: {reason}")
        yield f"  repro: {states[0].repro}"


def error_reason(r: StateResult) -> str:
    """Why a state is an error: its checkers' errors only (the detail also names passes
    reused from another state, which would split one reason into many groups)."""
    reasons = [f"{v.checker}: {v.detail}" for v in r.verdicts if v.verdict == "error"]
    return "; ".join(reasons) or r.detail


def junit_xml(result: LoopResult) -> str:
    """JUnit XML: one test case per state (classname = kind), failures and errors with the
    checker's detail and the repro command."""
    totals = summary_object(result)
    suite = ET.Element("testsuite", {
        "name": "logwrites.crash-loop", "tests": str(totals["states"]),
        "failures": str(totals["fail"]), "errors": str(totals["error"]), "skipped": "0",
        "time": f"{result.seconds:.3f}"})
    props = ET.SubElement(suite, "properties")
    for key in ("log", "base_image", "fs", "workload", "entries", "start_entry"):
        ET.SubElement(props, "property", {"name": key, "value": str(totals[key])})
    for r in sorted(result.results, key=lambda r: (r.state.entry, r.state.id)):
        case = ET.SubElement(suite, "testcase", {
            "classname": f"crash-loop.{r.state.kind}", "name": r.state.id,
            "time": f"{r.seconds:.3f}"})
        if r.verdict != "pass":
            tag = "failure" if r.verdict == "fail" else "error"
            el = ET.SubElement(case, tag, {"message": r.detail[:500], "type": r.checker})
            outputs = "\n".join(v.output[-4000:] for v in r.verdicts if v.verdict != "pass")
            el.text = f"repro: {r.repro}\n{outputs}"
    ET.indent(suite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suite, encoding="unicode")


def svg_plot(result: LoopResult, width: int = 1100, height: int = 420) -> str:
    """The log as an inline SVG: entry index (x) against sector (y)."""
    logmap = result.logmap
    entries = logmap.entries
    n = max(len(entries), 1)
    left, right, top, strip, bottom = 70, 10, 20, 26, 30
    plot_h = height - top - strip - bottom
    y0 = top + strip
    max_sector = max((e.sector + e.nr_sectors for e in entries), default=1) or 1

    def x(i: float) -> float:
        return left + (width - left - right) * i / n

    def y(sector: float) -> float:
        return y0 + plot_h * (1 - sector / max_sector)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="10" role="img" '
             f'aria-label="log entries against sectors">']
    for k, epoch in enumerate(logmap.epochs):
        end = epoch.closes if epoch.closes is not None else n - 1
        if k % 2:
            parts.append(f'<rect class="epoch" x="{x(epoch.opens + 1):.1f}" y="{y0}" '
                         f'width="{max(x(end + 1) - x(epoch.opens + 1), 0.5):.1f}" '
                         f'height="{plot_h}" fill="#eef2fb"/>')
    if result.start >= 0:
        parts.append(f'<rect x="{left}" y="{y0}" width="{x(result.start) - left:.1f}" '
                     f'height="{plot_h}" fill="#000" fill-opacity="0.06"/>')
    step = max(1, len(entries) // _MAX_PLOTTED_ENTRIES)
    for e in entries[::step]:
        if not e.nr_sectors:
            continue
        colour = "#999" if e.is_discard else "#1f4e9c"
        y_top, y_bot = y(e.sector + e.nr_sectors), y(e.sector)
        parts.append(f'<rect class="write" x="{x(e.index):.1f}" y="{y_top:.1f}" '
                     f'width="{max(x(e.index + 1) - x(e.index), 1.0):.1f}" '
                     f'height="{max(y_bot - y_top, 1.0):.1f}" fill="{colour}" '
                     f'fill-opacity="0.8"><title>entry {e.index}: sectors {e.sector}+'
                     f'{e.nr_sectors}{" discard" if e.is_discard else ""}</title></rect>')
    for e in entries:
        if e.is_mark:
            parts.append(f'<line class="mark" x1="{x(e.index):.1f}" x2="{x(e.index):.1f}" '
                         f'y1="{y0}" y2="{y0 + plot_h}" stroke="#555" stroke-dasharray="3,3"/>'
                         f'<text x="{x(e.index) + 2:.1f}" y="{y0 + 10}" fill="#333">'
                         f'{html.escape(e.mark or "")}</text>')
    for r in sorted(result.results, key=lambda r: VERDICT_ORDER.index(r.verdict)):
        row = {"prefix": 0, "reorder": 1, "torn": 2}.get(r.state.kind, 0)
        parts.append(f'<circle class="state {r.verdict}" cx="{x(r.state.entry + 0.5):.1f}" '
                     f'cy="{top + 4 + 8 * row}" r="3" fill="{COLOURS[r.verdict]}">'
                     f'<title>{html.escape(r.state.id)}: {r.verdict}</title></circle>')
    parts.append(f'<text x="2" y="{top + 8}">prefix</text><text x="2" y="{top + 16}">'
                 f'reorder</text><text x="2" y="{top + 24}">torn</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y0 + plot_h}" '
                 f'y2="{y0 + plot_h}" stroke="#000"/><line x1="{left}" x2="{left}" y1="{y0}" '
                 f'y2="{y0 + plot_h}" stroke="#000"/>')
    parts.append(f'<text x="{width / 2:.0f}" y="{height - 5}" text-anchor="middle">'
                 f'log entry index (0..{n - 1})</text>')
    parts.append(f'<text x="12" y="{y0 + plot_h / 2:.0f}" transform="rotate(-90 12 '
                 f'{y0 + plot_h / 2:.0f})" text-anchor="middle">sector (0..{max_sector}, '
                 f'{logmap.sectorsize}-byte)</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def html_report(result: LoopResult, console_names: list[str]) -> str:
    s = summary_object(result)
    rows = "".join(
        f"<tr><td>{kind}</td><td>{p}</td><td>{f}</td><td>{e}</td><td>{t}</td></tr>"
        for kind, p, f, e, t in table_rows(result))
    failures = "\n".join(html.escape(line) for line in failure_lines(result)) or "none"
    states = "".join(
        f'<tr class="{r.verdict}"><td>{html.escape(r.state.id)}</td><td>{r.state.kind}</td>'
        f"<td>{r.state.entry}</td><td>{r.verdict}</td><td>{html.escape(r.checker)}</td>"
        f"<td>{r.seconds:.2f}</td><td>{html.escape(r.detail)}</td></tr>"
        for r in sorted(result.results, key=lambda r: (r.verdict == "pass", r.state.entry))
    )
    consoles = "".join(f'<li><a href="{html.escape(name)}">{html.escape(name)}</a></li>'
                       for name in console_names) or "<li>none</li>"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.recording.notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>logwrites crash-loop report</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px}}tr.fail td{{background:#fde0e0}}
tr.error td{{background:#fff1d6}}pre{{background:#f6f6f6;padding:.5em;overflow-x:auto}}</style>
</head><body>
<h1>logwrites crash-loop</h1>
<p>Workload: {html.escape(s["workload"])}; filesystem: {html.escape(str(s["fs"]))};
log: {html.escape(s["log"])} ({s["entries"]} entries, {s["epochs"]} flush epochs);
states from entry {s["start_entry"]}; {s["states"]} states in {s["seconds"]} s with
{s["jobs"]} jobs; exit status {s["exit_status"]}.</p>
<ul>{notes}</ul>
<h2>Verdicts</h2>
<table id="verdicts"><tr><th>kind</th><th>pass</th><th>fail</th><th>error</th><th>total</th></tr>
{rows}</table>
<h2>The log</h2>
{svg_plot(result)}
<h2>Failures</h2>
<pre id="failures">{failures}</pre>
<h2>Console logs</h2><ul>{consoles}</ul>
<h2>States</h2>
<table id="states"><tr><th>id</th><th>kind</th><th>entry</th><th>verdict</th><th>checker</th>
<th>seconds</th><th>detail</th></tr>{states}</table>
</body></html>
"""


def write_html_report(result: LoopResult, out: Path) -> Path:
    """Write `out/index.html` and copy the console logs beside it; return the page's path."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for path in result.recording.console_logs:
        if path.is_file():
            shutil.copyfile(path, out / path.name)
            names.append(path.name)
    page = out / PAGE_NAME
    page.write_text(html_report(result, names))
    (out / STATES_NAME).write_text("\n".join(json_lines(result)) + "\n")
    return page


__all__ = ["error_lines", "failure_lines", "html_report", "json_lines", "junit_xml", "state_object",
           "summary_object", "svg_plot", "table_rows", "write_html_report"]
