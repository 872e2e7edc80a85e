"""The deterministic simulator (pefsim/sim/): the real cores in one process on virtual time,
judged by the chaos checkers. A seed replays byte for byte; sampled and exhaustive campaigns hold
every invariant; every mutant, and the alternative argued on the list (the UV gives an aborting
SVM's pages up before UV_SVM_TERMINATE), is caught with a concrete counterexample."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pefsim import faults
from pefsim.abi import H
from pefsim.sim.campaign import SimConfig, every_plan, run_campaign
from pefsim.sim.scenario import Plan, plan_of, run_one


def test_a_seed_replays_to_the_same_history():
    a, b = run_one(plan_of(1, ("kill-hv",))), run_one(plan_of(1, ("kill-hv",)))
    assert a.plan.fault == "kill-hv" and a.digest == b.digest
    assert run_one(plan_of(2, ("kill-hv",))).digest != a.digest


def test_a_sampled_campaign_holds_every_invariant():
    summary = run_campaign(SimConfig(runs=120, seed=1000))
    assert summary["violations"] == [], json.dumps(summary["violations"][:3], indent=1)
    assert summary["faults_injected"] >= 60
    again = run_campaign(SimConfig(runs=120, seed=1000))
    assert again["history_sha256"] == summary["history_sha256"]


def test_worker_processes_give_the_same_summary():
    """--jobs splits the runs over forked workers: each run is independent of the ones before it
    in its process, so the history digest is the serial one."""
    serial = run_campaign(SimConfig(runs=12, seed=300))
    parallel = run_campaign(SimConfig(runs=12, seed=300, jobs=2))
    assert parallel["history_sha256"] == serial["history_sha256"]
    assert parallel["violations"] == serial["violations"] == []


def test_fifo_and_seeded_schedules_differ():
    """The seeded scheduler changes the order of ready work (so the histories), fifo does not."""
    plan = plan_of(3)
    assert run_one(plan, schedule="fifo").digest == run_one(plan, schedule="fifo").digest
    assert run_one(plan, schedule="fifo").digest != run_one(plan).digest


@pytest.mark.processes
def test_compare_chaos_prints_both_rates():
    out = subprocess.run([sys.executable, "-m", "pefsim", "sim", "--runs", "30", "--compare-chaos", "2", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["chaos"]["runs"] == 2 and summary["chaos"]["violations"] == 0
    assert summary["speedup"] > 1 and summary["runs_per_minute"] > summary["chaos"]["runs_per_minute"]


def test_two_thousand_seeds_across_the_fault_kinds():
    """CI's share of the campaign (the README records a larger one): zero violations."""
    summary = run_campaign(SimConfig(runs=2000, seed=20_000))
    assert summary["violations"] == [], json.dumps(summary["violations"][:3], indent=1)
    assert summary["faults_injected"] >= 1500


def test_every_single_fault_of_the_small_configuration():
    plans = every_plan()
    kinds = {(p.fault, p.during) for p in plans}
    assert {("kill-hv", "abort"), ("kill-hv", "esm"), ("lose", "abort"), ("partition", "esm"),
            ("reset-uv", "esm"), ("hang", "abort"), ("hang", "esm"), ("hv-gone", "abort"), ("hv-gone", "esm")} <= kinds
    assert len([p for p in plans if p.again]) == 9  # a second crash while recovering the abort
    summary = run_campaign(SimConfig(exhaustive=True))
    assert summary["runs"] == len(plans) >= 60
    assert summary["violations"] == [], json.dumps(summary["violations"][:3], indent=1)


# each mutant's invariant; every mutant is caught within this many seeds
WITHIN = 50
CAUGHT_BY = {
    "uv-abort-pageout-no-data": "memory-intact",
    "uv-pageout-plaintext": "no-plaintext-to-hv",
    "uv-terminate-keeps-pages": "uv-forgets-terminated",
    "hv-double-resume": "aborted-resumed-once",
    "hv-abort-hangs": "final-state-bound",
    "uv-terminate-bad-rc": "legal-return-codes",
    "uv-frees-at-abort": "memory-intact",
    "uv-frees-on-page-out": "memory-intact",
    "hv-init-done-unguarded": "legal-return-codes",
    "uv-hcalls-one-at-a-time": "held-svm-bounded",
    "hv-create-vm-ignores-request-id": "no-orphan-vms",
}
# the fault a mutant needs (default: any)
NEEDS = {"hv-init-done-unguarded": ("kill-guest",), "uv-hcalls-one-at-a-time": ("hang",),
         "hv-create-vm-ignores-request-id": ("lose",)}


