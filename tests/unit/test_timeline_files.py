"""Where timelines are written and when: `pefsim timeline` on a chaos run, a simulator failure and a
campaign (and its one-line errors, exit 3), a chaos run's timeline after it failed (every run with
--timeline all), the campaign's index, a timeline beside each failing simulated seed. The chaos
runs here are simulated runs stored as the chaos store stores a run (the same record and
history lines): no service process is started."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pefsim.chaos.generator import ChaosConfig
from pefsim.chaos.store import Store
from pefsim.ops.cli import main
from pefsim.sim.campaign import SimConfig, run_campaign
from pefsim.timeline import auto
from tests.unit.test_timeline import history_calls, sim_run


@pytest.fixture
def campaign(tmp_path):
    """A chaos campaign directory with two runs: a kill-hv one whose invariants held, and a run
    under a mutant that broke memory-intact."""
    store = Store(tmp_path / "results", "kill-hv", "abort", 1)
    runs = {}
    for run, out in ((1, sim_run()), (2, sim_run("none", mutant="uv-frees-at-abort"))):
        runs[run] = store.write_run(run, out.record, out.violations, out.history)
    store.write_summary({"runs": 2, "faults_injected": 1, "violations": [v.as_json() for v in sim_run(
        "none", mutant="uv-frees-at-abort").violations], "recovery_s": {"p50": 0.1, "p99": 0.1, "max": 0.1}})
    return store.root, runs


def test_a_failing_chaos_run_gets_a_timeline_and_every_run_with_all(campaign):
    root, runs = campaign
    failed, every, none = (ChaosConfig(fault="kill-hv", timeline=m) for m in ("failed", "all", "none"))
    assert auto.chaos_run(failed, runs[1], failed=False) is None
    drawn = auto.chaos_run(failed, runs[2], failed=True)
    assert drawn == runs[2] / "timeline.html" and drawn.is_file()
    assert auto.chaos_run(every, runs[1], failed=False) == runs[1] / "timeline.html"
    assert auto.chaos_run(none, runs[2], failed=True) is None
    assert auto.chaos_campaign(none, root) is None
    index = auto.chaos_campaign(every, root)
    page = index.read_text()
    assert page.count("<tr class=") == 2 and page.count("timeline.html'>timeline</a>") == 2
    assert "memory-intact" in page and "1 of 2 runs with a violation" in page


def test_a_timeline_that_cannot_be_drawn_costs_a_log_line_not_the_campaign(tmp_path, caplog):
    run_dir = tmp_path / "run-0001"
    run_dir.mkdir()
    (run_dir / "record.json").write_text("{not json")
    assert auto.chaos_run(None, run_dir, failed=True) is None
    assert "timeline of" in caplog.text


def test_pefsim_timeline_on_a_run_a_campaign_and_a_results_directory(campaign, capsys):
    root, runs = campaign
    assert main(["timeline", str(runs[1])]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(runs[1] / "timeline.html")) and f"({history_calls(sim_run().history)} calls" in line
    out = runs[1] / "trace.json"
    assert main(["timeline", str(runs[1]), "--format", "trace", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["traceEvents"]
    assert main(["timeline", str(root.parent)]) == 0  # the results directory: its latest campaign
    assert "2 timelines written; index: " in capsys.readouterr().out
    assert (root / "index.html").is_file() and (runs[2] / "timeline.html").is_file()


def test_pefsim_timeline_errors_are_one_line_and_exit_3(tmp_path, capsys):
    cases = [tmp_path / "missing", tmp_path, tmp_path / "not-json.json"]
    (tmp_path / "not-json.json").write_text("hello")
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    cases.append(tmp_path / "other.json")
    for path in cases:
        assert main(["timeline", str(path)]) == 3, path
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("pefsim timeline: ") and "Traceback" not in err, err


def test_every_failing_simulated_seed_gets_a_timeline_beside_its_record(tmp_path, capsys):
    summary = run_campaign(SimConfig(runs=4, seed=1, mutants=("uv-frees-at-abort",), results=tmp_path))
    kept = sorted(Path(v["history"]) for v in summary["violations"])
    assert kept
    for path in kept:
        page = path.with_name(path.stem + ".timeline.html")
        assert page.is_file()
        data = json.loads(re.search(r'id="data">(.*?)</script>', page.read_text(), re.S).group(1))
        assert len(data["calls"]["rows"]) == history_calls(json.loads(path.read_text())["history"])
    assert main(["timeline", str(tmp_path)]) == 0  # a directory of simulator failures: an index of them
    index = (tmp_path / "index.html").read_text()
    assert index.count("<tr class='failed'>") == len(set(kept)) and "replay" not in capsys.readouterr().err
