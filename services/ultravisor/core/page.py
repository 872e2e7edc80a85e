"""UV_PAGE_IN, UV_PAGE_OUT and UV_PAGE_INVAL (HV -> UV).

Arguments checked before the SVM state (order, page addresses) are in calltable.py; what depends
on the page's GPF state is here, following the table at the top of state.py. ``page_in_one`` and
``page_out_one`` are each page's work, shared with the bulk calls (core/bulk.py), so a page gets
the same transition and result whichever way it travels; ``page_in_run`` and ``page_out_run``
take a run of pages in the one common case of each (ESM's page-in of unbacked pages, the abort's
page-out) together, giving every page what the one-page functions would, and decline any other
case (tests/unit/test_page_runs.py holds them to that).
"""
from __future__ import annotations

from pefsim import faults
from pefsim.abi import GpfState, SvmState, U, gfn_of, page_aligned
from pefsim.dataplane import BytesSource
from pefsim.v1 import ultravisor_pb2 as pb
from services.ultravisor.core.state import NO_FRAME
from services.ultravisor.core.guard import guarded


def _gpf_of(svm, gpa: int):
    """The GPF record for a page-aligned GPA inside a registered slot, else None (-> U_P3)."""
    if not page_aligned(gpa) or not svm.in_slots(gpa):
        return None
    return svm.gpf(gfn_of(gpa))


def page_source(uv, lpid: int, src_ra: int, data):
    """Where a page-in's data is: in the call, or (no data, shared memory) at src_ra in the HV's
    memory, which the UV reads itself as the hardware's UV_PAGE_IN does."""
    if not len(data):
        shared = uv.hvmem.source(lpid, src_ra)
        if shared is not None:
            return shared
    return BytesSource(data)


def page_in_one(uv, svm, gpa: int, source) -> int:
    """One page's UV_PAGE_IN after the call-table checks. Called with svm.lock held."""
    gpf = _gpf_of(svm, gpa)
    if gpf is None:
        return U.U_P3
    st = gpf.state
    if st in (GpfState.GPF_HV_SHARING, GpfState.GPF_SHARED, GpfState.GPF_SHARED_INV):
        uv.state.mark_shared(gpf)  # the share callback: map the HV page
        return U.U_SUCCESS
    if st == GpfState.GPF_HV_UNSHARING:
        uv.state.mark_secure(gpf, None)  # unshare: a fresh zeroed secure page, no copy
        return U.U_SUCCESS
    if not source.whole():
        return U.U_P2  # no page at src_ra
    if st == GpfState.GPF_PAGEDOUT:
        if not uv.state.page_in_sealed(svm, gfn_of(gpa), gpf, source.read()):
            return U.U_P3  # tampered or replayed: hypervisor tampering
    elif st == GpfState.GPF_SECURE and svm.state == SvmState.SVM_SECURE:
        return U.U_P2  # page-in of a page that is not paged out
    else:  # UNBACKED, or SECURE again during ESM: plain copy
        uv.state.mark_secure(gpf, source)
    uv.metrics.moved("in")
    return U.U_SUCCESS


def page_out_one(uv, svm, gpa: int, dest_ra: int = 0, batch=None) -> tuple[int, object, bool]:
    """One page's UV_PAGE_OUT after the call-table checks: (rc, data, in_place). With the HV's
    memory shared, the page is written at dest_ra (now, or at ``batch``'s flush: a FileBatch) and
    no data travels. Called with svm.lock held."""
    gpf = _gpf_of(svm, gpa)
    if gpf is None:
        return U.U_P3, b"", False
    if gpf.state == GpfState.GPF_HV_UNSHARING:
        return U.U_RETRY, b"", False  # HV thinks secure, UV not committed yet
    if gpf.state != GpfState.GPF_SECURE:
        return U.U_PARAMETER, b"", False
    uv.metrics.moved("out")
    if svm.state == SvmState.SVM_ABORT:
        # The guest resumes as a normal VM and needs its content back. The SVM never went
        # secure, so nothing the HV did not already have leaves the UV. The page stays until
        # UV_SVM_TERMINATE, so asking again (an HV that lost the answer) is harmless.
        if faults.mutant("uv-abort-pageout-no-data"):
            return U.U_SUCCESS, b"", False
        data = uv.state.pool.view(gpf.frame)
        if faults.mutant("uv-frees-on-page-out"):
            data = bytes(data)
            uv.state.forget_page(gpf)
    else:
        plain = bytes(uv.state.pool.view(gpf.frame)) if faults.mutant("uv-pageout-plaintext") else None
        data = plain or uv.state.page_out(svm, gfn_of(gpa), gpf)
    if dest_ra and uv.hvmem.write(svm.lpid, dest_ra, data, batch):
        return U.U_SUCCESS, b"", True
    return U.U_SUCCESS, data, False


