"""The timeline's model and renderers (pefsim/timeline/), on runs of the simulator made in the test
(the real cores in process, a seed each: the same data every time): every call the histories hold
is drawn once, the HV gets a lane segment per incarnation after a crash, the fault window sits
between the page-outs it interrupted, state bands follow the victim, a failing verdict links the
calls it names, the trace JSON is what Perfetto reads, and the page fetches nothing."""
from __future__ import annotations

import functools
import json
import logging
import re

from pefsim.sim.campaign import every_plan
from pefsim.sim.scenario import Plan, run_one
from pefsim.timeline import from_sim, render_html, render_trace
from pefsim.timeline.html import CALL_COLS


def history_calls(history: dict) -> int:
    """The calls the histories hold, counted from the lines alone: every line a service wrote of a
    call it served, and every ucall the HV made that got no answer (``dir: out`` with an error)."""
    return sum(1 for lines in history.values() for e in lines if e.get("dir") != "out" or "error" in e)


@functools.lru_cache(maxsize=None)
def sim_run(fault: str = "kill-hv", failpoint: str = "hv.abort.page_out:8@victim", again: str = "",
            mutant: str = ""):
    """One simulated run of the exhaustive set (kill-hv during abort at a page-out by default; "none":
    a plain abort), under a mutant if one is named."""
    logging.disable(logging.ERROR)
    try:
        plan = Plan(seed=1, fault="none", during="abort") if fault == "none" else \
            next(p for p in every_plan(("abort",))
                 if p.fault == fault and p.failpoint == failpoint and p.again == again and not p.arrival[0])
        return run_one(plan, (mutant,) if mutant else ())
    finally:
        logging.disable(logging.NOTSET)


def model_of(out):
    return from_sim(out.record, out.history, out.violations, source=f"seed {out.plan.seed}")


def test_every_call_in_the_histories_is_drawn_once():
    out = sim_run()
    model = model_of(out)
    assert len(model.calls) == history_calls(out.history) > 30  # a run of many calls (the memory checks read 16 pages a call)
    assert len({c.source for c in model.calls}) == len(model.calls)  # no line drawn twice
    served = {f"{svc}.history.jsonl:{i + 1}" for svc, lines in out.history.items()
              for i, e in enumerate(lines) if e.get("dir") != "out"}
    assert served <= {c.source for c in model.calls}
    assert model.stats["out"] == model.stats["out_matched"] + model.stats["caller_only"]
    for c in model.calls:
        assert c.start <= c.end and c.cls in ("ok", "error", "transport")
        assert 0 <= c.row < len(model.lane(c.lane).rows)


def test_an_hv_crash_gives_the_hv_a_lane_segment_per_incarnation():
    model = model_of(sim_run())
    hv = model.lane("hv")
    assert [(s.inc, s.start_why, s.end_why) for s in hv.segments] == [(1, "run start", "crashed"),
                                                                      (2, "restarted", "run end")]
    first, second = hv.segments
    assert first.end < second.start
    assert [len(model.lane(lane).segments) for lane in ("uv", "guest:victim", "guest:bystander")] == [1, 1, 1]
    served = [c for c in model.calls if c.lane == "hv"]
    assert {c.inc for c in served} == {1, 2}
    assert all(c.end <= first.end for c in served if c.inc == 1)
    assert all(c.start >= second.start for c in served if c.inc == 2)
    made = [c for c in model.calls if c.caller == "hv"]  # what the HV asked the UV, by incarnation
    assert {c.caller_inc for c in made} == {1, 2}
    assert all(c.start <= first.end for c in made if c.caller_inc == 1)
    assert all(c.start >= second.start for c in made if c.caller_inc == 2)


def test_a_crash_during_recovery_gives_three_incarnations():
    model = model_of(sim_run(failpoint="hv.abort.page_out:1@victim", again="hv.abort.page_out:1@victim"))
    hv = model.lane("hv")
    assert [s.inc for s in hv.segments] == [1, 2, 3]
    assert [s.end_why for s in hv.segments] == ["crashed", "crashed again while recovering", "run end"]
    assert len(model.faults) == 2
    for fault, (before, after) in zip(model.faults, zip(hv.segments, hv.segments[1:])):
        assert (fault.start, fault.end) == (before.end, after.start)
    streams = [c for c in model.calls if c.name == "UvPageOutStream" and c.kind == "stream"]
    assert [c.caller_inc for c in streams] == [1, 2, 3]  # the abort's page-out, asked again by each HV


def test_the_fault_window_sits_between_the_page_outs_it_interrupted():
    model = model_of(sim_run())
    (fault,) = model.faults
    assert fault.kind == "kill-hv" and "hv.abort.page_out" in fault.label and fault.lanes == ["hv"]
    page_outs = [c for c in model.calls if c.name == "UvPageOutStream"]
    before = [c for c in page_outs if c.caller_inc == 1]
    after = [c for c in page_outs if c.caller_inc == 2]
    assert before and after
    assert max(c.end for c in before) <= fault.start < fault.end <= min(c.start for c in after)
    # the abort goes on after the restart: its UV_SVM_TERMINATE comes from the new HV
    (terminate,) = [c for c in model.calls if c.name == "UV_SVM_TERMINATE" and c.lpid == 2]
    assert terminate.caller_inc == 2 and terminate.start >= fault.end


