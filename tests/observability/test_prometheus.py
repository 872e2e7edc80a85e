"""Against a real Prometheus scraping a real run (the demo, and a short chaos run): every
dashboard panel query returns data, the latency quantiles agree with what the demo measured, and
`promtool check metrics` is happy with every service's /metrics.

Needs the `prometheus` and `promtool` binaries (Debian: apt-get install prometheus; CI installs
them); without them these tests skip and say so.
"""
from __future__ import annotations

import asyncio
import bisect
import math
import shutil
import subprocess
import time
import urllib.request

import pytest

from pefsim.chaos.backend import LocalBackend
from pefsim.chaos.generator import ChaosConfig
from pefsim.chaos.runner import run_chaos
from pefsim.ops.demo import run_demo
from pefsim.metrics import LATENCY_BUCKETS
from pefsim.ops.observability import INSTALL_HINT, Prometheus, prometheus_binary, write_config
from pefsim.ops.stack import LocalStack, StackConfig, free_port
from tests.observability.test_dashboards import panel_queries, rule_exprs, substitute

needs_prometheus = pytest.mark.skipif(prometheus_binary() is None or shutil.which("promtool") is None,
                                     reason=INSTALL_HINT)


def wait_for(prom: Prometheus, expr: str, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = prom.query(expr)
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no data for {expr} within {timeout} s")


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    root = tmp_path_factory.mktemp("observed")
    stack = LocalStack(StackConfig(run_dir=root / "stack")).start()
    chaos_stack = root / "chaos-stack"
    config = write_config(root / "prometheus.yml", [stack.target_dir, chaos_stack / "targets"], interval="1s")
    prom = Prometheus(config, root / "prometheus-data", free_port(), root / "prometheus.log")
    try:
        prom.wait_ready()
        for job in ("uv", "hv"):  # every series seen at zero before anything happens
            wait_for(prom, f'count_over_time(up{{job="{job}"}}[1m]) >= 1')

        async def guests_scraped():
            await asyncio.to_thread(wait_for, prom, 'count(count_over_time(up{job="guest"}[1m]) >= 1) >= 4')

        summary = asyncio.run(run_demo(stack, 1 << 20, before_boot=guests_scraped))
        chaos = run_chaos(ChaosConfig(fault="kill-hv", during="abort", runs=3, mem_bytes=1 << 20,
                                      results=root / "chaos-results", metrics_listen="127.0.0.1:0"),
                          LocalBackend(chaos_stack, proxies=False, mutants=(), abort_return="guest",
                                       pool_pages=1024), log=lambda s: None,
                          before_runs=lambda: wait_for(prom, 'count_over_time(up{job="chaos"}[1m]) >= 1'))
        for job in ("uv", "hv", "guest", "chaos"):
            wait_for(prom, f'count_over_time(up{{job="{job}"}}[1m]) >= 2')
        # the last events of the demo are scraped, and the rules evaluated on them
        wait_for(prom, 'pefsim_hv_terminate_duration_seconds_count{trigger="destroy"} >= 2')
        wait_for(prom, "pefsim:guest_abort_e2e_seconds:p50_rate5m")
        yield prom, stack, summary, chaos
    finally:
        prom.stop()
        stack.stop()


@needs_prometheus
def test_demo_and_chaos_ran(observed):
    _, _, summary, chaos = observed
    assert all(g["memory_intact"] for g in summary["guests"])
    assert chaos["violations"] == [] and chaos["faults_injected"] == 3


@needs_prometheus
@pytest.mark.parametrize("board, title, expr", panel_queries())
def test_every_panel_query_returns_data(observed, board, title, expr):
    prom = observed[0]
    result = prom.query(substitute(expr))
    assert result, f"{board} / {title}: no data for {expr}"
    values = [float(r["value"][1]) for r in result]
    assert not any(math.isnan(v) for v in values), f"{board} / {title}: NaN in {result}"


@needs_prometheus
def test_recording_rules_have_values(observed):
    prom = observed[0]
    for name, _ in rule_exprs():
        if name.startswith("pefsim:") and "uv_abort" not in name:
            assert prom.query(name), name


@needs_prometheus
def test_streamed_calls_are_in_the_call_metrics(observed):
    """Server-streaming and bidi calls go through the same dispatcher path as unary ones, so
    their per-call series move too (they stayed at 0 before)."""
    prom = observed[0]
    for call in ("VmSession", "UvPageInStream", "UvPageOutStream"):
        got = prom.query(f'sum(pefsim_calls_total{{call="{call}"}})')
        assert got and float(got[0]["value"][1]) > 0, call


def bucket(v: float) -> int:
    return bisect.bisect_left(LATENCY_BUCKETS, v)


@needs_prometheus
def test_quantiles_agree_with_what_the_demo_measured(observed):
    """The abort latency the aborted guest measured end to end, and the terminate latency the
    HV reported for the destroyed guest, fall in the buckets Prometheus's quantiles point at."""
    prom, _, summary, _ = observed
    aborted = next(g for g in summary["guests"] if g["outcome"] == "aborted")
    q = float(prom.query("histogram_quantile(0.5, sum by (le) (pefsim_guest_abort_e2e_seconds_bucket))")[0]["value"][1])
    assert bucket(q) == bucket(aborted["abort_latency_s"]), (q, aborted["abort_latency_s"])
    terminated = next(g for g in summary["guests"] if g["outcome"] == "terminated")
    # two destroys terminated an SVM: this guest's and, at the end, the secure one's
    sel = 'sum by (le) (pefsim_hv_terminate_duration_seconds_bucket{trigger="destroy"})'
    qs = {bucket(float(prom.query(f"histogram_quantile({p}, {sel})")[0]["value"][1])) for p in (0.5, 1.0)}
    assert bucket(terminated["terminate_latency_s"]) in qs, (qs, terminated["terminate_latency_s"])


@needs_prometheus
def test_promtool_check_metrics(observed):
    """`promtool check metrics` finds nothing in any service's /metrics."""
    _, stack, _, _ = observed
    for name, addr in stack.metrics_targets().items():
        text = urllib.request.urlopen(f"http://{addr}/metrics").read()
        out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), \
            f"{name}: {out.stdout.decode()} {out.stderr.decode()}"


