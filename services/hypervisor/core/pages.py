"""H_SVM_PAGE_IN and H_SVM_PAGE_OUT (UV -> HV): one page between HV memory and the UV.

Caller, state, order and flags are checked in calltable.py (H_UNSUPPORTED, H_P3, H_P2); the GPA
and GFN-state cases are here (H_PARAMETER), as in kvmppc_h_svm_page_in/_out.
"""
from __future__ import annotations

import asyncio
import logging

from pefsim.abi import PAGE_SHIFT, PAGE_SIZE, GfnState, H, PageInFlag, U, gfn_of, gpa_of, rc_name
from pefsim.v1 import hypervisor_pb2 as pb, ultravisor_pb2 as upb
from pefsim import faults
from services.hypervisor.core import bulk
from services.hypervisor.ports import UvUnreachable
from services.hypervisor.core.state import IN_PLACE, ZERO_PAGE

log = logging.getLogger("pefsim.hv")


async def h_svm_page_in(hv, req: pb.HSvmPageInRequest, caller) -> pb.HSvmPageInResponse:
    vm = hv.state.vms[req.lpid]
    shared = req.flags == PageInFlag.H_PAGE_IN_SHARED
    async with hv.table.guard("H_SVM_PAGE_IN", req, vm.lock):
        where = vm.locate(req.guest_pa)
        if where is None:
            return pb.HSvmPageInResponse(rc=H.H_PARAMETER)  # no memslot: no host virtual address
        slot, idx = where
        await settle_pageout(hv, vm, slot, idx)
        before = slot.state(idx)
        if shared:
            # skip_page_out: a device-backed page's secure content is abandoned, not paged out;
            # the UV maps the HV's (fresh) page. The UV_PAGE_IN carries no data.
            data = b""
        elif before == GfnState.GFN_SECURE_IN:
            return pb.HSvmPageInResponse(rc=H.H_PARAMETER)  # already paged in
        elif slot.shared:
            data = b""  # the UV reads the page at src_ra itself
        else:
            data = slot.page(idx)  # plaintext (normal/shared) or ciphertext (paged out)
        try:
            # the kernel passes the caller's gpa unchanged (no alignment check of its own)
            rc = (await hv.ucall("UV_PAGE_IN", upb.UvPageInRequest(
                lpid=vm.lpid, src_ra=slot.ra(idx), dest_gpa=req.guest_pa, flags=0,
                order=PAGE_SHIFT, data=data))).rc
        except UvUnreachable:
            return pb.HSvmPageInResponse(rc=H.H_PARAMETER)
        if rc != U.U_SUCCESS:
            return pb.HSvmPageInResponse(rc=H.H_PARAMETER)
        faults.reach("hv.esm.page_in", vm.name)
        if shared:
            hv.state.mark_shared(slot, idx)
        else:
            hv.state.mark_secure_in(slot, idx)
            hv.metrics.moved("in")
    return pb.HSvmPageInResponse(rc=H.H_SUCCESS)


async def h_svm_page_out(hv, req: pb.HSvmPageOutRequest, caller) -> pb.HSvmPageOutResponse:
    vm = hv.state.vms[req.lpid]
    async with hv.table.guard("H_SVM_PAGE_OUT", req, vm.lock):
        where = vm.locate(req.guest_pa)
        if where is None:
            return pb.HSvmPageOutResponse(rc=H.H_PARAMETER)
        slot, idx = where
        if slot.state(idx) != GfnState.GFN_SECURE_IN:
            return pb.HSvmPageOutResponse(rc=H.H_SUCCESS)  # not device-backed: nothing to do
        if not await secure_page_out(hv, vm, slot, idx):
            return pb.HSvmPageOutResponse(rc=H.H_PARAMETER)
    return pb.HSvmPageOutResponse(rc=H.H_SUCCESS)


