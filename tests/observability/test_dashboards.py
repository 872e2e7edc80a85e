"""Dashboards and rules, offline: generated code up to date, schema-valid, linted, every PromQL
expression parsed, every metric they name exported by a service."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import promql_parser
import pytest

from pefsim.ops.stack import ROOT

DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
RULES = sorted((ROOT / "deploy/prometheus/rules").glob("*.yml"))
SCHEMA = json.loads((ROOT / "tests/data/dashboard.jsonschema.json").read_text())
DATASOURCE_UID = "pefsim-prometheus"
MACROS = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "30m"}


def substitute(expr: str) -> str:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every target of every panel."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((path.stem, panel["title"], target["expr"]))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    import yaml

    out = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append((rule.get("record") or rule.get("alert"), rule["expr"]))
    return out


def exported_metric_names() -> set[str]:
    """Every sample name the services' registries expose (counters with _total, histograms with
    _bucket/_sum/_count), the recording rules' names, and Prometheus's own `up`."""
    import tempfile

    from pefsim.chaos.metrics import ChaosMetrics
    from services.guest.core.metrics import GuestMetrics
    from services.hypervisor.core.metrics import HvMetrics
    from services.hypervisor.core.state import HvState
    from services.ultravisor.core.metrics import UvMetrics
    from services.ultravisor.core.state import UvState

    names = {"up"}
    with tempfile.TemporaryDirectory() as tmp:
        for m in (UvMetrics(UvState(4)), HvMetrics(HvState(Path(tmp))), GuestMetrics(), ChaosMetrics()):
            for family in m.registry.collect():
                names |= {s.name for s in family.samples}
                if family.type in ("gauge", "untyped"):
                    names.add(family.name)
                names |= {family.name + suffix for suffix in ("_total", "_bucket", "_sum", "_count")
                          if family.type in ("counter", "histogram")}
    names |= {name for name, _ in rule_exprs() if ":" in name}
    return names


def test_dashboards_are_up_to_date():
    out = subprocess.run([sys.executable, "tools/gen_dashboards.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_schema_and_lint(path):
    """Valid against Grafana's dashboard schema; uid and title; unique panel ids; gridPos inside
    24 columns; every panel has targets with unique, non-empty refIds and the provisioned
    datasource."""
    board = json.loads(path.read_text())
    jsonschema.validate(board, SCHEMA)
    assert board.get("uid") and board.get("title")
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        targets = panel.get("targets", [])
        assert targets, f"{panel['title']} has no query"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), panel["title"]
        assert panel["datasource"]["uid"] == DATASOURCE_UID
        assert all(t["datasource"]["uid"] == DATASOURCE_UID for t in targets)
    for ann in board.get("annotations", {}).get("list", []):
        assert ann["datasource"]["uid"] == DATASOURCE_UID


def test_provisioned_datasource_uid():
    text = (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    assert f"uid: {DATASOURCE_UID}" in text


@pytest.mark.parametrize("where, title, expr", panel_queries() + [("rules", n, e) for n, e in rule_exprs()])
def test_promql_parses(where, title, expr):
    promql_parser.parse(substitute(expr))


NAME = re.compile(r"\b((?:pefsim[_:]|process_)[a-zA-Z0-9_:]+|up)\b(?!\s*\()")


def test_every_metric_named_is_exported():
    exported = exported_metric_names()
    named = {(where, m) for where, _, expr in panel_queries() for m in NAME.findall(expr)}
    named |= {("rules", m) for _, expr in rule_exprs() for m in NAME.findall(expr)}
    missing = sorted(f"{where}: {m}" for where, m in named if m not in exported)
    assert not missing, "\n".join(missing)


def test_latency_buckets_resolve_small_and_large_guests():
    """Abort and terminate histograms resolve a 16-page guest (milliseconds) and a 64 Ki-page
    guest (minutes) alike: buckets from below 1 ms to above 10 minutes, no more than 2x apart."""
    from pefsim.metrics import LATENCY_BUCKETS

    assert LATENCY_BUCKETS[0] <= 0.001 and LATENCY_BUCKETS[-1] >= 600
    assert all(b / a <= 2.0 + 1e-9 for a, b in zip(LATENCY_BUCKETS, LATENCY_BUCKETS[1:]))


RECORD = re.compile(r"pefsim:[a-z0-9_]+:(?:[a-z0-9]+_)*?(?P<op>[a-z]+)(?P<range>[0-9]+[smhd])")


def recording_rules() -> list[tuple[str, str]]:
    return [(name, expr) for name, expr in rule_exprs() if ":" in name]


def test_recording_rules_name_their_window():
    """Every recording rule is level:metric:operations with its range in the name, the one its
    expression uses (pefsim:uv_abort_duration_seconds:p99_rate5m is over rate(...[5m]))."""
    assert recording_rules()
    for name, expr in recording_rules():
        m = RECORD.fullmatch(name)
        assert m, f"{name}: not pefsim:<metric>:<operations>_<op><range> (e.g. ...:p99_rate5m)"
        used = set(re.findall(rf"\b{m['op']}\s*\([^\[]*\[([0-9]+[smhd])\]", expr))
        assert used == {m["range"]}, f"{name}: named {m['op']}{m['range']}, its expression uses {used or 'none'}"
