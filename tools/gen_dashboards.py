#!/usr/bin/env python3
"""Generate the Grafana dashboards (deploy/grafana/dashboards/*.json) from code with
grafana-foundation-sdk (pinned in requirements-dev.txt; Grafana target 11.6).

    python tools/gen_dashboards.py          # write them
    python tools/gen_dashboards.py --check  # exit 1 if the committed JSON is stale

Every panel's queries are listed in PANELS below, so the tests can lint them, parse them and run
each one against a real Prometheus scraping a real run.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import GraphDrawStyle
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "deploy" / "grafana" / "dashboards"
DATASOURCE_UID = "pefsim-prometheus"
DS = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
W = 12  # half of the 24-column grid


def q(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS)


def ts(title: str, unit: str, *queries: tuple[str, str], desc: str = "", points: bool = False) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(DS).description(desc)
    if points:
        panel = panel.draw_style(GraphDrawStyle.POINTS).point_size(6)
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(q(expr, legend, chr(ord("A") + i)))
    return panel


def st(title: str, unit: str, expr: str, legend: str = "", desc: str = "") -> stat.Panel:
    return stat.Panel().title(title).unit(unit).datasource(DS).description(desc).with_target(q(expr, legend, "A"))


def layout(board: dashboard.Dashboard, rows: list[list], height: int = 8) -> dashboard.Dashboard:
    """Place panels row by row on the 24-column grid (each row's panels share its width)."""
    y, pid = 0, 1
    for row in rows:
        width = 24 // len(row)
        for i, panel in enumerate(row):
            board = board.with_panel(panel.id(pid).grid_pos(GridPos(h=height, w=width, x=i * width, y=y)))
            pid += 1
        y += height
    return board


def base(uid: str, title: str, desc: str) -> dashboard.Dashboard:
    return (dashboard.Dashboard(title).uid(uid).description(desc).tags(["pefsim"]).refresh("10s")
            .time("now-30m", "now").timezone("browser").editable())


def overview() -> dashboard.Dashboard:
    d = base("pefsim-overview", "pefsim: overview",
             "SVM life cycle: states, abort and terminate latency, page throughput, secure memory.")
    return layout(d, [
        [st("SVMs in the UV", "none", "sum(pefsim_uv_svms)"),
         st("VMs in the HV", "none", "sum(pefsim_hv_vms)"),
         st("Secure memory in use", "percentunit",
            'sum(pefsim_uv_secure_pages{kind="in_use"}) / sum(pefsim_uv_secure_pages{kind="total"})'),
         st("Oldest abort waiting for the HV", "s", "max(pefsim_uv_abort_pending_seconds)")],
        [ts("SVMs by state (UV)", "none", ("sum by (state) (pefsim_uv_svms)", "{{state}}")),
         ts("VMs by state (HV)", "none", ("sum by (state) (pefsim_hv_vms)", "{{state}}"))],
        [ts("Abort latency, UV -> guest resumed (end to end)", "s",
            ("pefsim:guest_abort_e2e_seconds:p50_rate5m", "p50"),
            ("pefsim:guest_abort_e2e_seconds:p99_rate5m", "p99"),
            desc="From the UV's H_SVM_INIT_ABORT to the guest's resume after UV_ESM."),
         ts("Abort latency, by side", "s",
            ("pefsim:uv_abort_duration_seconds:p99_rate5m", "UV p99 (call to answer)"),
            ("pefsim:hv_abort_duration_seconds:p99_rate5m", "HV p99 (page-out, terminate, resume)"),
            ("pefsim:hv_abort_phase_duration_seconds:p99_rate5m", "HV p99, {{phase}}"))],
        [ts("Terminate latency (UV_SVM_TERMINATE)", "s",
            ("pefsim:hv_terminate_duration_seconds:p50_rate5m", "HV p50 (issued to answered)"),
            ("pefsim:hv_terminate_duration_seconds:p99_rate5m", "HV p99"),
            ("pefsim:uv_terminate_duration_seconds:p99_rate5m", "UV p99 (free; scrubbed in the background)")),
         ts("Page throughput", "Bps",
            ("sum by (direction) (rate(pefsim_uv_page_bytes_total[$__rate_interval]))", "UV {{direction}}"),
            ("sum by (direction) (rate(pefsim_hv_page_bytes_total[$__rate_interval]))", "HV {{direction}}"))],
        [ts("Secure memory (64 KiB pages)", "none",
            ("sum by (kind) (pefsim_uv_secure_pages)", "{{kind}}")),
         ts("ESM outcomes and validation failures", "none",
            ("sum by (outcome) (increase(pefsim_uv_esm_duration_seconds_count[$__rate_interval]))", "ESM {{outcome}}"),
            ("sum by (reason) (increase(pefsim_uv_esm_failures_total[$__rate_interval]))", "failed: {{reason}}"))],
    ])


def calls() -> dashboard.Dashboard:
    d = base("pefsim-calls", "pefsim: calls", "Every ucall, hcall and VMM call: rate, results, latency.")
    ok = 'result!~"H_SUCCESS|U_SUCCESS|OK"'
    return layout(d, [
        [ts("Calls per second, by call", "reqps",
            ("sum by (job, call) (rate(pefsim_calls_total[$__rate_interval]))", "{{job}} {{call}}"))],
        [ts("Results other than success, per second", "reqps",
            (f"sum by (job, call, result) (rate(pefsim_calls_total{{{ok}}}[$__rate_interval]))",
             "{{job}} {{call}} {{result}}"),
            desc="PEF return codes and errnos other than success: expected ones (H_PARAMETER after an "
                 "abort) and bad inputs alike.")],
        [ts("Latency p99, by call", "s",
            ("histogram_quantile(0.99, sum by (le, job, call) (rate(pefsim_call_duration_seconds_bucket[$__rate_interval])))"
             " >= 0", "{{job}} {{call}}"), desc="Calls with traffic in the window (idle ones have no quantile)."),
         ts("Latency p50, by call", "s",
            ("histogram_quantile(0.5, sum by (le, job, call) (rate(pefsim_call_duration_seconds_bucket[$__rate_interval])))"
             " >= 0", "{{job}} {{call}}"), desc="Calls with traffic in the window (idle ones have no quantile).")],
        [ts("Pages moved per second", "none",
            ("sum by (job, direction) (rate(pefsim_uv_pages_total[$__rate_interval]))", "UV {{direction}}"),
            ("sum by (job, direction) (rate(pefsim_hv_pages_total[$__rate_interval]))", "HV {{direction}}")),
         ts("Resident memory", "bytes", ('process_resident_memory_bytes{job=~"uv|hv"}', "{{job}}"))],
    ])


def chaos() -> dashboard.Dashboard:
    d = base("pefsim-chaos", "pefsim: chaos", "Faults injected by pefsim chaos, and what the stack did about them.")
    d = d.annotation(dashboard.AnnotationQuery().name("faults").datasource(DS).enable(True)
                     .icon_color("red").expr("pefsim_chaos_fault_active > 0"))
    return layout(d, [
        [st("Faults injected", "none", "sum(pefsim_chaos_faults_total)"),
         st("Invariant violations", "none", "sum(pefsim_chaos_violations_total)"),
         st("Runs", "none", "sum(pefsim_chaos_runs_total)"),
         st("HV restarts recovered", "none", "sum(pefsim_hv_vms_recovered_total)")],
        [ts("Fault windows", "none", ("sum by (kind) (pefsim_chaos_fault_active)", "{{kind}}"),
            desc="1 while a fault is in effect (also drawn as annotations)."),
         ts("Faults injected, by kind", "none", ("sum by (kind) (pefsim_chaos_faults_total)", "{{kind}}"))],
        [ts("Recovery after the heal", "s",
            ("histogram_quantile(0.5, sum by (le) (rate(pefsim_chaos_recovery_seconds_bucket[$__rate_interval])))", "p50"),
            ("histogram_quantile(0.99, sum by (le) (rate(pefsim_chaos_recovery_seconds_bucket[$__rate_interval])))", "p99")),
         ts("Aborts waiting, hcalls retried", "none",
            ("max(pefsim_uv_abort_pending_seconds)", "oldest abort waiting (s)"),
            ("max by (call) (pefsim_uv_hcall_unanswered_seconds)", "{{call}} unanswered (s)"),
            ("sum by (call) (pefsim_uv_hcall_retries_total)", "{{call}} retries"),
            ("sum(pefsim_hv_aborts_resumed_total)", "aborts finished after an HV restart"))],
        [ts("Violations, by invariant", "none", ("sum by (invariant) (pefsim_chaos_violations_total)", "{{invariant}}")),
         ts("UV resets and failed VMs", "none",
            ("sum(pefsim_hv_uv_resets_total)", "UV resets"),
            ("sum by (reason) (pefsim_hv_vms_failed_total)", "failed: {{reason}}"))],
    ])


DASHBOARDS = {"overview": overview, "calls": calls, "chaos": chaos}


def render() -> dict[str, str]:
    out = {}
    for name, make in DASHBOARDS.items():
        built = make().build()
        out[f"{name}.json"] = json.dumps(json.loads(JSONEncoder(sort_keys=True).encode(built)), indent=2,
                                         sort_keys=True) + "\n"
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    files = render()
    if a.check:
        stale = [n for n, text in files.items() if not (OUT / n).exists() or (OUT / n).read_text() != text]
        if stale:
            print(f"stale dashboards {stale}; run python tools/gen_dashboards.py", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(files)} dashboards to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
