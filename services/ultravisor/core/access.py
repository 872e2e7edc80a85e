"""Not ucalls: the secure vCPU's loads and stores (SvmLoad, SvmStore), the UV's own eviction of a
page (UvEvictPage -> H_SVM_PAGE_OUT) and introspection (UvStatus: everything for the operator and
the HV, a guest's own SVMs for a guest).

A load or store goes through the SVM's partition-scoped table: a secure page is read from the
pool; an unbacked one is backed with zeros on first touch; a paged-out one is faulted back in
with H_SVM_PAGE_IN (the HV hands the ciphertext back with UV_PAGE_IN); a shared one is the HV's
page, reached through the HV.
"""
from __future__ import annotations


from pefsim import clock
from pefsim.dataplane import MAX_DATA_PAGES
from pefsim.abi import (PAGE_SHIFT, PAGE_SIZE, Errno, GpfState, H, PageInFlag, Role, SvmState, U,
                        gfn_of, gpa_of)
from pefsim.v1 import hypervisor_pb2 as hpb, ultravisor_pb2 as pb
from services.ultravisor.core.share import _h_page_in
from services.ultravisor.core.hv import HvUnreachable, hcall
from services.ultravisor.core.state import NoSlot

MAX_ACCESS_PAGES = 64  # pages per SvmLoad (4 MiB answers)
MAX_STORE_PAGES = MAX_DATA_PAGES  # pages per SvmStore (a request: 512 KiB, rpc.MAX_REQUEST_BYTES)


class AccessFault(Exception):
    def __init__(self, rc: int):
        super().__init__(rc)
        self.rc = rc


async def _resolve(uv, svm, gfn: int):
    """Make the page reachable; returns its GPF record (SECURE with a frame, or SHARED)."""
    gpf = svm.gpf(gfn)
    if gpf.state == GpfState.GPF_PAGEDOUT:
        rc = await _h_page_in(uv, svm.lpid, gfn, PageInFlag.H_PAGE_IN_NONSHARED)
        if rc != H.H_SUCCESS or gpf.state != GpfState.GPF_SECURE:
            raise AccessFault(U.U_RETRY)
    elif gpf.state == GpfState.GPF_SHARED_INV:
        rc = await _h_page_in(uv, svm.lpid, gfn, PageInFlag.H_PAGE_IN_SHARED)
        if rc != H.H_SUCCESS or gpf.state != GpfState.GPF_SHARED:
            raise AccessFault(U.U_RETRY)
    elif gpf.state == GpfState.GPF_UNBACKED:
        async with svm.lock:
            uv.state.mark_secure(gpf, None)
    elif gpf.state in (GpfState.GPF_HV_SHARING, GpfState.GPF_HV_UNSHARING):
        raise AccessFault(U.U_BUSY)
    return gpf


async def _hv(uv, name: str, request):
    try:
        resp = await hcall(uv, name, request)
    except HvUnreachable:
        raise AccessFault(U.U_RETRY) from None
    if resp.errno != Errno.OK:
        raise AccessFault(U.U_P2)
    return resp


def _pages(svm, gpa: int, npages: int):
    gfns = range(gfn_of(gpa), gfn_of(gpa) + npages)
    if any(svm.pages_of(g) is None for g in gfns):
        raise AccessFault(U.U_PARAMETER)
    return gfns


async def svm_load(uv, req: pb.SvmLoadRequest, caller) -> pb.SvmLoadResponse:
    svm = uv.state.svms[req.vcpu.lpid]
    out = bytearray()
    try:
        for gfn in _pages(svm, req.gpa, req.npages):
            gpf = await _resolve(uv, svm, gfn)
            if gpf.state == GpfState.GPF_SHARED:
                out += (await _hv(uv, "VcpuLoad", hpb.VcpuLoadRequest(
                    lpid=svm.lpid, gpa=gpa_of(gfn), npages=1))).data
            else:
                out += uv.state.pool.view(gpf.frame)
    except AccessFault as fault:
        return pb.SvmLoadResponse(rc=fault.rc)
    except NoSlot:  # a memslot went away while a page was fetched from the HV
        return pb.SvmLoadResponse(rc=U.U_PARAMETER)
    return pb.SvmLoadResponse(rc=U.U_SUCCESS, data=bytes(out))


