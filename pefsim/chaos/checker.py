"""The chaos checkers: each invariant judged on a run's record and the services' call histories
only (Jepsen's checker side: nothing here talks to a service).

A run record (runner.py) holds the guests' final reports, the UV's and HV's status after the run
and after teardown, the nemesis's fault record and the pages the harness saw; the histories are
the JSON lines the UV and HV wrote for every call they served (and the HV's ucalls, with page
digests) during the run's window.
"""
from __future__ import annotations

from dataclasses import dataclass

from pefsim.abi import H
from pefsim.image import GuestImage, page_digest
from pefsim.calltable import legal_results, result_name

INVARIANTS = {
    "memory-intact": "every guest page is byte-identical to what the guest wrote (aborted and "
                     "recovered guests included)",
    "no-plaintext-to-hv": "the HV never received plaintext of a page of a VM that had reached INIT_DONE",
    "uv-forgets-terminated": "after UV_SVM_TERMINATE the UV holds no page, memslot or key of the SVM; "
                             "secure pages in use return to the count before the run",
    "no-orphan-vms": "after teardown the HV holds no VM of the run's guests: a call asked again after its "
                     "answer was lost (CreateVm) made one VM, not two",
    "aborted-resumed-once": "each aborted guest resumed exactly once, with H_PARAMETER; no guest "
                            "resumed in secure mode after an abort",
    "final-state-bound": "every SVM reaches a final state (secure, normal, terminated) within the bound "
                         "after the last fault heals",
    "held-svm-bounded": "an SVM whose calls the HV never answers costs that SVM only: another guest still "
                        "gets to secure, the UV keeps the held SVM (its pages within its size, not growing) "
                        "and asks for it one call at a time",
    "legal-return-codes": "every result a service gave is legal for the call and the state it was in "
                          "(the conformance table); no handler raised (INTERNAL)",
}

FINAL = ("secure", "aborted", "normal", "failed", "killed")


@dataclass
class Violation:
    run: int
    invariant: str
    detail: str

    def as_json(self) -> dict:
        return {"run": self.run, "invariant": self.invariant, "detail": self.detail}


def plaintext_digests(guest: dict) -> set[str]:
    image = GuestImage.of_size(guest["name"], guest["mem_bytes"])
    blob = bytes.fromhex(guest["blob_hex"])
    return {page_digest(image.page(g, blob)) for g in range(image.npages)}


def check(record: dict, history: dict[str, list[dict]]) -> list[Violation]:
    """All invariants; a checker that crashes is reported as a violation of its invariant (an
    unknown verdict is not a pass)."""
    out: list[Violation] = []
    for name, fn in CHECKS.items():
        try:
            out += [Violation(record["run"], name, d) for d in fn(record, history)]
        except Exception as exc:  # noqa: BLE001 - the verdict is "unknown", reported as such
            out.append(Violation(record["run"], name, f"checker crashed: {exc!r}"))
    return out


def memory_intact(rec, history):
    for g in rec["guests"].values():
        rep = g.get("report")
        if rep and rep.get("outcome") in ("secure", "aborted", "normal") and not rep.get("memoryIntact"):
            yield f"{g['name']} ({rep.get('outcome')}): {rep.get('detail') or 'memory differs'}"


def no_plaintext_to_hv(rec, history):
    hv = history.get("hv", [])
    went_secure = {e["lpid"]: e["t"] for e in hv if e.get("call") == "H_SVM_INIT_DONE"
                   and e.get("rc_name") == "H_SUCCESS" and "dir" not in e}
    by_lpid = {g["report"]["lpid"]: g for g in rec["guests"].values() if g.get("report", {}).get("lpid")}
    digests: dict[int, set[str]] = {}
    for e in hv:
        if e.get("dir") != "out" or e.get("call") != "UV_PAGE_OUT" or "data_sha" not in e:
            continue
        lpid = e["lpid"]
        if lpid not in went_secure or e["t"] < went_secure[lpid] or lpid not in by_lpid:
            continue
        if lpid not in digests:
            digests[lpid] = plaintext_digests(by_lpid[lpid])
        if e["data_sha"] in digests[lpid]:
            yield f"lpid {lpid}: UV_PAGE_OUT of gpa 0x{e['gpa']:x} after INIT_DONE handed the HV plaintext"
    for touch in rec.get("host_touches", []):
        if touch["plaintext"]:
            yield f"{touch['guest']}: the host read a secure page and saw its plaintext"


def uv_forgets_terminated(rec, history):
    lpids = {g["report"]["lpid"] for g in rec["guests"].values() if g.get("report", {}).get("lpid")}
    after = rec["uv_after"]
    kept = 0  # pages of a held SVM no UV_SVM_TERMINATE ever reached: the UV must keep it
    terminated = {e["lpid"] for e in history.get("hv", []) if e.get("call") == "UV_SVM_TERMINATE"}
    for svm in after.get("svms", []):
        if svm["lpid"] == rec.get("held", {}).get("lpid") and svm["lpid"] not in terminated:
            kept += int(svm.get("securePages", 0))
            continue  # the HV never saw its H_SVM_INIT_START, so never terminates it (docs/recovery.md)
        if svm["lpid"] in lpids:
            yield f"lpid {svm['lpid']} still held by the UV after teardown ({svm})"
    before, now = rec["pool_before"], int(after.get("poolPagesInUse", 0)) - kept
    if now != before:
        yield f"secure pages in use {now} after the run, {before} before"