def _one_slot(svm, gpa: int, n: int):
    """(the slot's pages, index of ``gpa`` in it) when n pages from ``gpa`` are page-aligned and
    all inside one registered slot, else None."""
    if not page_aligned(gpa):
        return None
    slot = svm.pages_of(gfn_of(gpa))
    if slot is None or not slot.contains(gfn_of(gpa) + n - 1):
        return None
    return slot, gfn_of(gpa) - slot.base


def page_in_run(uv, svm, gpa: int, n: int, fill) -> bool:
    """UV_PAGE_IN of ``n`` pages at consecutive GPAs from ``gpa`` when every one is UNBACKED (ESM
    paging a guest in) and its data is whole: each -> GPF_SECURE on a fresh frame, which
    ``fill(views)`` fills (the frames in order, SecurePool.views); each page's result is
    U_SUCCESS, as page_in_one would give it. False, with nothing changed, for any other case: the
    caller then takes the pages one by one. Called after the call-table checks passed for the
    run, with svm.lock held."""
    where = _one_slot(svm, gpa, n)
    if where is None:
        return False
    slot, i = where
    if not slot.all_in(i, n, GpfState.GPF_UNBACKED) or slot.frames[i:i + n].count(NO_FRAME) != n:
        return False
    fill(uv.state.mark_secure_run(svm, gfn_of(gpa), n))
    uv.metrics.moved("in", n)
    return True


def page_out_run(uv, svm, gpa: int, n: int, place) -> bool:
    """UV_PAGE_OUT of ``n`` pages at consecutive GPAs from ``gpa`` of an aborting SVM when every
    one is GPF_SECURE: ``place(views)`` gets their frames, in order (SecurePool.views: the
    plaintext, kept until UV_SVM_TERMINATE); each page's result is U_SUCCESS, as page_out_one
    would give it. False, with nothing done, for any other case (a secure SVM's pages are
    encrypted one by one by page_out_one). Called after the call-table checks passed for the run,
    with svm.lock held."""
    where = _one_slot(svm, gpa, n) if svm.state == SvmState.SVM_ABORT else None
    if where is None or faults.mutant("uv-abort-pageout-no-data") or faults.mutant("uv-frees-on-page-out"):
        return False
    slot, i = where
    if not slot.all_in(i, n, GpfState.GPF_SECURE):
        return False
    place(uv.state.pool.views(slot.frames[i:i + n].tolist()))
    uv.metrics.moved("out", n)
    return True


async def uv_page_in(uv, req: pb.UvPageInRequest, caller) -> pb.UvPageInResponse:
    svm = uv.state.svms[req.lpid]
    async with guarded(uv, "UV_PAGE_IN", req, svm):
        rc = page_in_one(uv, svm, req.dest_gpa, page_source(uv, req.lpid, req.src_ra, req.data))
    return pb.UvPageInResponse(rc=rc)


async def uv_page_out(uv, req: pb.UvPageOutRequest, caller) -> pb.UvPageOutResponse:
    svm = uv.state.svms[req.lpid]
    async with guarded(uv, "UV_PAGE_OUT", req, svm):
        rc, data, in_place = page_out_one(uv, svm, req.src_gpa, req.dest_ra)
    return pb.UvPageOutResponse(rc=rc, data=bytes(data), in_place=in_place)


async def uv_page_inval(uv, req: pb.UvPageInvalRequest, caller) -> pb.UvPageInvalResponse:
    svm = uv.state.svms[req.lpid]
    async with guarded(uv, "UV_PAGE_INVAL", req, svm):
        gpf = _gpf_of(svm, req.guest_pa)  # under the lock: the slot cannot go meanwhile
        if gpf is None:
            return pb.UvPageInvalResponse(rc=U.U_P3)  # UV code; the doc says U_P2
        if gpf.state == GpfState.GPF_SHARED:
            uv.state.mark_shared_inv(gpf)
        elif gpf.state != GpfState.GPF_SHARED_INV:  # already invalid: no-op success
            return pb.UvPageInvalResponse(rc=U.U_P2)  # a secure page: the UV ignores it
    return pb.UvPageInvalResponse(rc=U.U_SUCCESS)


