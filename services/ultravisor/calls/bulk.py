"""UvPageInStream, UvPageOutStream and UvShareHvMemory: the bulk forms of UV_PAGE_IN and
UV_PAGE_OUT (pefsim's data plane, pefsim/dataplane.py), and the HV's offer of its memory.

Every page of a batch goes through the UV_PAGE_IN / UV_PAGE_OUT row of the call table (the same
checks, in the same order, against the same state table) and then the same per-page work
(calls/page.py), under one hold of the SVM's lock per batch.
"""
from __future__ import annotations

import contextlib
import os

from pefsim.abi import PAGE_SIZE, U
from pefsim.dataplane import BytesSource, FileBatch, Page, encode
from pefsim.v1 import ultravisor_pb2 as pb
from services.ultravisor.calls.page import page_in_one, page_out_one

DEFAULT_BATCH = 32
MAX_BATCH = 64  # pages per page-out frame with data: 4 MiB, whatever batch_pages an HV asks for
MAX_SHARED_BATCH = 1024  # through shared memory a frame carries results only


def lock_of(svm):
    """The SVM's lock for one batch, or nothing to hold when there is no SVM (every page of the
    batch then gets the state table's answer for SVM_ABSENT)."""
    return svm.lock if svm is not None else contextlib.nullcontext()


async def uv_page_in_stream(uv, batches, caller):
    call = uv.dispatcher.calls["UV_PAGE_IN"]
    async for frame in batches:
        hdr, payload = frame.header, frame.payload
        rcs, offset = [], 0
        svm = uv.state.svms.get(hdr.lpid)
        copies = FileBatch(os.preadv) if hdr.shared_memory else None
        async with lock_of(svm):
            for ref in hdr.pages:
                if hdr.shared_memory:
                    data = b""
                else:
                    data, offset = payload[offset:offset + PAGE_SIZE], offset + PAGE_SIZE
                page = Page(lpid=hdr.lpid, src_ra=ref.ra, dest_gpa=ref.gpa, flags=ref.flags,
                            order=ref.order, data=data)
                rc, _ = uv.dispatcher.precheck(call, page, caller)
                if rc is None:
                    source = (uv.hvmem.source(hdr.lpid, ref.ra, copies) if hdr.shared_memory
                              else BytesSource(data)) or BytesSource(b"")
                    rc = page_in_one(uv, svm, ref.gpa, source)
                rcs.append(int(rc))
            if copies is not None:
                copies.flush()  # every frame of the batch filled before the lock is released
        uv.dispatcher.record_batch("UvPageInStream", "UV_PAGE_IN", hdr.lpid, caller, rcs,
                                   uv.state.svm_state(hdr.lpid))
        yield pb.PageBatchResult(rc=rcs)


async def uv_page_out_stream(uv, req: pb.PageOutRequest, caller):
    call = uv.dispatcher.calls["UV_PAGE_OUT"]
    size = min(req.batch_pages or DEFAULT_BATCH, MAX_SHARED_BATCH if req.shared_memory else MAX_BATCH)
    pages = list(req.pages)
    for first in range(0, len(pages), size):
        rcs, parts = [], []
        svm = uv.state.svms.get(req.lpid)
        copies = FileBatch(os.pwritev) if req.shared_memory else None
        async with lock_of(svm):
            for ref in pages[first:first + size]:
                page = Page(lpid=req.lpid, dest_ra=ref.ra, src_gpa=ref.gpa, flags=ref.flags, order=ref.order)
                rc, _ = uv.dispatcher.precheck(call, page, caller)
                if rc is None:
                    rc, data, in_place = page_out_one(uv, svm, ref.gpa, ref.ra if req.shared_memory else 0,
                                                      copies)
                    if rc == U.U_SUCCESS and not in_place:
                        parts.append(data)
                rcs.append(int(rc))
            if copies is not None:
                copies.flush()  # the HV's file holds the pages before the answer leaves
            frame = encode(pb.PageOutBatch(first=first, rc=rcs), parts)  # copies out under the lock
        uv.dispatcher.record_batch("UvPageOutStream", "UV_PAGE_OUT", req.lpid, caller, rcs,
                                   uv.state.svm_state(req.lpid))
        yield frame


async def uv_share_hv_memory(uv, req: pb.UvShareHvMemoryRequest, caller) -> pb.UvShareHvMemoryResponse:
    """Open the HV's RAM file for a slot; it is the HV's if the nonce file beside it holds the
    nonce the HV sent."""
    svm = uv.state.svms[req.lpid]
    if req.slot_id not in svm.slots:
        return pb.UvShareHvMemoryResponse(rc=U.U_P2, detail="no such slot")
    try:
        with open(req.nonce_path, "rb") as fh:
            if fh.read() != req.nonce or not req.nonce:
                return pb.UvShareHvMemoryResponse(rc=U.U_P2, detail="nonce mismatch: not the HV's file")
        uv.hvmem.add(req.lpid, req.slot_id, req.path, req.ra_base, req.size)
    except OSError as exc:
        return pb.UvShareHvMemoryResponse(rc=U.U_P2, detail=f"cannot open: {exc.strerror or exc}")
    return pb.UvShareHvMemoryResponse(rc=U.U_SUCCESS)