def no_orphan_vms(rec, history):
    if "hv_after" not in rec:  # the process harness records no HV view after its teardown
        return
    names = {g["name"] for g in rec["guests"].values()}
    for vm in rec["hv_after"]:
        if vm["owner"] in names:
            yield f"lpid {vm['lpid']} ({vm['name']}) still held by the HV after teardown"


def aborted_resumed_once(rec, history):
    aborted_lpids = {e["lpid"] for e in history.get("hv", []) if e.get("call") == "H_SVM_INIT_ABORT"}
    for g in rec["guests"].values():
        rep = g.get("report")
        if not rep:
            continue
        resumes = rep.get("resumes", 0)
        if resumes > 1:
            yield f"{g['name']}: resumed {resumes} times after one UV_ESM"
        if rep.get("refusedResumes"):
            yield f"{g['name']}: {rep['refusedResumes']} resumes arrived when none was outstanding"
        if rep.get("outcome") == "aborted":
            if resumes != 1 or rep.get("esmRc", 0) != H.H_PARAMETER or rep.get("msrS"):
                yield (f"{g['name']}: aborted but resumes={resumes}, rc={rep.get('esmRc', 0)}, "
                       f"msr_s={rep.get('msrS', False)}")
        if rep.get("lpid") in aborted_lpids and rep.get("msrS"):
            yield f"{g['name']}: resumed in secure mode although its ESM was aborted"


def final_state_bound(rec, history):
    held = rec.get("held", {}).get("guest")
    for g in rec["guests"].values():
        outcome = g.get("outcome")
        if outcome == "held" and g["name"] == held:
            continue  # the HV never answers for it: held-svm-bounded judges it
        if outcome not in FINAL:
            yield f"{g['name']}: no final state within {rec['final_bound_s']} s after the heal (last: {outcome})"


def held_svm_bounded(rec, history):
    held = rec.get("held")
    if not held:
        return
    if "late" in held:  # a guest booted while the HV ignored the held one (hang; hv-gone has none)
        late = rec["guests"].get(held["late"], {})
        if late.get("outcome") != "secure":
            yield f"{held['late']} booted while the HV ignored {held['guest']}: {late.get('outcome')}, not secure"
        elif held["late_boot_s"] > held["late_bound_s"]:
            yield (f"{held['late']} took {held['late_boot_s']:.1f} s to get to secure while the HV ignored "
                   f"{held['guest']} (bound {held['late_bound_s']} s): the held SVM's calls stood in its way")
    samples = held["samples"]
    for s in samples:
        if s["pages"] > held["svm_pages"]:
            yield f"{held['guest']} pins {s['pages']} pages in the UV at t={s['t']:.1f}, more than its {held['svm_pages']}"
        if s["in_flight"] > 1:
            yield f"{s['in_flight']} calls for {held['guest']} wait on the silent HV at once at t={s['t']:.1f}"
        if s["held_by_uv"] is False and rec["guests"][held["guest"]].get("outcome") == "held":
            yield f"the UV let go of {held['guest']} while its guest still waits (t={s['t']:.1f})"
    if held.get("bystander_intact") is False:
        yield "the secure bystander's memory did not read back intact through the UV while no HV ran"
    if len(samples) > 1 and samples[-1]["pages"] > samples[0]["pages"]:
        yield f"{held['guest']}'s pins grew from {samples[0]['pages']} to {samples[-1]['pages']} pages"


def legal_return_codes(rec, history):
    from services.hypervisor import calltable as hv_table
    from services.ultravisor import calltable as uv_table

    tables = {"uv": uv_table, "hv": hv_table}
    for svc, table in tables.items():
        for e in history.get(svc, []):  # a handler that raised answered INTERNAL: no legal result
            if "error" in e and e.get("dir") != "out":
                yield f"{svc} {e.get('call')} raised {e['error']} (INTERNAL)"
        calls = {c.name: c for c in table.CALLS}
        states = {name: {s.name: s for s in row} for name, row in table.STATE_TABLE.items()}
        for e in history.get(svc, []):
            if "results" in e and e.get("batches") in calls:  # a bulk batch: each page's result
                call = calls[e["batches"]]
                state = states.get(call.name, {}).get(e.get("state"))
                legal = {result_name(call, v) for v in legal_results(call, table.STATE_TABLE, state)}
                for name in e["results"]:
                    if name not in legal:
                        yield f"{svc} {e['call']} page in {e.get('state')} answered {name} ({call.name})"
                continue
            if e.get("dir") == "out" or "rc" not in e or e.get("call") not in calls or e.get("stream"):
                continue
            call = calls[e["call"]]
            if call.result is None:
                continue  # not an ABI call: no PEF result to judge
            state = states.get(call.name, {}).get(e.get("state"))
            if e["rc"] not in legal_results(call, table.STATE_TABLE, state):
                yield f"{svc} {call.name} in {e.get('state')} answered {e.get('rc_name')} ({e['rc']})"


CHECKS = {
    "memory-intact": memory_intact,
    "no-plaintext-to-hv": no_plaintext_to_hv,
    "uv-forgets-terminated": uv_forgets_terminated,
    "no-orphan-vms": no_orphan_vms,
    "aborted-resumed-once": aborted_resumed_once,
    "final-state-bound": final_state_bound,
    "held-svm-bounded": held_svm_bounded,
    "legal-return-codes": legal_return_codes,
}
assert set(CHECKS) == set(INVARIANTS)