async def secure_page_out(hv, vm, slot, idx: int) -> bool:
    """A GFN_SECURE_IN page to GFN_SECURE_OUT (H_SVM_PAGE_OUT, a host touch): True once the HV
    holds the UV's ciphertext. Called with vm.lock held.

    The UV frees its frame when it answers UV_PAGE_OUT and the ABI has no acknowledgement, so the
    HV records its intent first (``vm.pageouts_pending``, durable): an HV killed after the UV
    answered, or whose answer was lost in transport, asks again (at restart: settle_pageouts;
    before the UV pages it in: settle_pageout; at the next host touch).
    If the UV then answers U_PARAMETER, it had already paged the page out: through shared memory
    it wrote the ciphertext into the HV's RAM file before answering, so the page is there; with the
    page in the lost answer it is gone, and the VM fails with a machine check ("page-lost")
    instead of the guest reading garbage later."""
    gfn = slot.base_gfn + idx
    asked_before = gfn in vm.pageouts_pending
    if not asked_before:
        vm.pageouts_pending.add(gfn)
        hv.state.save(vm)
    try:
        resp = await hv.ucall("UV_PAGE_OUT", upb.UvPageOutRequest(
            lpid=vm.lpid, dest_ra=slot.ra(idx), src_gpa=slot.gpa(idx), flags=0, order=PAGE_SHIFT))
    except UvUnreachable:
        return False  # still pending: asked again by the next access or at restart
    if faults.reach("hv.secure.page_out", vm.name):
        return False  # the answer was lost (a failpoint): as for UvUnreachable
    data = page_of(vm, slot, idx, resp)
    if data is None and asked_before and resp.rc == U.U_PARAMETER:
        if slot.shared:
            data = IN_PLACE  # the first answer was lost; its ciphertext is in our RAM file
        else:
            log.error("lpid %d: the UV paged 0x%x out in an answer this HV lost: the page is gone",
                      vm.lpid, slot.gpa(idx))
            hv.metrics.pages_lost.inc()
            hv.state.mark_secure_out(slot, idx, ZERO_PAGE)  # as the UV has it: paged out
            vm.pageouts_pending.discard(gfn)
            hv.state.save(vm)
            hv.tasks.append(asyncio.ensure_future(hv.machine_check(vm, "page-lost")))  # not under vm.lock
            return False
    if data is not None:
        hv.metrics.moved("out")
        hv.state.mark_secure_out(slot, idx, data)
    vm.pageouts_pending.discard(gfn)
    hv.state.save(vm)
    return data is not None


async def settle_pageout(hv, vm, slot, idx: int) -> None:
    """Before the UV's H_SVM_PAGE_IN of a page whose secure page-out is still pending (its answer
    was lost, the HV stayed up): settle it first, so the page-in finds the ciphertext (or the page
    counted lost) instead of a GFN that still looks secure. Called with vm.lock held."""
    if slot.base_gfn + idx in vm.pageouts_pending and slot.state(idx) == GfnState.GFN_SECURE_IN:
        done = await secure_page_out(hv, vm, slot, idx)
        log.warning("lpid %d: page-in of gfn 0x%x with its page-out pending: %s", vm.lpid,
                    slot.base_gfn + idx, "settled" if done else "still pending or lost")


async def settle_pageouts(hv, vm) -> None:
    """After a restart: ask again for every page-out the HV had asked for but not recorded."""
    async with vm.lock:
        for gfn in sorted(vm.pageouts_pending):
            where = vm.locate(gfn << PAGE_SHIFT)
            if where is None or where[0].state(where[1]) != GfnState.GFN_SECURE_IN:
                vm.pageouts_pending.discard(gfn)  # recorded before the kill, or gone with its slot
                hv.state.save(vm)
                continue
            done = await secure_page_out(hv, vm, *where)
            log.warning("lpid %d: page-out of gfn 0x%x interrupted by a restart: %s", vm.lpid, gfn,
                        "settled" if done else "still pending or lost")


def _runs_of(gpas):
    """(first index, count) of each run of consecutive page addresses in ``gpas``."""
    if gpas and gpas == list(range(gpas[0], gpas[0] + len(gpas) * PAGE_SIZE, PAGE_SIZE)):
        yield 0, len(gpas)  # ESM's usual request: one run (compared in C, not page by page)
        return
    start = 0
    for i in range(1, len(gpas) + 1):
        if i == len(gpas) or gpas[i] != gpas[i - 1] + PAGE_SIZE:
            yield start, i - start
            start = i


