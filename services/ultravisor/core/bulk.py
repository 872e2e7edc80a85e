"""UvPageInStream, UvPageOutStream and UvShareHvMemory: the bulk forms of UV_PAGE_IN and
UV_PAGE_OUT (pefsim's data plane, pefsim/dataplane.py), and the HV's offer of its memory.

Every page of a batch goes through the UV_PAGE_IN / UV_PAGE_OUT row of the call table (the same
checks, in the same order, against the same state table) and then the same per-page work
(core/page.py), under one hold of the SVM's lock per batch. A run of pages (PageRef.count) that
passes the checks at both ends and is in the common case (core/page.py: page_in_run,
page_out_run) moves together; any other run is taken page by page.
"""
from __future__ import annotations

import contextlib
import os

from pefsim.abi import PAGE_SIZE, U
from pefsim.dataplane import (MAX_FRAME_PAGES, BytesSource, FileBatch, NotHvMemory, Page, encode, runs_of,
                              split_runs)
from pefsim.v1 import ultravisor_pb2 as pb
from services.ultravisor.core.page import page_in_one, page_in_run, page_out_one, page_out_run

DEFAULT_BATCH = 32
MAX_BATCH = 64  # pages per page-out frame with data: 4 MiB, whatever batch_pages an HV asks for
MAX_SHARED_BATCH = MAX_FRAME_PAGES  # through shared memory a frame carries results only


def lock_of(svm):
    """The SVM's lock for one batch, or nothing to hold when there is no SVM (every page of the
    batch then gets the state table's answer for SVM_ABSENT)."""
    return svm.lock if svm is not None else contextlib.nullcontext()


def run_passes(uv, call, page_at, n: int, caller) -> bool:
    """Whether every page of a run passes the call-table checks (``page_at(i)``: the run's page
    i). They are checked at the run's two ends, which is every page's answer because each
    UV_PAGE_IN / UV_PAGE_OUT check is either the same for all pages of a run (caller, state, order,
    flags) or holds on an interval of addresses (calltable.py). A run that fails at an end is taken
    page by page."""
    return all(uv.table.precheck(call, page_at(i), caller)[0] is None for i in (0, n - 1))


def shared_run(uv, lpid: int, ra: int, n: int):
    """(fd, offset) of ``n`` pages from ``ra`` when they lie back to back in one shared HV file."""
    where, end = uv.hvmem.locate(lpid, ra), uv.hvmem.locate(lpid, ra + (n - 1) * PAGE_SIZE)
    if where is None or end is None or end[0] != where[0] or end[1] - where[1] != (n - 1) * PAGE_SIZE:
        return None
    return where


def batch_copies(copies: FileBatch, fd: int, offset: int):
    """Queue a run's pages (views of its frames, in order) at ``offset`` of ``fd`` on a FileBatch."""
    return lambda views: copies.add_run(fd, offset, views)


def copy_from(data):
    """Fill views, in order, from ``data`` (the run's pages back to back)."""
    def fill(views):
        at = 0
        for view in views:
            view[:] = data[at:at + len(view)]
            at += len(view)
    return fill


async def uv_page_in_stream(uv, batches, caller):
    call = uv.table.calls["UV_PAGE_IN"]
    async for frame in batches:
        hdr, payload = frame.header, frame.payload
        rcs, offset = [], 0
        svm = uv.state.svms.get(hdr.lpid)
        copies = FileBatch(os.preadv) if hdr.shared_memory else None
        async with lock_of(svm):
            for ra, gpa, flags, order, n in runs_of(hdr.pages):
                def page_at(i, ra=ra, gpa=gpa, flags=flags, order=order):
                    return Page(lpid=hdr.lpid, src_ra=ra + i * PAGE_SIZE, dest_gpa=gpa + i * PAGE_SIZE,
                                flags=flags, order=order)
                if n > 1 and svm is not None and run_passes(uv, call, page_at, n, caller):
                    data = payload[offset:offset + n * PAGE_SIZE]
                    where = shared_run(uv, hdr.lpid, ra, n) if hdr.shared_memory else None
                    fill = (batch_copies(copies, *where) if where is not None
                            else None if hdr.shared_memory or len(data) != n * PAGE_SIZE else copy_from(data))
                    if fill is not None and page_in_run(uv, svm, gpa, n, fill):
                        rcs += [U.U_SUCCESS] * n
                        offset += n * PAGE_SIZE
                        continue
                for i in range(n):
                    step = i * PAGE_SIZE
                    if hdr.shared_memory:
                        data = b""
                    else:
                        data, offset = payload[offset:offset + PAGE_SIZE], offset + PAGE_SIZE
                    rc, _ = uv.table.precheck(call, page_at(i), caller)
                    if rc is None:
                        source = (uv.hvmem.source(hdr.lpid, ra + step, copies) if hdr.shared_memory
                                  else BytesSource(data)) or BytesSource(b"")
                        rc = page_in_one(uv, svm, gpa + step, source)
                    rcs.append(int(rc))
            if copies is not None:
                copies.flush()  # every frame of the batch filled before the lock is released
        uv.table.record_batch("UvPageInStream", "UV_PAGE_IN", hdr.lpid, caller, rcs,
                                   uv.state.svm_state(hdr.lpid))
        yield pb.PageBatchResult(rc=rcs)