@needs_prometheus
def test_promtool_rules():
    from pefsim.ops.stack import ROOT

    rules = sorted(str(p) for p in (ROOT / "deploy/prometheus/rules").glob("*.yml"))
    check = subprocess.run(["promtool", "check", "rules", *rules], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(["promtool", "test", "rules", "tests/alerts_test.yml"], capture_output=True,
                          text=True, cwd=ROOT / "deploy/prometheus")
    assert test.returncode == 0, test.stdout + test.stderr


@needs_prometheus
def test_pefsim_up_with_prometheus(tmp_path):
    """`pefsim up --prometheus` starts a Prometheus scraping the stack and prints its URL."""
    import json
    import os
    import re
    import signal
    import sys

    from pefsim.ops.stack import ROOT

    up = subprocess.Popen([sys.executable, "-m", "pefsim", "up", "--guests", "1", "--mem-mib", "1",
                           "--prometheus", "--run-dir", str(tmp_path / "run")], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        url = next(m.group(1) for m in (re.search(r"prometheus\s+(http://\S+)", line) for line in lines) if m)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{url}/api/v1/query?query=up") as r:
                jobs = {s["metric"]["job"] for s in json.loads(r.read())["data"]["result"]
                        if s["value"][1] == "1"}
            if {"uv", "hv", "guest"} <= jobs:
                break
            time.sleep(0.5)
        assert {"uv", "hv", "guest"} <= jobs, jobs
    finally:
        up.send_signal(signal.SIGINT)
        up.communicate(timeout=30)
    assert up.returncode == 0
    assert os.path.exists(tmp_path / "run" / "prometheus.yml")


def test_up_without_prometheus_says_how_to_get_it(tmp_path):
    import os
    import sys

    from pefsim.ops.stack import ROOT

    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    out = subprocess.run([sys.executable, "-m", "pefsim", "up", "--prometheus", "--run-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "apt-get install prometheus" in out.stderr


def declared_families() -> dict[str, str]:
    """Every metric family the services and the chaos harness declare: name -> type."""
    from pefsim.chaos.metrics import ChaosMetrics
    from services.guest.core.metrics import GuestMetrics
    from services.hypervisor.core.metrics import HvMetrics
    from services.hypervisor.core.state import HvState
    from services.ultravisor.core.metrics import UvMetrics
    from services.ultravisor.core.state import UvState
    import tempfile

    registries = [HvMetrics(HvState(tempfile.mkdtemp())).registry, UvMetrics(UvState(1, populate_pool=False)).registry,
                  GuestMetrics().registry, ChaosMetrics().registry]
    return {m.name: m.type for r in registries for m in r.collect() if m.name.startswith("pefsim_")}


# families no demo or chaos run moves, each set by a path another test drives: name -> that test
MOVED_ELSEWHERE = {
    "pefsim_calls_refused": "tests/security/test_hostile_tenants.py (the slowloris flood)",
    "pefsim_hv_vms_quarantined": "tests/security/test_hostile_disk.py (damaged VM files)",
    "pefsim_hv_pages_lost": "tests/integration/test_recovery.py (a page-out answer lost)",
    "pefsim_hv_uv_resets": "tests/inprocess/test_uv_reset.py",
    "pefsim_hv_vms_failed": "tests/inprocess/test_uv_reset.py, tests/integration/test_recovery.py",
    "pefsim_uv_hcall_retries": "tests/inprocess/test_abort_crash.py (the HV died under H_SVM_INIT_ABORT)",
    "pefsim_chaos_violations": "tests/chaos/test_chaos.py (each mutant's violations)",
    # a restarted HV counts these at start; the chaos run's restarted HV lives for less than a
    # scrape (and a file_sd reload) before the next run restarts it again
    "pefsim_hv_vms_recovered": "tests/inprocess/test_abort_crash.py (recovery after a crash)",
    "pefsim_hv_aborts_resumed": "tests/inprocess/test_abort_crash.py (recovery after a crash)",
}


@needs_prometheus
def test_every_declared_series_moves(observed):
    """Declared vs observed: every counter and histogram a service declares was incremented by
    the demo and the chaos run (summed over its labels, at any scrape), unless MOVED_ELSEWHERE
    names the test that drives its path; every gauge is exported. A family declared and never set
    (as pefsim_uv_abort_duration_seconds{outcome="hv-unreachable"} once was) fails here."""
    prom = observed[0]
    silent = []
    for name, kind in sorted(declared_families().items()):
        if kind == "gauge":
            series = f"{name}"
        elif kind == "info":  # pefsim_build_info{version, grpcio, protobuf} 1
            series = f"{name}_info"
        elif kind == "histogram":
            series = f"{name}_count"
        else:
            series = f"{name}_total"
        got = prom.query(f"max_over_time(sum({series})[30m:1s])")
        value = float(got[0]["value"][1]) if got else None
        if value is None or (kind not in ("gauge", "info") and value <= 0):
            if name not in MOVED_ELSEWHERE:
                silent.append(f"{name} ({kind}): {value}")
    assert not silent, "declared, never set by the demo or the chaos run:\n" + "\n".join(silent)
