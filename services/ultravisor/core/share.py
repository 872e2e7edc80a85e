"""UV_SHARE_PAGE, UV_UNSHARE_PAGE and UV_UNSHARE_ALL_PAGES (SVM -> UV).

Share: every page of the range goes HV_SHARING -> H_SVM_PAGE_IN(gpa, H_PAGE_IN_SHARED) -> (the HV
calls UV_PAGE_IN) -> SHARED; then the UV zeroes each page (the firmware does; the HV's kernel does
not). A paged-out page is first paged back
in (at most SHARE_PAGE_IN_TRIES times). Each page keeps its secure frame, untouched, until every
page of the call is shared; only then are the frames scrubbed. A share that fails (U_P2, also
when a paged-out page would not come back in: the firmware's code) leaves every page as it was, content and state (``_put_back``): the HV is asked to
unshare what it already mapped, and the UV puts the page back on its frame even if the HV cannot
(the HV keeps a stale mapping of a zeroed page, nothing of the SVM's). A page paged back in for
the call stays in (its content is the same).
Unshare: each shared page goes HV_UNSHARING -> H_SVM_PAGE_IN(gpa, 0) -> SECURE (zeroed); a page
whose unshare fails stays SHARED or SHARED_INV as it was. Page by page: a failed range leaves the
pages before it unshared (their shared content is the HV's and gone), so repeating the call
finishes it (a page no longer shared is skipped).
"""
from __future__ import annotations

import contextlib
import functools

from pefsim.abi import PAGE_SHIFT, PAGE_SIZE, Errno, GpfState, H, PageInFlag, U, gpa_of
from pefsim.v1 import hypervisor_pb2 as hpb, ultravisor_pb2 as pb
from services.ultravisor.core.hv import HvUnreachable, hcall
from services.ultravisor.core.state import NoSlot

ZERO_PAGE = bytes(PAGE_SIZE)

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
    except HvUnreachable:
        return H.H_HARDWARE  # HV unreachable: the share fails like a refused page-in


def _range(svm, gfn: int, npages: int):
    gfns = range(gfn, gfn + npages)
    if npages == 0 or any(svm.pages_of(g) is None for g in gfns):
        return None
    return gfns


async def unshare_one(uv, svm, gfn: int) -> bool:
    gpf = svm.gpf(gfn)
    before = gpf.state
    if before not in SHARED:
        return True
    uv.state.mark_unsharing(gpf)
    rc = await _h_page_in(uv, svm.lpid, gfn, PageInFlag.H_PAGE_IN_NONSHARED)
    if rc != H.H_SUCCESS or gpf.state != GpfState.GPF_SECURE:
        uv.state.put_back(gpf, before)  # the HV still has it shared (or invalidated) as before
        return False
    return True


@u_p2_if_a_slot_goes(pb.UvSharePageResponse)
async def uv_share_page(uv, req: pb.UvSharePageRequest, caller) -> pb.UvSharePageResponse:
    svm = uv.state.svms[req.vcpu.lpid]
    gfns = _range(svm, req.gfn, req.npages)
    if gfns is None or any(svm.gpf(g).state in TRANSIENT for g in gfns):
        return pb.UvSharePageResponse(rc=U.U_P2)
    changed: list[tuple[int, int]] = []  # (gfn, its state before), in the order they changed
    for gfn in gfns:
        gpf = svm.gpf(gfn)
        if gpf.state in SHARED:
            continue  # already shared: skipped
        for _ in range(SHARE_PAGE_IN_TRIES):
            if gpf.state != GpfState.GPF_PAGEDOUT:
                break
            await _h_page_in(uv, svm.lpid, gfn, PageInFlag.H_PAGE_IN_NONSHARED)
        if gpf.state == GpfState.GPF_PAGEDOUT:  # the firmware gives up with U_P2 (svm_host.c:1044-1046)
            await _put_back(uv, svm, changed)
            return pb.UvSharePageResponse(rc=U.U_P2)
        changed.append((gfn, gpf.state))
        uv.state.mark_sharing(gpf)
        rc = await _h_page_in(uv, svm.lpid, gfn, PageInFlag.H_PAGE_IN_SHARED)
        if rc != H.H_SUCCESS or gpf.state != GpfState.GPF_SHARED:
            await _put_back(uv, svm, changed)
            return pb.UvSharePageResponse(rc=U.U_P2)
        uv.metrics.moved("shared")
    # "Zero the pages before returning" (ultravisor.rst; the firmware's commit_all_gfns_as_shared
    # memsets them): the UV zeroes what the HV mapped, not trusting the HV to have (the kernel
    # does not), so the SVM never reads stale host data through a page it just shared
    for gfn, _ in changed:
        try:
            resp = await hcall(uv, "VcpuStore", hpb.VcpuStoreRequest(lpid=svm.lpid, gpa=gpa_of(gfn), data=ZERO_PAGE))
        except HvUnreachable:
            resp = None
        if resp is None or resp.errno != Errno.OK:
            await _put_back(uv, svm, changed)
            return pb.UvSharePageResponse(rc=U.U_P2)
    for gfn, _ in changed:  # every page is shared: the frames they kept go
        uv.state.drop_kept_frame(svm.gpf(gfn))
    return pb.UvSharePageResponse(rc=U.U_SUCCESS)


async def _put_back(uv, svm, changed: list[tuple[int, int]]) -> None:
    """A share that failed: every page it changed as it was before, last first. One the HV mapped
    is unshared at the HV first, so both sides agree (its content saved across that, which zeroes
    the frame); whether or not the HV manages, the UV puts the page back: the guest's call failed,
    so the page is the guest's again. A page whose memslot went away meanwhile has nothing to put
    back."""
    for gfn, before in reversed(changed):
        with contextlib.suppress(NoSlot):
            gpf = svm.gpf(gfn)
            content = None
            if gpf.state in SHARED:
                content = bytes(uv.state.pool.view(gpf.frame)) if gpf.frame is not None else None
                await unshare_one(uv, svm, gfn)
            uv.state.put_back(gpf, before, content)


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
