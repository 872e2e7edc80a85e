"""UV_REGISTER_MEM_SLOT and UV_UNREGISTER_MEM_SLOT (HV -> UV)."""
from __future__ import annotations

from pefsim.abi import U, gfn_of
from pefsim.v1 import ultravisor_pb2 as pb
from services.ultravisor.core.guard import guarded


async def uv_register_mem_slot(uv, req: pb.UvRegisterMemSlotRequest, caller) -> pb.UvRegisterMemSlotResponse:
    """Register a slot and reserve its secure memory. The UV code collapses every failure to
    U_PARAMETER: duplicate slot id, overlap with another slot, or the pool cannot reserve it."""
    svm = uv.state.svms[req.lpid]
    base, npages = gfn_of(req.start_gpa), gfn_of(req.size)
    async with guarded(uv, "UV_REGISTER_MEM_SLOT", req, svm):
        if req.slotid in svm.slots or svm.reserved + npages > uv.cfg.max_svm_pages:
            return pb.UvRegisterMemSlotResponse(rc=U.U_PARAMETER)
        for other in svm.slots.values():
            if base < other.base + other.npages and other.base < base + npages:
                return pb.UvRegisterMemSlotResponse(rc=U.U_PARAMETER)
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