async def svm_store(uv, req: pb.SvmStoreRequest, caller) -> pb.SvmStoreResponse:
    svm = uv.state.svms[req.vcpu.lpid]
    data = memoryview(req.data)
    try:
        for i, gfn in enumerate(_pages(svm, req.gpa, len(data) >> PAGE_SHIFT)):
            page = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            gpf = await _resolve(uv, svm, gfn)
            if gpf.state == GpfState.GPF_SHARED:
                await _hv(uv, "VcpuStore", hpb.VcpuStoreRequest(lpid=svm.lpid, gpa=gpa_of(gfn),
                                                                 data=bytes(page)))
            else:
                uv.state.pool.view(gpf.frame)[:] = page
    except AccessFault as fault:
        return pb.SvmStoreResponse(rc=fault.rc)
    except NoSlot:  # a memslot went away while a page was fetched from the HV
        return pb.SvmStoreResponse(rc=U.U_PARAMETER)
    return pb.SvmStoreResponse(rc=U.U_SUCCESS)


async def uv_evict_page(uv, req: pb.UvEvictPageRequest, caller) -> pb.UvEvictPageResponse:
    """The UV gives a secure page to the HV (H_SVM_PAGE_OUT); the HV takes the ciphertext."""
    try:
        resp = await hcall(uv, "H_SVM_PAGE_OUT", hpb.HSvmPageOutRequest(
            lpid=req.lpid, guest_pa=req.gpa, flags=0, order=PAGE_SHIFT))
    except HvUnreachable:
        return pb.UvEvictPageResponse(rc=H.H_HARDWARE)
    return pb.UvEvictPageResponse(rc=resp.rc)


SEES_EVERY_SVM = frozenset({Role.ROLE_OPERATOR, Role.ROLE_HV, Role.ROLE_UV})


async def uv_status(uv, req: pb.UvStatusRequest, caller) -> pb.UvStatusResponse:
    """What the UV holds, as much as the caller may see: the operator and the HV (which runs
    every VM anyway) see every SVM, the pool and every terminated lpid the UV remembers; a guest
    sees only its own SVMs and terminated lpids (owner: the identity that made UV_ESM), not the
    pool (how much secure memory the others use); anyone else, nothing but the boot id."""
    st, now = uv.state, clock.wall_ns()
    everything = caller.role in SEES_EVERY_SVM
    owner = caller.name if caller.role == Role.ROLE_GUEST else None
    if not everything and owner is None:
        return pb.UvStatusResponse(boot_id=st.boot_id)
    svms = [pb.SvmInfo(
        lpid=s.lpid, state=SvmState(s.state).name,
        secure_pages=s.frames, reserved_pages=s.reserved,
        pagedout_pages=s.count(GpfState.GPF_PAGEDOUT),
        shared_pages=s.count(GpfState.GPF_SHARED) + s.count(GpfState.GPF_SHARED_INV),
        memslots=len(s.slots),
        abort_pending_s=(now - s.abort_issued_ns) / 1e9 if s.abort_issued_ns else 0.0,
        unanswered_hcall=s.unanswered[0] if s.unanswered else "",
        unanswered_s=(now - s.unanswered[1]) / 1e9 if s.unanswered else 0.0,
    ) for s in sorted(st.svms.values(), key=lambda s: s.lpid) if everything or s.owner == owner]
    if not everything:
        return pb.UvStatusResponse(svms=svms, terminated_lpids=st.terminated_lpids(owner), boot_id=st.boot_id)
    return pb.UvStatusResponse(pool_pages_total=st.pool.total, pool_pages_in_use=st.pool.in_use,
                               pool_pages_reserved=st.pool.reserved, svms=svms,
                               terminated_lpids=st.terminated_lpids(), boot_id=st.boot_id)