async def uv_page_out_stream(uv, req: pb.PageOutRequest, caller):
    call = uv.table.calls["UV_PAGE_OUT"]
    size = min(req.batch_pages or DEFAULT_BATCH, MAX_SHARED_BATCH if req.shared_memory else MAX_BATCH)
    first_index = 0
    for runs in split_runs(runs_of(req.pages), size):
        rcs, parts = [], []
        svm = uv.state.svms.get(req.lpid)
        copies = FileBatch(os.pwritev) if req.shared_memory else None
        async with lock_of(svm):
            for ra, gpa, flags, order, n in runs:
                def page_at(i, ra=ra, gpa=gpa, flags=flags, order=order):
                    return Page(lpid=req.lpid, dest_ra=ra + i * PAGE_SIZE, src_gpa=gpa + i * PAGE_SIZE,
                                flags=flags, order=order)
                if n > 1 and svm is not None and run_passes(uv, call, page_at, n, caller):
                    where = shared_run(uv, req.lpid, ra, n) if req.shared_memory else None
                    place = batch_copies(copies, *where) if where is not None else parts.extend
                    if (where is not None or not req.shared_memory) and page_out_run(uv, svm, gpa, n, place):
                        rcs += [U.U_SUCCESS] * n
                        continue
                for i in range(n):
                    step = i * PAGE_SIZE
                    rc, _ = uv.table.precheck(call, page_at(i), caller)
                    if rc is None:
                        rc, data, in_place = page_out_one(uv, svm, gpa + step, ra + step if req.shared_memory else 0,
                                                          copies)
                        if rc == U.U_SUCCESS and not in_place:
                            parts.append(data)
                    rcs.append(int(rc))
            if copies is not None:
                copies.flush()  # the HV's file holds the pages before the answer leaves
            frame = encode(pb.PageOutBatch(first=first_index, rc=rcs), parts)  # copies out under the lock
        first_index += len(rcs)
        uv.table.record_batch("UvPageOutStream", "UV_PAGE_OUT", req.lpid, caller, rcs,
                                   uv.state.svm_state(req.lpid))
        yield frame


async def uv_share_hv_memory(uv, req: pb.UvShareHvMemoryRequest, caller) -> pb.UvShareHvMemoryResponse:
    """Open the HV's RAM file for a registered slot. The HV names it, so the UV takes it only if
    it is one of the HV's RAM files for this lpid and slot, of the slot's size, in the directory
    the UV was given (pefsim/dataplane.py: HvMemory.offer); any other file is refused with U_P2,
    unopened, and the HV falls back to the stream."""
    svm = uv.state.svms[req.lpid]
    slot = svm.slots.get(req.slot_id)
    if slot is None:
        return pb.UvShareHvMemoryResponse(rc=U.U_P2, detail="no such slot")
    size = slot.npages * PAGE_SIZE
    if req.size != size:
        return pb.UvShareHvMemoryResponse(rc=U.U_P2, detail=f"size is not the slot's ({size} bytes)")
    try:
        uv.hvmem.offer(req.lpid, req.slot_id, req.path, size, req.nonce_path, req.nonce, req.ra_base)
    except NotHvMemory as exc:
        return pb.UvShareHvMemoryResponse(rc=U.U_P2, detail=str(exc))
    except OSError as exc:
        return pb.UvShareHvMemoryResponse(rc=U.U_P2, detail=f"cannot open: {exc.strerror or exc}")
    return pb.UvShareHvMemoryResponse(rc=U.U_SUCCESS)
