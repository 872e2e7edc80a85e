"""The whole stack in one process: guest cores (the same boot program the guest processes run)
on the UV and HV cores, wired by services/local.py. Guests that go secure, abort on a bad blob,
boot as a normal VM, or lack the secure capability (H_SVM_INIT_START answers H_AUTHORITY: the
ESM aborts), and an HV crash in the middle of an abort under a real guest:
each guest's own report says what happened and that its memory is what it wrote."""
from __future__ import annotations

import asyncio

import pytest

from pefsim.abi import PAGE_SIZE, AbortReturn, H, Role, U
from pefsim.calltable import Caller
from pefsim.blob import make_blob
from pefsim.image import GuestImage
from pefsim.v1 import hypervisor_pb2 as hpb

MEM = 48 * PAGE_SIZE
BOUND_S = 30


def blob(m, name: str, bad: bool = False) -> bytes:
    return make_blob(GuestImage.of_size(name, MEM), m.signing_key, override={"kernel": "0" * 128} if bad else None)


async def test_guests_go_secure_abort_or_stay_normal(stage):
    async with stage() as m:
        guests = {
            "secure": m.add_guest("secure", MEM, blob(m, "secure")),
            "aborted": m.add_guest("aborted", MEM, blob(m, "aborted", bad=True)),
            "normal": m.add_guest("normal", MEM, svm=False),
            "incapable": m.add_guest("incapable", MEM, blob(m, "incapable"), secure_capable=False),
        }
        reports = dict(zip(guests, await asyncio.wait_for(
            asyncio.gather(*(g.boot() for g in guests.values())), BOUND_S)))
        assert {k: r.outcome for k, r in reports.items()} == {
            "secure": "secure", "aborted": "aborted", "normal": "normal", "incapable": "aborted"}
        assert all(r.memory_intact for r in reports.values())
        assert (reports["secure"].esm_rc, reports["secure"].msr_s) == (U.U_SUCCESS, True)
        # merged design: the HV resumes the aborted guest with H_PARAMETER at the nip after `sc 2`
        for k in ("aborted", "incapable"):
            assert (reports[k].esm_rc, reports[k].resumed_by) == (H.H_PARAMETER, Role.ROLE_HV), k
            assert reports[k].abort_latency_s > 0
        status = m.uv.state.svms
        assert [s.lpid for s in status.values()] == [reports["secure"].lpid]  # the UV forgot the aborted SVM


@pytest.mark.parametrize("policy", ["os-term", "continue"])
async def test_after_a_failed_esm_the_guest_os_terms_or_carries_on(stage, policy):
    """Linux's prom_init calls ibm,os-term after any UV_ESM that did not switch to secure mode: the
    VMM stops the VM, which stays with the HV (its memory read through the host, intact) until it
    is destroyed. With ``continue`` the guest carries on as a normal VM, its vCPU still running."""
    async with stage() as m:
        g = m.add_guest("aborted", MEM, blob(m, "aborted", bad=True), on_esm_failure=policy)
        report = await asyncio.wait_for(g.boot(), BOUND_S)
        assert (report.outcome, report.esm_rc, report.memory_intact) == ("aborted", H.H_PARAMETER, True)
        assert report.on_esm_failure == policy and report.os_term == (policy == "os-term")
        vm = m.hv.state.vms[report.lpid]  # destroyed by no one yet: its memory stays with the HV
        assert vm.running == (policy == "continue")
        checks = [e.what for e in report.timeline if e.what.startswith("memory check")]
        assert checks and ("through the host" in checks[-1]) == (policy == "os-term")


async def test_an_abort_asked_again_after_it_finished_goes_to_the_guest_once(stage):
    """The UV asks H_SVM_INIT_ABORT again (its answer was lost) after the HV finished the abort:
    the VM is normal, secure_guest 0, so the kernel's exit path HRFIDs the H_UNSUPPORTED to the
    guest, not the UV. Under the abort's token the vCPU recognises a repeat of the resume it took:
    one resume, one acknowledged duplicate; a VM reset since gets nothing."""
    async with stage() as m:
        g = m.add_guest("victim", MEM, blob(m, "victim", bad=True))
        report = await asyncio.wait_for(g.boot(), BOUND_S)
        assert (report.outcome, report.esm_rc) == ("aborted", H.H_PARAMETER)
        again = hpb.HSvmInitAbortRequest(lpid=g.lpid, srr0=g.sc2_nip, token=g.taken_token)
        uv = Caller(Role.ROLE_UV, "uv", "victim")
        resp = await m.hv_call("H_SVM_INIT_ABORT", again, uv)
        assert (resp.rc, resp.returned_to) == (H.H_UNSUPPORTED, AbortReturn.ABORT_RETURN_GUEST)
        await asyncio.wait_for(_until(lambda: g.report.duplicate_resumes == 1), BOUND_S)
        assert g.report.resumes == 1 and g.report.esm_rc == H.H_PARAMETER
        await m.hv_call("ResetVm", hpb.ResetVmRequest(lpid=g.lpid), Caller(Role.ROLE_GUEST, "victim"))
        resp = await m.hv_call("H_SVM_INIT_ABORT", again, uv)
        assert (resp.rc, resp.returned_to) == (H.H_UNSUPPORTED, AbortReturn.ABORT_RETURN_UNSPECIFIED)


async def test_an_abort_for_another_guests_vm_goes_to_no_vcpu(stage):
    """An H_SVM_INIT_ABORT the UV makes for guest B (a UV_ESM that named A's VM) finds A's VM
    normal: its H_UNSUPPORTED is not HRFID'd into A's vCPU (the `sc 2` is not A's), it comes back
    to the UV."""
    async with stage() as m:
        a = m.add_guest("a", MEM, svm=False)
        await asyncio.wait_for(a.boot(), BOUND_S)
        req = hpb.HSvmInitAbortRequest(lpid=a.lpid, srr0=0x11004, token=7)
        resp = await m.hv_call("H_SVM_INIT_ABORT", req, Caller(Role.ROLE_UV, "uv", "a"))
        assert (resp.rc, resp.returned_to) == (H.H_UNSUPPORTED, AbortReturn.ABORT_RETURN_GUEST)  # A's own
        resp = await m.hv_call("H_SVM_INIT_ABORT", hpb.HSvmInitAbortRequest(lpid=a.lpid, srr0=0x11004, token=8),
                               Caller(Role.ROLE_UV, "uv", "mallory"))
        assert (resp.rc, resp.returned_to) == (H.H_UNSUPPORTED, AbortReturn.ABORT_RETURN_UNSPECIFIED)


async def _until(cond, every: float = 0.01) -> None:
    while not cond():
        await asyncio.sleep(every)


@pytest.mark.parametrize("point", ["hv.abort.page_out:20", "hv.abort.before_terminate", "hv.abort.before_resume"])
async def test_an_hv_crash_mid_abort_under_a_real_guest(stage, point):
    async with stage() as m:
        g = m.add_guest("victim", MEM, blob(m, "victim", bad=True))
        with m.crash_at(point):
            booting = asyncio.ensure_future(g.boot())
            await asyncio.wait_for(m.crashed.wait(), BOUND_S)
        await m.restart_hv()
        report = await asyncio.wait_for(booting, BOUND_S)
        assert (report.outcome, report.memory_intact, report.esm_rc) == ("aborted", True, H.H_PARAMETER)
        assert report.resumed_by == Role.ROLE_HV and not report.detail
        assert g.report.duplicate_resumes == 0
