"""A campaign's index page: every run with its fault, verdicts and recovery time, linking each
run's timeline. For a chaos campaign directory (``<results>/<stamp>-<fault>-<during>-seed<N>/``
with ``run-NNNN/`` and ``summary.json``) and for a directory of failing simulator seeds
(``seed-*.json``). Self-contained as the timelines are."""
from __future__ import annotations

import html
import json
from pathlib import Path

SIM_TIMELINE_SUFFIX = ".timeline.html"


def is_campaign(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("run-[0-9]*/record.json")) or (path / "summary.json").is_file())


def is_sim_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("seed-*.json"))


def chaos_rows(campaign: Path) -> list[dict]:
    rows = []
    for run_dir in sorted(campaign.glob("run-[0-9]*")):
        rec_path = run_dir / "record.json"
        if not rec_path.is_file():
            continue
        try:
            record = json.loads(rec_path.read_text())
        except ValueError:
            continue
        vpath = run_dir / "verdicts.json"
        verdicts = json.loads(vpath.read_text()) if vpath.is_file() else {}
        fault = record.get("fault") or {}
        plan = record.get("plan") or {}
        rows.append({"run": record.get("run"), "dir": run_dir.name,
                     "plan": plan.get("failpoint") or (f"delay {plan.get('delay_s')} s" if plan.get("delay_s") else ""),
                     "fault": fault.get("detail", ""), "injected": bool(fault.get("injected")),
                     "recovery_s": record.get("recovery_s"),
                     "outcomes": {g.get("name"): g.get("outcome") for g in (record.get("guests") or {}).values()},
                     "failed": {n: v.get("violations", []) for n, v in verdicts.items() if not v.get("held")},
                     "held": sum(1 for v in verdicts.values() if v.get("held")), "checked": len(verdicts),
                     "timeline": f"{run_dir.name}/timeline.html" if (run_dir / "timeline.html").is_file() else None})
    return rows


def sim_rows(directory: Path) -> list[dict]:
    from pefsim.chaos.checker import INVARIANTS

    rows = []
    seeds = [p for p in directory.glob("seed-*.json") if not p.name.endswith(".trace.json")]
    for path in sorted(seeds, key=lambda p: (len(p.stem), p.stem)):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        plan = data.get("plan") or {}
        failed: dict[str, list] = {}
        for v in data.get("violations", []):
            failed.setdefault(v["invariant"], []).append(v["detail"])
        fault = (data.get("record") or {}).get("fault") or {}
        html_path = path.with_name(path.stem + SIM_TIMELINE_SUFFIX)
        rows.append({"run": plan.get("seed"), "dir": path.name,
                     "plan": f"{plan.get('fault')} during {plan.get('during')}", "fault": fault.get("detail", ""),
                     "injected": bool(fault.get("injected")), "recovery_s": None,
                     "outcomes": {g.get("name"): g.get("outcome")
                                  for g in ((data.get("record") or {}).get("guests") or {}).values()},
                     "failed": failed, "held": len(INVARIANTS) - len(failed), "checked": len(INVARIANTS),
                     "timeline": html_path.name if html_path.is_file() else None, "replay": data.get("replay", "")})
    return rows


CSS = """
body { margin: 0; font: 13px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232b; background: #f6f7f9; }
header { padding: 12px 18px; background: #fff; border-bottom: 1px solid #dde1e6; }
h1 { font-size: 18px; margin: 0 0 4px; } .meta { color: #66707c; } .meta b { color: #1d232b; }
table { border-collapse: collapse; margin: 12px 18px; background: #fff; }
th, td { text-align: left; padding: 4px 9px; border-bottom: 1px solid #e4e7eb; vertical-align: top; }
th { background: #eef1f4; position: sticky; top: 0; }
tr.failed td:first-child { border-left: 4px solid #d23b35; } tr.ok td:first-child { border-left: 4px solid #3b9a5e; }
.bad { color: #a1140f; font-weight: 600; } .good { color: #1f6a36; } .num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 12px; } label { margin-left: 18px; }
"""

SCRIPT = """
document.getElementById("onlyfailed").onchange = function (ev) {
  document.querySelectorAll("tr.ok").forEach(function (tr) { tr.style.display = ev.target.checked ? "none" : ""; });
};
"""


def render_index(path: Path) -> str:
    """The index page of a chaos campaign directory or a directory of simulator failures."""
    path = Path(path)
    e = html.escape
    if is_campaign(path):
        rows, kind = chaos_rows(path), "chaos"
        summary_path = path / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        rec = summary.get("recovery_s") or {}
        head = (f"{summary.get('runs', len(rows))} runs, {summary.get('faults_injected', '?')} faults injected, "
                f"<b>{len(summary.get('violations', []))}</b> violations; recovery p50 <b>{rec.get('p50', '-')} s</b>, "
                f"p99 <b>{rec.get('p99', '-')} s</b>, max <b>{rec.get('max', '-')} s</b>") if summary else \
            f"{len(rows)} runs (no summary.json: the campaign did not finish)"
        title = f"chaos campaign {path.resolve().name}"
    else:
        rows, kind = sim_rows(path), "sim"
        head = f"{len(rows)} failing simulated runs"
        title = f"simulator failures in {path.resolve().name}"
    body = []
    for r in rows:
        failed = r["failed"]
        verdict = ("<span class='good'>all " + str(r["checked"]) + " held</span>") if not failed else \
            "<br>".join(f"<span class='bad'>✗ {e(n)}</span>: {e('; '.join(d[:2]))}{' …' if len(d) > 2 else ''}"
                        for n, d in failed.items())
        link = f"<a href='{e(r['timeline'])}'>timeline</a>" if r["timeline"] else "<span class='meta'>—</span>"
        rec = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.3f}"
        outcomes = ", ".join(f"{e(str(k))}: {e(str(v))}" for k, v in r["outcomes"].items())
        extra = f"<br><code>{e(r['replay'])}</code>" if r.get("replay") else ""
        body.append(f"<tr class='{'failed' if failed else 'ok'}'><td class='num'>{e(str(r['run']))}</td>"
                    f"<td>{link}</td><td>{e(r['plan'])}</td><td>{e(r['fault'] or '-')}"
                    f"{'' if r['injected'] else ' <span class=meta>(not injected)</span>'}</td>"
                    f"<td class='num'>{rec}</td><td>{verdict}{extra}</td><td>{outcomes}</td></tr>")
    n_failed = sum(1 for r in rows if r["failed"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)} · pefsim</title><style>{CSS}</style></head>
<body><header><h1>{e(title)}</h1>
<div class="meta">{head}</div>
<div class="meta">{e(str(path))} · {n_failed} of {len(rows)} runs with a violation · {sum(1 for r in rows if r['timeline'])} timelines</div>
</header>
<label><input type="checkbox" id="onlyfailed"> only runs with a violation</label>
<table data-kind="{kind}"><thead><tr><th>{'run' if kind == 'chaos' else 'seed'}</th><th></th><th>plan</th><th>fault</th>
<th>recovery s</th><th>verdicts</th><th>guests</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
<script>{SCRIPT}</script>
</body></html>
"""