def test_every_mutant_has_its_invariant():
    assert set(CAUGHT_BY) == set(faults.MUTANTS)


@pytest.mark.parametrize("mutant", sorted(CAUGHT_BY))
def test_the_simulator_catches_each_mutant(mutant):
    faults_ = NEEDS.get(mutant)
    summary = run_campaign(SimConfig(runs=WITHIN, seed=1, mutants=(mutant,), stop_at_first=True,
                                     **({"faults": faults_} if faults_ else {})))
    assert summary["violations"], f"{mutant}: no violation in {WITHIN} seeds"
    assert CAUGHT_BY[mutant] in {v["invariant"] for v in summary["violations"]}


def test_keeping_pages_until_terminate_is_what_survives_a_lost_page():
    """The seed's debate, run: a UV that frees each page of an aborting SVM once it handed it over
    loses the guest's memory when the HV dies between receiving a page and writing it; the design
    (pages kept until UV_SVM_TERMINATE) gives it back on the restarted HV's second ask."""
    plan = next(p for p in every_plan(("abort",)) if p.failpoint == "hv.abort.page_out:8@victim")
    assert run_one(plan).violations == []
    broken = run_one(plan, mutants=("uv-frees-on-page-out",)).violations
    assert [v.invariant for v in broken] == ["memory-intact"], broken


def test_an_hv_killed_between_a_temporary_and_its_rename_recovers_from_the_old_file():
    """The simulated disk keeps what a kill leaves: the crash lands after vm.json's temporary was
    written and fsync'd, before its rename. The dead core's unwinding removes the temporary (a
    killed process would not): that removal is undone, so the restarted HV finds the old vm.json
    beside a stale temporary, loads the old one and finishes the abort."""
    plan = next(p for p in every_plan(("abort",)) if p.failpoint == "hv.disk.before_rename:5@victim")
    outcome = run_one(plan)
    assert outcome.violations == []
    assert outcome.record["fault"]["injected"]
    assert [d for d in outcome.record["fault"]["disk_discarded"] if d.endswith("vm.json.tmp")] == \
        ["removed vm-2/vm.json.tmp"], outcome.record["fault"]


@pytest.mark.parametrize("call", ["H_SVM_INIT_ABORT", "H_SVM_INIT_START", "H_SVM_INIT_DONE"])
def test_an_hv_silent_for_one_svm_costs_that_svm_only(call):
    """Liveness: from the victim's ``call`` on, the HV answers nothing the UV asks for it, and never
    comes back for it. A guest booted after that gets to secure as fast as alone; the UV keeps the
    victim (its reservation, never more than its size, not growing over a minute) and asks for it
    one call at a time; the operator's DestroyVm at the end is what lets it go."""
    plan = next(p for p in every_plan() if p.fault == "hang" and p.cut_at[0] == call)
    outcome = run_one(plan)
    assert outcome.violations == []
    held = outcome.record["held"]
    assert outcome.record["guests"]["late"]["outcome"] == "secure" and held["late_boot_s"] < 1.0
    assert [s["held_by_uv"] for s in held["samples"]] == [True, True]
    pages = [s["pages"] for s in held["samples"]]
    assert pages[0] == pages[1] <= held["svm_pages"]
    assert max(s["in_flight"] for s in held["samples"]) <= 1
    assert held["samples"][-1]["unanswered"] in ("H_SVM_INIT_ABORT", "H_SVM_INIT_DONE")


def test_regression_a_lost_uv_esm_answer_of_a_good_guest():
    """Found by the simulator (lost answers on the guest's links): the UV took a good guest to
    secure, and the answer of its UV_ESM, the vCPU's return, was lost; the vCPU waited for a
    resume nobody owed it until its own timeout. The guest now asks the UV: its SVM is secure,
    so the return happened, and it resumes at kbase in secure mode."""
    plan = Plan(seed=7, fault="lose", during="esm", link="guest->uv", lose=("UV_ESM", 1))
    outcome = run_one(plan)
    assert outcome.violations == []
    assert outcome.record["guests"]["victim"]["outcome"] == "secure"


def test_regression_a_lost_create_vm_answer_makes_one_vm():
    """Found by the simulator: a CreateVm whose answer was lost was asked again and made a second
    VM; the first stayed in the HV (with its RAM) after teardown. The guest sends a request id,
    and the HV gives the same VM back to a repeat."""
    plan = Plan(seed=7, fault="lose", during="esm", link="guest->hv", lose=("CreateVm", 1))
    outcome = run_one(plan)
    assert outcome.violations == [] and outcome.record["hv_after"] == []


