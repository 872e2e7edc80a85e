"""UV_REGISTER_MEM_SLOT and UV_UNREGISTER_MEM_SLOT (HV -> UV)."""
from __future__ import annotations

from pefsim.abi import U, gfn_of
from pefsim.v1 import ultravisor_pb2 as pb
from services.ultravisor.core.guard import guarded


async def uv_register_mem_slot(uv, req: pb.UvRegisterMemSlotRequest, caller) -> pb.UvRegisterMemSlotResponse:
    """Register a slot and reserve its secure memory. A slot id already registered is replaced,
    as the firmware does (memslot_overlap skips the same id, svm_host.c:264-265, and the slot is
    reserved again): the old slot's pages are freed. Codes, one convention: the firmware's where
    the firmware refuses (it collapses every failure to U_PARAMETER: overlap with another slot,
    a reservation the pool cannot make), the doc's where only the doc refuses (flags: U_P4)."""
    svm = uv.state.svms[req.lpid]
    base, npages = gfn_of(req.start_gpa), gfn_of(req.size)
    async with guarded(uv, "UV_REGISTER_MEM_SLOT", req, svm):
        old = svm.slots.get(req.slotid)
        if svm.reserved - (old.npages if old else 0) + npages > uv.cfg.max_svm_pages:
            return pb.UvRegisterMemSlotResponse(rc=U.U_PARAMETER)
        for slotid, other in svm.slots.items():
            if slotid != req.slotid and base < other.base + other.npages and other.base < base + npages:
                return pb.UvRegisterMemSlotResponse(rc=U.U_PARAMETER)
        if old is not None:
            uv.state.remove_slot(svm, req.slotid)
        if not uv.state.add_slot(svm, req.slotid, base, npages):
            return pb.UvRegisterMemSlotResponse(rc=U.U_PARAMETER)
    return pb.UvRegisterMemSlotResponse(rc=U.U_SUCCESS)


async def uv_unregister_mem_slot(uv, req: pb.UvUnregisterMemSlotRequest, caller) -> pb.UvUnregisterMemSlotResponse:
    """Forget a slot: its pages are scrubbed and freed, its reservation returned. An unknown slot
    id is U_P2 (documented code; the UV code returns 0 for anything)."""
    svm = uv.state.svms[req.lpid]
    async with guarded(uv, "UV_UNREGISTER_MEM_SLOT", req, svm):
        if req.slotid not in svm.slots:
            return pb.UvUnregisterMemSlotResponse(rc=U.U_P2)
        uv.state.remove_slot(svm, req.slotid)
    return pb.UvUnregisterMemSlotResponse(rc=U.U_SUCCESS)