async def h_svm_page_in_bulk(hv, req: pb.HSvmPageInBulkRequest, caller) -> pb.HSvmPageInBulkResponse:
    """H_SVM_PAGE_IN for many pages (flags 0): each page gets H_SVM_PAGE_IN's checks and result;
    the pages travel to the UV in batches (bulk.py). H_PAGE_IN_SHARED is H_SVM_PAGE_IN's alone
    (H_P2 here). Consecutive addresses inside one slot, none of them paged in already, are checked
    and moved as a run (the checks at its two ends: none of them depends on the address); any
    other page alone."""
    vm = hv.state.vms[req.lpid]
    call = hv.table.calls["H_SVM_PAGE_IN"]
    gpas = list(req.guest_pa)
    rcs: list[int] = [H.H_PARAMETER] * len(gpas)

    def checked(i: int):
        """H_SVM_PAGE_IN's answer for page i before the UV is asked (None: ask the UV)."""
        rc, _ = hv.table.precheck(call, pb.HSvmPageInRequest(lpid=req.lpid, guest_pa=gpas[i], flags=req.flags,
                                                                  order=req.order), caller)
        return H.H_P2 if rc is None and req.flags != PageInFlag.H_PAGE_IN_NONSHARED else rc

    todo = []
    by_page = faults.armed("hv.esm.page_in")  # a failpoint counts pages: take them one by one
    async with hv.table.guard("HSvmPageInBulk", req, vm.lock):
        asked = {gfn_of(gpa) for gpa in gpas} if vm.pageouts_pending else set()
        for gfn in sorted(vm.pageouts_pending & asked):  # pending page-outs of pages asked for
            located = vm.locate(gpa_of(gfn))
            if located is not None:
                await settle_pageout(hv, vm, *located)
        for first, n in _runs_of(gpas):
            located = vm.locate(gpas[first])
            if (n > 1 and not by_page and located is not None and located[1] + n <= located[0].npages
                    and located[0].gpa(located[1]) == gpas[first] and checked(first) is None
                    and checked(first + n - 1) is None and located[0].all_in(located[1], n, GfnState.GFN_NORMAL)):
                todo.append((*located, n, first))
                continue
            for i in range(first, first + n):
                rc = checked(i)
                located = vm.locate(gpas[i]) if rc is None else None
                if rc is None and (located is None or located[0].state(located[1]) == GfnState.GFN_SECURE_IN
                                   or located[0].gpa(located[1]) != gpas[i]):
                    rc = H.H_PARAMETER  # no memslot, already in, or unaligned (the UV answers U_P3)
                if rc is not None:
                    rcs[i] = rc
                else:
                    todo.append((*located, 1, i))
        try:
            async for batch, results in bulk.page_in(hv, vm, todo):
                done = 0
                for slot, idx, n, pos in batch:
                    got = results[done:done + n]
                    done += n
                    if not by_page and got.count(U.U_SUCCESS) == n:
                        hv.state.mark_secure_in_run(slot, idx, n)
                        hv.metrics.moved("in", n)
                        rcs[pos:pos + n] = [H.H_SUCCESS] * n
                        continue
                    for i, rc in enumerate(got):
                        if rc == U.U_SUCCESS:
                            faults.reach("hv.esm.page_in", vm.name)
                            hv.state.mark_secure_in(slot, idx + i)
                            hv.metrics.moved("in")
                            rcs[pos + i] = H.H_SUCCESS
        except UvUnreachable:
            pass  # the pages not answered stay normal, with their data: H_PARAMETER
    first_bad = next((rc for rc in rcs if rc != H.H_SUCCESS), H.H_SUCCESS)
    return pb.HSvmPageInBulkResponse(rc=first_bad, rcs=rcs)


async def take_page(hv, vm, slot, idx: int) -> bytes | None:
    """UV_PAGE_OUT of a GFN_SECURE_IN page: its content (ciphertext, or plaintext while the SVM
    is aborting), or None if the UV refused or sent no whole page (logged). Raises UvUnreachable
    if the ucall failed in transport (the page may still be in the UV: the caller may ask again).
    Called with vm.lock held; the caller decides the GFN's next state."""
    resp = await hv.ucall("UV_PAGE_OUT", upb.UvPageOutRequest(
        lpid=vm.lpid, dest_ra=slot.ra(idx), src_gpa=slot.gpa(idx), flags=0, order=PAGE_SHIFT))
    data = page_of(vm, slot, idx, resp)
    if data is not None:
        hv.metrics.moved("out")
    return data


def page_of(vm, slot, idx: int, resp) -> bytes | None:
    """The page a UV_PAGE_OUT answer gives (IN_PLACE when the UV wrote it into our RAM file), or
    None if it refused or sent no whole page (logged)."""
    if resp.rc == U.U_SUCCESS and resp.in_place and slot.shared:
        return IN_PLACE
    if resp.rc != U.U_SUCCESS or len(resp.data) != PAGE_SIZE:
        log.error("lpid %d: UV_PAGE_OUT(0x%x) -> %s, %d bytes", vm.lpid, slot.gpa(idx),
                  rc_name(resp.rc, U), len(resp.data))
        return None
    return resp.data
