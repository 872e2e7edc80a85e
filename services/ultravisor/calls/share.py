"""UV_SHARE_PAGE, UV_UNSHARE_PAGE and UV_UNSHARE_ALL_PAGES (SVM -> UV).

Share: every page of the range goes HV_SHARING -> H_SVM_PAGE_IN(gpa, H_PAGE_IN_SHARED) -> (the HV
calls UV_PAGE_IN) -> SHARED; its secure frame is scrubbed and the HV hands a zeroed page. A
paged-out page is first paged back in (at most SHARE_PAGE_IN_TRIES times). On any failure the
pages already shared are unshared again and the result is U_P2.
Unshare: each shared page goes HV_UNSHARING -> H_SVM_PAGE_IN(gpa, 0) -> SECURE (zeroed).
"""
from __future__ import annotations

import functools

from pefsim.abi import PAGE_SHIFT, GpfState, H, PageInFlag, U, gpa_of
from pefsim.v1 import hypervisor_pb2 as hpb, ultravisor_pb2 as pb
from services.ultravisor.esm import EsmFailed, hcall
from services.ultravisor.state import NoSlot

SHARE_PAGE_IN_TRIES = 4
TRANSIENT = (GpfState.GPF_HV_SHARING, GpfState.GPF_HV_UNSHARING)
SHARED = (GpfState.GPF_SHARED, GpfState.GPF_SHARED_INV)


def u_p2_if_a_slot_goes(response):
    """A share or unshare whose memslot the HV unregisters (or whose SVM it terminates) while
    the call waits on an H_SVM_PAGE_IN fails like any other: U_P2."""
    def wrap(handler):
        @functools.wraps(handler)
        async def guarded(uv, req, caller):
            try:
                return await handler(uv, req, caller)
            except NoSlot:
                return response(rc=U.U_P2)
        return guarded
    return wrap


async def _h_page_in(uv, lpid: int, gfn: int, flags: int) -> int:
    try:
        return (await hcall(uv, "H_SVM_PAGE_IN", hpb.HSvmPageInRequest(
            lpid=lpid, guest_pa=gpa_of(gfn), flags=flags, order=PAGE_SHIFT))).rc
    except EsmFailed:
        return H.H_HARDWARE  # HV unreachable: the share fails like a refused page-in


def _range(svm, gfn: int, npages: int):
    gfns = range(gfn, gfn + npages)
    if npages == 0 or any(svm.pages_of(g) is None for g in gfns):
        return None
    return gfns


async def unshare_one(uv, svm, gfn: int) -> bool:
    gpf = svm.gpf(gfn)
    if gpf.state not in SHARED:
        return True
    uv.state.mark_unsharing(gpf)
    rc = await _h_page_in(uv, svm.lpid, gfn, PageInFlag.H_PAGE_IN_NONSHARED)
    if rc != H.H_SUCCESS or gpf.state != GpfState.GPF_SECURE:
        uv.state.mark_shared(gpf)  # the HV still has it shared
        return False
    return True


@u_p2_if_a_slot_goes(pb.UvSharePageResponse)
async def uv_share_page(uv, req: pb.UvSharePageRequest, caller) -> pb.UvSharePageResponse:
    svm = uv.state.svms[req.vcpu.lpid]
    gfns = _range(svm, req.gfn, req.npages)
    if gfns is None or any(svm.gpf(g).state in TRANSIENT for g in gfns):
        return pb.UvSharePageResponse(rc=U.U_P2)
    done: list[int] = []
    for gfn in gfns:
        gpf = svm.gpf(gfn)
        if gpf.state in SHARED:
            continue  # already shared: skipped
        for _ in range(SHARE_PAGE_IN_TRIES):
            if gpf.state != GpfState.GPF_PAGEDOUT:
                break
            await _h_page_in(uv, svm.lpid, gfn, PageInFlag.H_PAGE_IN_NONSHARED)
        if gpf.state == GpfState.GPF_PAGEDOUT:
            await _undo(uv, svm, done)
            return pb.UvSharePageResponse(rc=U.U_RETRY)
        uv.state.mark_sharing(gpf)
        rc = await _h_page_in(uv, svm.lpid, gfn, PageInFlag.H_PAGE_IN_SHARED)
        if rc != H.H_SUCCESS or gpf.state != GpfState.GPF_SHARED:
            uv.state.revert_sharing(gpf)
            await _undo(uv, svm, done)
            return pb.UvSharePageResponse(rc=U.U_P2)
        uv.metrics.moved("shared")
        done.append(gfn)
    return pb.UvSharePageResponse(rc=U.U_SUCCESS)


async def _undo(uv, svm, gfns: list[int]) -> None:
    for gfn in gfns:
        await unshare_one(uv, svm, gfn)


@u_p2_if_a_slot_goes(pb.UvUnsharePageResponse)
async def uv_unshare_page(uv, req: pb.UvUnsharePageRequest, caller) -> pb.UvUnsharePageResponse:
    svm = uv.state.svms[req.vcpu.lpid]
    gfns = _range(svm, req.gfn, req.npages)
    if gfns is None or any(svm.gpf(g).state in TRANSIENT for g in gfns):
        return pb.UvUnsharePageResponse(rc=U.U_P2)
    for gfn in gfns:
        if not await unshare_one(uv, svm, gfn):
            return pb.UvUnsharePageResponse(rc=U.U_P2)
    return pb.UvUnsharePageResponse(rc=U.U_SUCCESS)


@u_p2_if_a_slot_goes(pb.UvUnshareAllPagesResponse)
async def uv_unshare_all_pages(uv, req: pb.UvUnshareAllPagesRequest, caller) -> pb.UvUnshareAllPagesResponse:
    svm = uv.state.svms[req.vcpu.lpid]
    shared = sorted(svm.gfns_in(*SHARED))
    for gfn in shared:
        if not await unshare_one(uv, svm, gfn):
            return pb.UvUnshareAllPagesResponse(rc=U.U_P2)
    return pb.UvUnshareAllPagesResponse(rc=U.U_SUCCESS)
