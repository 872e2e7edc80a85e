"""The HV's verbs towards the UV that several calls share, each in one place: register and
unregister a memslot, terminate the SVM. (Paging is in pages.py and bulk.py; the transport,
its history lines and the UV's boot id in Hypervisor.ucall.)

    register_slot     UV_REGISTER_MEM_SLOT, then the slot's RAM file offered as shared memory
                      (H_SVM_INIT_START for every slot; SetMemslot for one added meanwhile)
    unregister_slot   UV_UNREGISTER_MEM_SLOT, result ignored, as every caller in the kernel does
                      (ResetVm, SetMemslot delete, the v10 abort)
    terminate         UV_SVM_TERMINATE, timed into pefsim_hv_terminate_duration_seconds by
                      trigger (abort, reset, destroy)
"""
from __future__ import annotations


from pefsim import clock
from pefsim.abi import U, gpa_of, rc_name
from pefsim.v1 import ultravisor_pb2 as upb
from services.hypervisor.core.bulk import offer_memory
from services.hypervisor.ports import UvUnreachable


async def register_slot(hv, vm, slot) -> int:
    """UV_REGISTER_MEM_SLOT for ``slot`` (U_FUNCTION when the UV could not be reached: the call
    did not happen); on success its RAM file is offered to the UV. Called with vm.lock held."""
    try:
        rc = (await hv.ucall("UV_REGISTER_MEM_SLOT", upb.UvRegisterMemSlotRequest(
            lpid=vm.lpid, start_gpa=gpa_of(slot.base_gfn), size=gpa_of(slot.npages), flags=0,
            slotid=slot.slot_id))).rc
    except UvUnreachable:
        return U.U_FUNCTION
    if rc == U.U_SUCCESS:
        await offer_memory(hv, vm, slot)
    return rc


async def unregister_slot(hv, vm, slot_id: int) -> None:
    """UV_UNREGISTER_MEM_SLOT, result ignored (as every caller in the kernel does)."""
    try:
        await hv.ucall("UV_UNREGISTER_MEM_SLOT", upb.UvUnregisterMemSlotRequest(lpid=vm.lpid, slotid=slot_id))
    except UvUnreachable:
        pass


async def terminate(hv, vm, trigger: str, *, unreachable_raises: bool = False) -> tuple[int, float]:
    """UV_SVM_TERMINATE for the VM: its result and how long it took (the value the metric
    observed). A UV that cannot be reached is U_FUNCTION (the call did not happen), or, with
    ``unreachable_raises`` (the abort, which asks again), UvUnreachable."""
    t0 = clock.monotonic()
    try:
        rc = (await hv.ucall("UV_SVM_TERMINATE", upb.UvSvmTerminateRequest(lpid=vm.lpid))).rc
    except UvUnreachable:
        if unreachable_raises:
            raise
        rc = U.U_FUNCTION
    seconds = clock.monotonic() - t0
    hv.metrics.terminate_seconds.labels(trigger, rc_name(rc, U)).observe(seconds)
    return rc, seconds