def test_an_abort_the_hv_never_started_goes_to_the_guest():
    """The link is cut as H_SVM_INIT_START goes: the HV never sees the ESM, and the UV's
    H_SVM_INIT_ABORT, once the link heals, finds a normal VM. As in the kernel, the HV's exit path
    takes that H_UNSUPPORTED to the guest (secure_guest 0), not to the UV: the guest sees it as
    UV_ESM's result (and os-terms), the UV forgets the SVM, every invariant holds."""
    plan = next(p for p in every_plan(("esm",)) if p.fault == "partition" and p.cut_at[0] == "H_SVM_INIT_START")
    outcome = run_one(plan)
    assert outcome.violations == []
    report = outcome.record["guests"]["victim"]["report"]
    assert (report["outcome"], report["esmRc"], report["resumedBy"]) == ("failed", H.H_UNSUPPORTED, "ROLE_HV")
    assert report["osTerm"] and report["resumes"] == 1


@pytest.mark.parametrize("point", ["hv.abort.page_out:1", "hv.abort.before_terminate:1", "hv.esm.page_in:1",
                                   "hv.esm.init_done:1"])
def test_while_no_hv_runs_the_uv_keeps_the_svm_and_serves_the_others(point):
    """The seed's question, whole: the HV dies there and no HV runs for a minute. The UV keeps the
    victim (its reservation, no more, not growing) and keeps asking; the secure bystander, which
    needs no HV for its own memory, reads it back intact through the UV; once an operator starts a
    new HV, the victim reaches its final state and every invariant holds."""
    plan = next(p for p in every_plan() if p.fault == "hv-gone" and p.failpoint == f"{point}@victim")
    outcome = run_one(plan)
    assert outcome.violations == []
    held = outcome.record["held"]
    assert held["bystander_intact"] and [s["pages"] for s in held["samples"]] == [16, 16]
    assert outcome.record["guests"]["victim"]["outcome"] in ("aborted", "secure")


def test_regression_a_uv_reset_before_init_start_reaches_the_hv():
    """Found by the simulator (seed 92 of --fault reset-uv): the UV reset while the victim's
    H_SVM_INIT_START was on its way. The HV had never seen the VM enter secure mode, so its UV
    reset handling left it alone, and the vCPU waited in `sc 2` for a resume that could never
    come, past every bound. The guest now asks which UV answers after a UV_ESM lost in transport
    and stops on a machine check when it is another boot."""
    outcome = run_one(plan_of(92, ("reset-uv",)))
    assert outcome.plan.cut_at == ("H_SVM_INIT_START", 1)
    assert outcome.violations == []


def test_regression_a_guest_killed_while_its_abort_terminates():
    """Found by the simulator (seed 18 of --fault kill-guest): the guest killed as the HV's abort
    called UV_SVM_TERMINATE; its VMM's session ended, the VM was destroyed, and the abort's next
    journal write found no directory: H_SVM_INIT_ABORT answered INTERNAL. A destroyed VM's
    metadata is no longer written."""
    outcome = run_one(plan_of(18, ("kill-guest",)))
    assert (outcome.plan.during, outcome.plan.cut_at) == ("abort", ("UV_SVM_TERMINATE", 1))
    assert outcome.violations == []


def test_a_failing_seed_prints_the_command_that_replays_it(tmp_path):
    """The CLI prints the replay command of a violation and writes the run's record and call
    histories (what a timeline draws); running the command finds the same violation."""
    first = subprocess.run([sys.executable, "-m", "pefsim", "sim", "--runs", "20", "--seed", "1", "--mutant",
                            "uv-frees-on-page-out", "--fault", "kill-hv", "--during", "abort", "--stop-at-first",
                            "--json", "--results", str(tmp_path / "a")],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stderr[-2000:]
    found = json.loads(first.stdout)["violations"][0]
    kept = json.loads(Path(found["history"]).read_text())
    assert kept["replay"] == found["replay"] and kept["violations"][0]["detail"] == found["detail"]
    assert kept["history"]["hv"] and kept["history"]["uv"] and kept["record"]["guests"]["victim"]
    replay = found["replay"].split()[1:]
    again = subprocess.run([sys.executable, "-m", "pefsim", *replay, "--json", "--results", str(tmp_path / "b")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1
    assert json.loads(again.stdout)["violations"][0]["detail"] == found["detail"]
