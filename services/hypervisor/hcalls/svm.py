"""H_SVM_INIT_START, H_SVM_INIT_DONE and H_SVM_INIT_ABORT (UV -> HV): the VM-level transitions.

The caller and state checks are in calltable.py; the order of the work follows the merged
kernel (book3s_hv_uvmem.c), with the deviations written in docs/conformance.md.
"""
from __future__ import annotations

import logging
import time

import grpc

from pefsim.abi import AbortReturn, GfnState, H, Role, SecureGuest, U, gpa_of
from pefsim.v1 import guest_pb2, hypervisor_pb2 as pb, ultravisor_pb2 as upb
from services.hypervisor.errors import UvUnreachable
from services.hypervisor.hcalls.page import take_page

log = logging.getLogger("pefsim.hv")


async def h_svm_init_start(hv, req: pb.HSvmInitStartRequest, caller) -> pb.HSvmInitStartResponse:
    """secure_guest = INIT_START first and unconditionally (377f02d487b5: even a failure returns
    through the UV), then H_AUTHORITY without the secure-guest capability, then every memslot is
    registered with the UV; a refusal unregisters the ones already registered -> H_PARAMETER."""
    vm = hv.state.vms[req.lpid]
    async with vm.lock:
        hv.state.set_secure_guest(vm, SecureGuest.KVMPPC_SECURE_INIT_START)
        if not vm.secure_capable:
            return pb.HSvmInitStartResponse(rc=H.H_AUTHORITY)
        registered = []
        for slot in sorted(vm.slots.values(), key=lambda s: s.slot_id):
            try:
                rc = (await hv.ucall("UV_REGISTER_MEM_SLOT", upb.UvRegisterMemSlotRequest(
                    lpid=vm.lpid, start_gpa=gpa_of(slot.base_gfn), size=gpa_of(slot.npages),
                    flags=0, slotid=slot.slot_id))).rc
            except UvUnreachable:
                rc = U.U_FUNCTION
            if rc != U.U_SUCCESS:
                log.warning("lpid %d: UV_REGISTER_MEM_SLOT(slot %d) -> %d; rolling back",
                            vm.lpid, slot.slot_id, rc)
                for done in registered:
                    await _unregister(hv, vm, done)
                return pb.HSvmInitStartResponse(rc=H.H_PARAMETER)
            registered.append(slot.slot_id)
    return pb.HSvmInitStartResponse(rc=H.H_SUCCESS)


async def _unregister(hv, vm, slot_id: int) -> None:
    """UV_UNREGISTER_MEM_SLOT, result ignored (as every caller in the kernel does)."""
    try:
        await hv.ucall("UV_UNREGISTER_MEM_SLOT", upb.UvUnregisterMemSlotRequest(lpid=vm.lpid, slotid=slot_id))
    except UvUnreachable:
        pass


async def h_svm_init_done(hv, req: pb.HSvmInitDoneRequest, caller) -> pb.HSvmInitDoneResponse:
    """Sweep every GFN still normal into the secure state without copying it (5.9+: the UV only
    paged in what it needed), then INIT_DONE. Calling it again just succeeds again."""
    vm = hv.state.vms[req.lpid]
    async with vm.lock:
        if vm.secure_guest & SecureGuest.KVMPPC_SECURE_INIT_DONE:
            return pb.HSvmInitDoneResponse(rc=H.H_SUCCESS)
        for slot, idx in vm.pages():
            if slot.state(idx) == GfnState.GFN_NORMAL:
                hv.state.mark_secure_in(slot, idx)
        hv.state.set_secure_guest(vm, vm.secure_guest | SecureGuest.KVMPPC_SECURE_INIT_DONE)
    log.info("LPID %d went secure", vm.lpid)
    return pb.HSvmInitDoneResponse(rc=H.H_SUCCESS)


async def drop_pages(hv, vm, slots, page_out: bool) -> int:
    """kvmppc_uvmem_drop_pages for ``slots``: every GFN back to normal. With ``page_out`` each
    secure page is taken back from the UV with its content (UV_PAGE_OUT); without, secure
    content is dropped and the HV page scrubbed. Errors are logged, as in the kernel; returns
    the number of pages recovered. Called with vm.lock held."""
    recovered = 0
    for slot in slots:
        for idx in range(slot.npages):
            st = slot.state(idx)
            if st == GfnState.GFN_NORMAL:
                continue
            if st == GfnState.GFN_SECURE_IN and page_out:
                data = await take_page(hv, vm, slot, idx)
                hv.state.mark_normal(slot, idx, data=data, scrub=data is None)
                recovered += data is not None
            else:
                hv.state.mark_normal(slot, idx, scrub=st == GfnState.GFN_SECURE_IN)
    return recovered


async def h_svm_init_abort(hv, req: pb.HSvmInitAbortRequest, caller) -> pb.HSvmInitAbortResponse:
    """Merged semantics (v5.6+): page every secure page out with its content, secure_guest = 0,
    UV_SVM_TERMINATE, and resume the guest after its UV_ESM with H_PARAMETER as a normal VM.
    Memslots stay registered: the UV forgets them with the SVM.

    With abort_return = uv (the v10 proposal) the HV instead unregisters the memslots, sets
    secure_guest = INIT_ABORT and returns H_SUCCESS to the UV, which resumes the guest."""
    t0 = time.perf_counter()
    vm = hv.state.vms[req.lpid]
    v10 = hv.cfg.abort_return == AbortReturn.ABORT_RETURN_UV
    async with vm.lock:
        recovered = await drop_pages(hv, vm, list(vm.slots.values()), page_out=True)
        if v10:
            for slot_id in sorted(vm.slots):
                await _unregister(hv, vm, slot_id)
            hv.state.set_secure_guest(vm, SecureGuest.KVMPPC_SECURE_INIT_ABORT)
        else:
            hv.state.set_secure_guest(vm, SecureGuest.SECURE_GUEST_NONE)
    if v10:
        hv.metrics.abort_seconds.labels("returned-to-uv").observe(time.perf_counter() - t0)
        return pb.HSvmInitAbortResponse(rc=H.H_SUCCESS, returned_to=AbortReturn.ABORT_RETURN_UV,
                                        pages_recovered=recovered)
    await hv.terminate(vm, "abort")
    # secure_guest is 0, so the exit path is an HRFID straight into the guest (no UV_RETURN).
    outcome = await resume_vcpu(hv, vm, r3=H.H_PARAMETER, nip=req.srr0, trace=req.trace)
    hv.metrics.abort_seconds.labels(outcome).observe(time.perf_counter() - t0)
    log.info("lpid %d: aborted, %d pages given back, guest %s", vm.lpid, recovered, outcome)
    return pb.HSvmInitAbortResponse(rc=H.H_PARAMETER, returned_to=AbortReturn.ABORT_RETURN_GUEST,
                                    pages_recovered=recovered)


async def resume_vcpu(hv, vm, r3: int, nip: int, trace) -> str:
    """HRFID into the guest: deliver R3 to the vCPU waiting after its `sc 2`."""
    try:
        resp = await hv.vcpu(vm).stub.VcpuResume(guest_pb2.VcpuResumeRequest(
            lpid=vm.lpid, r3=r3, msr_s=False, nip=nip, resumed_by=Role.ROLE_HV, trace=trace))
    except grpc.aio.AioRpcError as exc:
        log.error("lpid %d: guest vCPU unreachable (%s)", vm.lpid, exc.code().name)
        return "guest-unreachable"
    return "resumed" if resp.rc == H.H_SUCCESS else "not-waiting"
