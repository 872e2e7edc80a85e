"""UV_PAGE_IN, UV_PAGE_OUT and UV_PAGE_INVAL (HV -> UV).

Arguments checked before the SVM state (order, page addresses) are in calltable.py; what depends
on the page's GPF state is here, following the table at the top of state.py.
"""
from __future__ import annotations

from pefsim import faults
from pefsim.abi import PAGE_SIZE, GpfState, SvmState, U, gfn_of, page_aligned
from pefsim.v1 import ultravisor_pb2 as pb


def _gpf_of(svm, gpa: int):
    """The GPF record for a page-aligned GPA inside a registered slot, else None (-> U_P3)."""
    if not page_aligned(gpa) or not svm.in_slots(gpa):
        return None
    return svm.gpf(gfn_of(gpa))


async def uv_page_in(uv, req: pb.UvPageInRequest, caller) -> pb.UvPageInResponse:
    svm = uv.state.svms[req.lpid]
    gpf = _gpf_of(svm, req.dest_gpa)
    if gpf is None:
        return pb.UvPageInResponse(rc=U.U_P3)
    gfn = gfn_of(req.dest_gpa)
    async with svm.lock:
        st = gpf.state
        if st in (GpfState.GPF_HV_SHARING, GpfState.GPF_SHARED, GpfState.GPF_SHARED_INV):
            uv.state.mark_shared(gpf)  # the share callback: map the HV page
        elif st == GpfState.GPF_HV_UNSHARING:
            uv.state.mark_secure(gpf, None)  # unshare: a fresh zeroed secure page, no copy
        elif len(req.data) != PAGE_SIZE:
            return pb.UvPageInResponse(rc=U.U_P2)  # no page at src_ra
        elif st == GpfState.GPF_PAGEDOUT:
            if not uv.state.page_in_sealed(svm, gfn, gpf, req.data):
                return pb.UvPageInResponse(rc=U.U_P3)  # tampered or replayed: hypervisor tampering
        elif st == GpfState.GPF_SECURE and svm.state == SvmState.SVM_SECURE:
            return pb.UvPageInResponse(rc=U.U_P2)  # page-in of a page that is not paged out
        else:  # UNBACKED, or SECURE again during ESM: plain copy
            uv.state.mark_secure(gpf, req.data)
        uv.metrics.moved("in")
    return pb.UvPageInResponse(rc=U.U_SUCCESS)


async def uv_page_out(uv, req: pb.UvPageOutRequest, caller) -> pb.UvPageOutResponse:
    svm = uv.state.svms[req.lpid]
    gpf = _gpf_of(svm, req.src_gpa)
    if gpf is None:
        return pb.UvPageOutResponse(rc=U.U_P3)
    async with svm.lock:
        if gpf.state == GpfState.GPF_HV_UNSHARING:
            return pb.UvPageOutResponse(rc=U.U_RETRY)  # HV thinks secure, UV not committed yet
        if gpf.state != GpfState.GPF_SECURE:
            return pb.UvPageOutResponse(rc=U.U_PARAMETER)
        uv.metrics.moved("out")
        if svm.state == SvmState.SVM_ABORT and faults.mutant("uv-abort-pageout-no-data"):
            return pb.UvPageOutResponse(rc=U.U_SUCCESS)
        if svm.state == SvmState.SVM_ABORT:
            # The guest resumes as a normal VM and needs its content back. The SVM never went
            # secure, so nothing the HV did not already have leaves the UV. The page stays
            # until UV_SVM_TERMINATE, so asking again (an HV that lost the answer) is harmless.
            return pb.UvPageOutResponse(rc=U.U_SUCCESS, data=bytes(uv.state.pool.view(gpf.frame)))
        plain = bytes(uv.state.pool.view(gpf.frame)) if faults.mutant("uv-pageout-plaintext") else None
        sealed = uv.state.page_out(svm, gfn_of(req.src_gpa), gpf)
    return pb.UvPageOutResponse(rc=U.U_SUCCESS, data=plain or sealed)


async def uv_page_inval(uv, req: pb.UvPageInvalRequest, caller) -> pb.UvPageInvalResponse:
    svm = uv.state.svms[req.lpid]
    gpf = _gpf_of(svm, req.guest_pa)
    if gpf is None:
        return pb.UvPageInvalResponse(rc=U.U_P3)  # UV code; the doc says U_P2
    async with svm.lock:
        if gpf.state == GpfState.GPF_SHARED:
            uv.state.mark_shared_inv(gpf)
        elif gpf.state != GpfState.GPF_SHARED_INV:  # already invalid: no-op success
            return pb.UvPageInvalResponse(rc=U.U_P2)  # a secure page: the UV ignores it
    return pb.UvPageInvalResponse(rc=U.U_SUCCESS)
