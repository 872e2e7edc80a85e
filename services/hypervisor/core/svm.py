"""H_SVM_INIT_START, H_SVM_INIT_DONE and H_SVM_INIT_ABORT (UV -> HV): the VM-level transitions.

The caller and state checks are in calltable.py; the order of the work follows the merged
kernel (book3s_hv_uvmem.c), with the deviations written in docs/conformance.md.
"""
from __future__ import annotations

import asyncio
import logging

from pefsim import faults
from pefsim.abi import AbortReturn, GfnState, H, Role, SecureGuest, U
from pefsim.v1 import hypervisor_pb2 as pb
from pefsim.calltable import StateChanged
from services.hypervisor.core import abort, uv

log = logging.getLogger("pefsim.hv")


async def h_svm_init_start(hv, req: pb.HSvmInitStartRequest, caller) -> pb.HSvmInitStartResponse:
    """secure_guest = INIT_START first and unconditionally (377f02d487b5: even a failure returns
    through the UV), then H_AUTHORITY without the secure-guest capability, then every memslot is
    registered with the UV; a refusal unregisters the ones already registered -> H_PARAMETER."""
    vm = hv.state.vms[req.lpid]
    if req.vcpu_owner and req.vcpu_owner != vm.owner:  # another guest's VM, or an operator's
        # not this VM's vCPU (impossible on hardware): refused before anything changes
        log.error("lpid %d: INIT_START for %s's VM on behalf of %s: refused", vm.lpid, vm.owner, req.vcpu_owner)
        return pb.HSvmInitStartResponse(rc=H.H_AUTHORITY)
    async with hv.table.guard("H_SVM_INIT_START", req, vm.lock):
        vm.esm_token = req.token  # written with secure_guest
        hv.state.set_secure_guest(vm, SecureGuest.KVMPPC_SECURE_INIT_START)
        if not vm.secure_capable:
            return pb.HSvmInitStartResponse(rc=H.H_AUTHORITY)
        registered = []
        for slot in sorted(vm.slots.values(), key=lambda s: s.slot_id):
            rc = await uv.register_slot(hv, vm, slot)
            if rc != U.U_SUCCESS:
                log.warning("lpid %d: UV_REGISTER_MEM_SLOT(slot %d) -> %d; rolling back",
                            vm.lpid, slot.slot_id, rc)
                for done in registered:
                    await uv.unregister_slot(hv, vm, done)
                return pb.HSvmInitStartResponse(rc=H.H_PARAMETER)
            registered.append(slot.slot_id)
    return pb.HSvmInitStartResponse(rc=H.H_SUCCESS)


async def h_svm_init_done(hv, req: pb.HSvmInitDoneRequest, caller) -> pb.HSvmInitDoneResponse:
    """Sweep every GFN still normal into the secure state without copying it (5.9+: the UV only
    paged in what it needed), then INIT_DONE. Calling it again just succeeds again."""
    vm = hv.state.vms[req.lpid]
    # the mutant brings back the check-then-act race: the state checked before the lock only
    guarded = vm.lock if faults.mutant("hv-init-done-unguarded") else hv.table.guard("H_SVM_INIT_DONE", req, vm.lock)
    async with guarded:
        if vm.secure_guest & SecureGuest.KVMPPC_SECURE_INIT_DONE:
            return pb.HSvmInitDoneResponse(rc=H.H_SUCCESS)
        for slot, idx in vm.pages():
            if slot.state(idx) == GfnState.GFN_NORMAL:
                hv.state.mark_secure_in(slot, idx)
        hv.state.set_secure_guest(vm, vm.secure_guest | SecureGuest.KVMPPC_SECURE_INIT_DONE)
    log.info("LPID %d went secure", vm.lpid)
    faults.reach("hv.esm.init_done", vm.name)
    return pb.HSvmInitDoneResponse(rc=H.H_SUCCESS)


def h_svm_init_abort_exit(hv, req: pb.HSvmInitAbortRequest, resp: pb.HSvmInitAbortResponse, caller) -> None:
    """H_SVM_INIT_ABORT's exit path. Where an hcall's result goes is decided by secure_guest as
    the vCPU leaves the HV, not by the hcall (book3s_64_entry.S kvmppc_p9_enter_guest:
    ``lbz r4,KVM_SECURE_GUEST(r4); cmpdi r4,0; bne .Lret_to_ultra``, else HRFI_TO_GUEST):

    * secure_guest != 0: UV_RETURN, the UV's context resumes with the result (the RPC's answer,
      returned_to unset): H_STATE after INIT_DONE.
    * secure_guest == 0: HRFID to the guest at SRR0 with R3 = the result, and the UV's context
      never resumes (returned_to = ABORT_RETURN_GUEST). The merged abort's own H_PARAMETER goes
      this way by design (its journal's resume phase). So does H_UNSUPPORTED for a VM already
      normal: its abort finished (the UV asking again after a lost answer; the vCPU recognises
      the repeat by the token and takes one resume) or its ESM never reached this HV (the guest
      sees H_UNSUPPORTED as UV_ESM's result). That resume is journalled like the abort's
      (abort.refused_to_guest) and delivered by a restarted HV.

    Only for the UV's calls: a guest's own hcall returns to it whatever secure_guest says."""
    if caller.role != Role.ROLE_UV or resp.rc != H.H_UNSUPPORTED:
        return
    vm = hv.state.vms.get(req.lpid)
    if vm is None or vm.destroyed or vm.secure_guest != SecureGuest.SECURE_GUEST_NONE:
        return
    if vm.esm_token not in (0, req.token):  # its vCPU is not in that `sc 2` any more (a reset, a new ESM)
        return
    if caller.on_behalf != vm.owner:  # not its guest's `sc 2` (a UV_ESM naming another's VM): its vCPU owes nothing
        return
    resp.returned_to = AbortReturn.ABORT_RETURN_GUEST
    if abort.running(vm) is None:  # else the abort under way already owes the vCPU its resume
        abort.refused_to_guest(hv, vm, req)


async def h_svm_init_abort(hv, req: pb.HSvmInitAbortRequest, caller) -> pb.HSvmInitAbortResponse:
    """Merged semantics (v5.6+): page every secure page out with its content, secure_guest = 0,
    UV_SVM_TERMINATE, and resume the guest after its UV_ESM with H_PARAMETER as a normal VM;
    memslots stay registered (the UV forgets them with the SVM). The work is a journalled task
    (abort.py) that a restarted HV finishes; a repeated call joins it.

    With abort_return = uv (the v10 proposal) the HV instead unregisters the memslots, sets
    secure_guest = INIT_ABORT and returns H_SUCCESS to the UV, which resumes the guest."""
    vm = hv.state.vms[req.lpid]
    answer = abort.running(vm)  # a repeat (the UV asking again after a lost answer) joins it
    if answer is None:
        # the dispatcher's state check ran before the lock: an INIT_DONE or a ResetVm that held
        # it may have made the VM secure or normal since. Look again under the lock, and hand
        # the lock to the abort's page-out, so nothing comes between the check and the work.
        await vm.lock.acquire()
        try:
            rc, state = hv.table.recheck("H_SVM_INIT_ABORT", req)
            if rc is not None:
                raise StateChanged(rc, state)
            answer = abort.start(hv, vm, req, lock_held=True)
        except BaseException:
            vm.lock.release()
            raise
    return await asyncio.shield(answer)
