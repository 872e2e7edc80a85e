"""Short chaos runs of every fault kind, and every checker catching a deliberately broken build.

The long runs (200 x kill-hv mid-abort on 64 MiB guests) are in the README; these keep each
fault kind and each checker honest in CI.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pefsim.chaos.backend import LocalBackend
from pefsim.chaos.checker import INVARIANTS
from pefsim.chaos.generator import FAULTS, ChaosConfig
from pefsim.chaos.runner import run_chaos
from pefsim.faults import MUTANTS
from pefsim.ops.stack import ROOT

MEM = 4 << 20  # 64 pages (faults land inside the abort and ESM windows through breakpoints)

CASES = [(fault, during) for fault, durings in FAULTS.items() for during in durings]


def chaos(tmp_path, fault: str, during: str, runs: int = 1, seed: int = 1, mutants=(), **kw) -> dict:
    cfg = ChaosConfig(fault=fault, during=during, runs=runs, seed=seed, mem_bytes=MEM, pause_s=1.0,
                      fault_s=1.0, results=tmp_path / "results", mutants=tuple(mutants), **kw)
    backend = LocalBackend(tmp_path / "stack", proxies=fault.startswith("net-"), mutants=tuple(mutants),
                           abort_return="guest", pool_pages=1024)
    return run_chaos(cfg, backend, log=lambda s: None)


@pytest.mark.parametrize("fault, during", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_fault_kind_has_no_violations(tmp_path, fault, during):
    """Each fault kind, at its moment, leaves every invariant holding; on the local backend every
    run's fault lands in its window (a failpoint or a breakpoint at a seeded page)."""
    summary = chaos(tmp_path, fault, during, runs=2, seed=11)
    assert summary["violations"] == [], json.dumps(summary["violations"], indent=1)
    assert summary["faults_injected"] == summary["runs"], summary


# the invariant each mutant breaks, and the smallest scenario that shows it
BITES = {
    "uv-abort-pageout-no-data": ("memory-intact", {}),
    "uv-pageout-plaintext": ("no-plaintext-to-hv", {}),
    "uv-terminate-keeps-pages": ("uv-forgets-terminated", {}),
    "hv-double-resume": ("aborted-resumed-once", {}),
    "hv-abort-hangs": ("final-state-bound", {"final_bound_s": 4.0}),
    "uv-terminate-bad-rc": ("legal-return-codes", {}),
    "uv-frees-at-abort": ("memory-intact", {}),
    "uv-frees-on-page-out": ("memory-intact", {}),
}


# mutants whose bug needs an interleaving the process harness does not reach: the simulator
# (tests/sim/test_sim.py) catches them
SIM_ONLY = {"hv-init-done-unguarded", "uv-hcalls-one-at-a-time", "hv-create-vm-ignores-request-id"}
# invariants only the simulator's records carry what to judge (its late guest and pins; its view of
# the HV after teardown)
SIM_ONLY_INVARIANTS = {"held-svm-bounded", "no-orphan-vms"}


def test_every_mutant_and_invariant_is_paired():
    assert set(BITES) | SIM_ONLY == set(MUTANTS) and not set(BITES) & SIM_ONLY
    assert {inv for inv, _ in BITES.values()} | SIM_ONLY_INVARIANTS == set(INVARIANTS)


@pytest.mark.parametrize("mutant", sorted(BITES))
def test_checker_catches_broken_build(tmp_path, mutant):
    """A build with the mutant's bug makes its invariant's checker report a violation."""
    invariant, kw = BITES[mutant]
    summary = chaos(tmp_path, "kill-hv", "abort", mutants=(mutant,), **kw)
    assert invariant in {v["invariant"] for v in summary["violations"]}, summary


def test_cli_json(tmp_path):
    """`pefsim chaos --json` prints the documented object and exits 0 without violations."""
    out = subprocess.run([sys.executable, "-m", "pefsim", "chaos", "--fault", "kill-hv", "--during",
                          "abort", "--runs", "2", "--seed", "1", "--mem-mib", "1", "--json",
                          "--results", str(tmp_path / "r"), "--run-dir", str(tmp_path / "s")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(out.stdout)  # stdout is the one JSON object; progress went to stderr
    assert set(doc) == {"runs", "faults_injected", "violations", "recovery_s", "guest_policy", "results", "config"}
    assert doc["config"]["fault"] == "kill-hv" and doc["config"]["runs"] == 2
    assert "run 2/2" in out.stderr and "left" in out.stderr
    assert doc["guest_policy"] == "os-term"  # the guests' default after a failed UV_ESM, as Linux
    assert doc["runs"] == 2 and doc["faults_injected"] == 2 and doc["violations"] == []
    assert set(doc["recovery_s"]) == {"p50", "p99", "max"}
    assert 0 < doc["recovery_s"]["p50"] <= doc["recovery_s"]["p99"] <= doc["recovery_s"]["max"]
    verdicts = json.loads((tmp_path / "r" / "latest" / "run-0002" / "verdicts.json").read_text())
    assert set(verdicts) == set(INVARIANTS) and all(v["held"] and not v["violations"] for v in verdicts.values())


def test_one_run_replays_alone_with_its_plan(tmp_path):
    """--only-run N runs run N of the campaign by itself, with the fault plan it had there (every
    earlier run's draw is taken and skipped): a failing run's replay."""
    def plan_of(results, run):
        return json.loads((results / "latest" / f"run-{run:04d}" / "record.json").read_text())["plan"]
    whole = chaos(tmp_path / "whole", "kill-hv", "abort", runs=3, seed=5)
    assert whole["runs"] == 3
    alone = chaos(tmp_path / "alone", "kill-hv", "abort", runs=3, seed=5, only_run=3)
    assert alone["runs"] == 1 and alone["violations"] == []
    assert plan_of(tmp_path / "alone" / "results", 3) == plan_of(tmp_path / "whole" / "results", 3)


def test_cli_refuses_a_fault_at_a_moment_it_does_not_have():
    out = subprocess.run([sys.executable, "-m", "pefsim", "chaos", "--fault", "kill-guest",
                          "--during", "abort"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "--during esm" in out.stderr