def test_state_bands_follow_the_victims_vm_and_svm():
    model = model_of(sim_run())
    victim = model.lane("guest:victim")
    bands = {b.label: [s["state"] for s in b.spans] for b in victim.bands}
    assert bands["VM state (HV)"] == ["VM_NORMAL", "VM_TRANSIENT", "VM_NORMAL", "destroyed"]
    svm = bands["SVM state (UV)"]
    assert svm[-2:] == ["SVM_ABORT", "terminated"] and "SVM_ACTIVE" in svm
    for band in victim.bands:
        assert all(a["end"] == b["start"] for a, b in zip(band.spans, band.spans[1:]))
    assert any("UV_ESM" in m.text for m in victim.marks)  # the guest's own events


def test_a_failing_verdict_links_the_calls_it_names():
    model = model_of(sim_run("none", mutant="uv-terminate-bad-rc"))
    (failed,) = [v for v in model.verdicts if not v.held]
    assert failed.name == "legal-return-codes"
    for violation in failed.violations:
        linked = [model.calls[i] for i in violation["calls"]]
        assert [(c.lane, c.name) for c in linked] == [("uv", "UV_SVM_TERMINATE")]
        assert linked[0].result in violation["detail"] and linked[0].cls == "error"
    model = model_of(sim_run("none", mutant="uv-pageout-plaintext"))
    (failed,) = [v for v in model.verdicts if not v.held]
    named = failed.violations[0]
    assert named["detail"].startswith("lpid 1: UV_PAGE_OUT of gpa")
    assert [model.calls[i].name for i in named["calls"]] == ["UV_PAGE_OUT"]
    assert sum(1 for v in model.verdicts if v.held) == len(model.verdicts) - 1


def test_the_trace_json_is_chrome_trace_events():
    model = model_of(sim_run())
    trace = json.loads(json.dumps(render_trace(model)))
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    calls = [e for e in events if e["ph"] == "X" and e["cat"] in ("ok", "error", "transport")]
    assert len(calls) == len(model.calls)
    for e in (e for e in events if e["ph"] == "X"):
        assert isinstance(e["ts"], float | int) and e["dur"] >= 0 and e["pid"] in names
        assert (e["pid"], e["tid"]) in threads
    hv_pids = {e["pid"] for e in calls if names[e["pid"]].startswith("HV")}
    assert sorted(names[p] for p in hv_pids) == ["HV #1", "HV #2 (restarted)"]  # a process per incarnation
    assert {e["tid"] for e in calls if e["args"].get("lpid") == 2} == {2}  # a track per lpid
    assert {e["tid"] for e in calls if "lpid" not in e["args"]} == {0}
    faults = [e for e in events if e["ph"] == "i" and e.get("cat") == "fault"]
    assert faults and all(e["s"] == "g" for e in faults)
    assert min(e["ts"] for e in faults) == round(model.faults[0].start * 1e6, 3)


def test_the_page_is_one_self_contained_file():
    out = sim_run("none", mutant="uv-frees-at-abort")
    model = model_of(out)
    page = render_html(model)
    assert page.startswith("<!DOCTYPE html>") and page.count("<script") == 2
    for fetch in ("<link", " src=", "@import", "url(http", "fetch(", "XMLHttpRequest"):
        assert fetch not in page, fetch
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) == {"http://www.w3.org/2000/svg"}  # a namespace, not a fetch
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    parsed = json.loads(data)
    assert parsed["calls"]["cols"] == list(CALL_COLS) and len(parsed["calls"]["rows"]) == history_calls(out.history)
    assert [v["name"] for v in parsed["verdicts"] if not v["held"]] == ["memory-intact"]


def test_a_guest_name_in_the_data_cannot_end_the_script_block():
    out = sim_run("none", mutant="uv-frees-at-abort")
    record = json.loads(json.dumps(out.record))
    record["guests"]["victim"]["report"]["timeline"].append({"unixNs": "1700000000050000000",
                                                             "what": "</script><script>alert(1)</script>"})
    page = render_html(from_sim(record, out.history, out.violations))
    assert page.count("</script>") == 2 and "alert(1)" in page


def test_every_fault_kind_of_the_simulator_draws():
    """One seeded run of each fault kind: every call drawn, lanes' incarnations in order, the fault
    window inside the run, and the lane the fault hits."""
    from pefsim.sim.scenario import FAULTS, plan_of

    logging.disable(logging.ERROR)
    try:
        outs = {fault: run_one(next(p for p in (plan_of(s, (fault,)) for s in range(1, 40))
                                    if p.fault == fault and p.during == "abort")) for fault in FAULTS}
    finally:
        logging.disable(logging.NOTSET)
    for fault, out in outs.items():
        model = model_of(out)
        assert len(model.calls) == history_calls(out.history), fault
        for lane in model.lanes:
            assert all(a.end <= b.start for a, b in zip(lane.segments, lane.segments[1:])), (fault, lane)
        for f in model.faults:
            assert 0 <= f.start <= f.end <= model.duration, (fault, f)
        render_html(model), json.dumps(render_trace(model))
        injected = out.record.get("fault", {}).get("injected")
        assert len(model.faults) == (0 if fault == "none" or not injected else 1), fault
    segments = {f: {lane.id: len(lane.segments) for lane in model_of(out).lanes} for f, out in outs.items()}
    assert segments["reset-uv"]["uv"] == 2 and segments["reset-uv"]["hv"] == 1
    assert segments["hv-gone"]["hv"] == 2 and segments["kill-hv"]["hv"] == 2
    victim = model_of(outs["kill-guest"]).lane("guest:victim").segments
    assert victim[-1].end_why == "kill -9"
    transport = [c for c in model_of(outs["reset-uv"]).calls if c.cls == "transport"]
    assert transport and all(c.kind == "caller-only" and c.lane == "uv" and c.caller == "hv" for c in transport)
