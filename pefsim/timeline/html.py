"""One self-contained HTML page per run: the model as JSON in the page, drawn by the page's own
script (pefsim/timeline/page.py) into an SVG. Nothing is fetched: it opens from a file offline."""
from __future__ import annotations

import html
import json
from dataclasses import asdict

from pefsim.timeline.model import BULK, Model
from pefsim.timeline.page import CSS, SCRIPT

CALL_COLS = ("id", "lane", "inc", "row", "start", "end", "name", "cls", "result", "kind", "lpid", "caller",
             "caller_inc", "who", "state", "args", "source", "start_known")


def page_data(model: Model) -> dict:
    """What the page's script reads: the model, calls as columns and rows (a chaos run holds
    thousands of calls: a third of the bytes of one object each)."""
    lanes = []
    for lane in model.lanes:
        d = asdict(lane)
        d["marks"] = [[m.t, m.text] for m in lane.marks]
        lanes.append(d)
    rows = []
    for c in model.calls:
        d = asdict(c)
        rows.append([d[k] for k in CALL_COLS])
    return {"title": model.title, "kind": model.kind, "source": model.source, "t0": model.t0,
            "duration": model.duration, "lanes": lanes, "calls": {"cols": list(CALL_COLS), "rows": rows},
            "faults": [asdict(f) for f in model.faults], "verdicts": [asdict(v) for v in model.verdicts],
            "info": model.info, "stats": model.stats, "bulk": sorted(BULK)}


def _json_for_script(data: dict) -> str:
    # "<" only occurs inside JSON strings, where \u003c means the same: no "</script>" can end the block
    return json.dumps(data, separators=(",", ":"), default=str).replace("<", "\\u003c")


def _meta(model: Model) -> str:
    info, e = model.info, html.escape
    plan = info.get("plan") or {}
    bits = []
    src = f"<b>{e(model.kind)}</b> {e(model.source)}"
    bits.append(f'<div class="meta">{src} · time 0 = {e(str(info.get("t0_iso", "")))}</div>')
    plan_text = ", ".join(f"{k}={v}" for k, v in plan.items() if v not in ("", 0, 0.0, None, ["", 0], ("", 0)))
    fault = info.get("fault_detail") or ("no fault injected" if not info.get("injected") else "")
    rec = info.get("recovery_s")
    line = f"plan: <b>{e(plan_text or '-')}</b> · fault: <b>{e(fault or '-')}</b>"
    if rec is not None:
        line += f" · recovery <b>{rec:.3f} s</b> after the heal"
    if model.kind != "stack":  # a stack's calls (the demo): no plan, no fault
        bits.append(f'<div class="meta">{line}</div>')
    outcomes = info.get("outcomes") or {}
    if outcomes:
        bits.append('<div class="meta">guests: ' + ", ".join(f"{e(str(k))} <b>{e(str(v))}</b>"
                                                            for k, v in outcomes.items()) + "</div>")
    if info.get("replay"):
        bits.append(f'<div class="meta">replay: <code>{e(info["replay"])}</code></div>')
    for note in info.get("notes") or []:
        bits.append(f'<div class="meta">{e(note)}</div>')
    return "\n".join(bits)


def render_html(model: Model) -> str:
    """The run's timeline as one HTML document (scripts, styles and data inline)."""
    failed = [v.name for v in model.verdicts if not v.held]
    verdict_line = (f"{len(failed)} of {len(model.verdicts)} invariants violated: click one to see the calls it names"
                    if failed else f"all {len(model.verdicts)} invariants held" if model.verdicts
                    else "none: no checker judged this run")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(model.title)} · pefsim timeline</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>{html.escape(model.title)}</h1>
{_meta(model)}
<div class="meta">verdicts: {html.escape(verdict_line)}</div>
<div id="verdicts"></div>
</header>
<div id="toolbar">
<button id="zout" title="zoom out (-)">−</button><button id="zin" title="zoom in (+)">+</button>
<button id="fit" title="the whole run (0)">fit</button>
<button id="left" title="pan left (←)">◀</button><button id="right" title="pan right (→)">▶</button>
{'<button id="tofault" title="zoom to the first fault window">fault</button>' if model.faults else ''}
<label><input type="checkbox" id="allarrows"> arrows for every call</label>
<span><span class="sw" style="background:var(--ok)"></span>success<span class="sw" style="background:var(--error)"></span>documented error<span class="sw" style="background:var(--transport)"></span>transport error</span>
<span id="count"></span>
<span id="view"></span>
</div>
<pre id="errors"></pre>
<div id="chart"><svg id="svg" xmlns="http://www.w3.org/2000/svg" width="1200" height="200"></svg></div>
<div id="tip"></div>
<div id="details"></div>
<script type="application/json" id="data">{_json_for_script(page_data(model))}</script>
<script>{SCRIPT}</script>
</body>
</html>
"""
