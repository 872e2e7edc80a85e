"""The HV's side of pefsim's bulk data plane (pefsim/dataplane.py): page batches streamed to and
from the UV, and the offer of its RAM files to the UV (shared memory).

Pages travel as runs, (slot, idx, n, pos): n pages of one slot from idx (``pos`` is the caller's
index of the run's first page, handed back with it), sent as PageRefs with a count; each page
still gets its own result. Batches never mix slots: a batch's pages all travel with data, or all
through shared memory. The caller holds vm.lock and decides each page's transition from its
result as the results arrive, so a kill between two batches leaves every page in a state it can
explain.
"""
from __future__ import annotations

import asyncio
import logging
import os
from itertools import groupby

from pefsim import entropy
from pefsim.abi import PAGE_SHIFT, U
from pefsim.dataplane import MAX_DATA_PAGES, MAX_FRAME_PAGES, encode
from pefsim.v1 import ultravisor_pb2 as upb
from services.hypervisor.ports import UvUnreachable

log = logging.getLogger("pefsim.hv.bulk")
# pages per frame: 512 KiB. grpcio holds a received message three times over (its slices, a
# bytes per slice, their join) and the allocator keeps what that spread over, so a receiver's
# peak RSS grows ~4 x the frame size: measured at 1 GiB, UV 67 MiB over its pool with 1 MiB
# frames, 63 with 512 KiB, 61 with 64 KiB; 16-64 pages a frame is grpcio's fastest, 8 costs
# 15-20 % of it and stays near 1 x raw TCP.
BATCH = MAX_DATA_PAGES
# pages per frame through shared memory, as many as a frame may name: no data travels, only runs
# of page numbers, so what counts is the per-message cost of gRPC
SHARED_BATCH = MAX_FRAME_PAGES
WINDOW = 4  # frames in flight before the first is answered: bounds the memory a stream holds


def _batches(runs):
    """runs: (slot, idx, n, pos) in any order -> lists of runs of one slot holding at most
    batch_pages(slot) pages each (a run cut where it must be; ``pos`` follows the cut)."""
    batch, room = [], 0
    for slot, idx, n, pos in runs:
        if batch and slot.slot_id != batch[0][0].slot_id:
            yield batch
            batch = []
        if not batch:
            room = batch_pages(slot)
        while n:
            take = min(n, room)
            batch.append((slot, idx, take, pos))
            idx, pos, n, room = idx + take, pos + take, n - take, room - take
            if not room:
                yield batch
                batch, room = [], batch_pages(slot)
    if batch:
        yield batch


def batch_pages(slot) -> int:
    return SHARED_BATCH if slot.shared else BATCH


def _refs(runs):
    return [upb.PageRef(ra=slot.ra(idx), gpa=slot.gpa(idx), flags=0, order=PAGE_SHIFT, count=n)
            for slot, idx, n, _ in runs]


async def page_in(hv, vm, runs):
    """Stream pages to the UV (UvPageInStream). ``runs``: (slot, idx, n, pos), n pages from idx
    (``pos`` is the caller's, handed back). Yields, batch by batch, (runs of the batch, one
    UV_PAGE_IN result per page). Raises UvUnreachable on transport failure (pages not yet
    answered are still normal in the HV, with their data)."""
    batches = list(_batches(runs))
    window = asyncio.Semaphore(WINDOW)

    async def frames():
        for batch in batches:
            await window.acquire()  # released as each answer arrives
            slot = batch[0][0]
            payload = () if slot.shared else [slot.run(idx, n) for slot, idx, n, _ in batch]
            yield encode(upb.PageInBatch(lpid=vm.lpid, pages=_refs(batch), shared_memory=slot.shared), payload)

    i = 0
    async for result in hv.uv.page_in_stream(frames(), on_behalf=hv.on_behalf(vm.lpid),
                                             timeout=hv.cfg.ucall_timeout_s + len(batches)):
        window.release()
        yield batches[i], list(result.rc)
        i += 1


def _take(runs: list, count: int) -> list:
    """The first ``count`` pages of ``runs`` (removed from it), as runs."""
    out = []
    while count:
        slot, idx, n, pos = runs[0]
        take = min(n, count)
        out.append((slot, idx, take, pos))
        if take == n:
            runs.pop(0)
        else:
            runs[0] = (slot, idx + take, n - take, pos + take)
        count -= take
    return out


async def page_out(hv, vm, runs):
    """Take pages back from the UV (UvPageOutStream). ``runs``: (slot, idx, n, pos). Yields
    (runs of the batch, one result per page, one data per page) where a page's data is IN_PLACE
    for shared memory and None when the UV gave none."""
    from services.hypervisor.core.state import IN_PLACE

    for slot_runs in _group_by_slot(runs):  # one request per slot, of at most MAX_REQUEST_RUNS runs
        slot = slot_runs[0][0]
        total = sum(n for _, _, n, _ in slot_runs)
        request = upb.PageOutRequest(lpid=vm.lpid, batch_pages=batch_pages(slot), shared_memory=slot.shared,
                                     pages=_refs(slot_runs))
        stream = hv.uv.page_out_stream(request, on_behalf=hv.on_behalf(vm.lpid),
                                       timeout=hv.cfg.ucall_timeout_s + total / batch_pages(slot))
        left = list(slot_runs)
        async for frame in stream:
            hdr, payload = frame.header, frame.payload
            rcs = list(hdr.rc)[:total]  # results past the pages asked for are not ours
            total -= len(rcs)
            batch = _take(left, len(rcs))
            data, offset = [], 0
            for rc in rcs:
                if rc != U.U_SUCCESS:
                    data.append(None)
                elif slot.shared:
                    data.append(IN_PLACE)
                else:
                    page = payload[offset:offset + (1 << PAGE_SHIFT)]
                    offset += 1 << PAGE_SHIFT
                    data.append(page if len(page) == 1 << PAGE_SHIFT else None)  # short: lost
            yield batch, rcs, data


MAX_REQUEST_RUNS = 8192  # runs one PageOutRequest names (~200 KiB): within rpc.MAX_REQUEST_BYTES


def _group_by_slot(runs):
    for _, group in groupby(runs, key=lambda run: run[0].slot_id):
        group = list(group)
        for first in range(0, len(group), MAX_REQUEST_RUNS):
            yield group[first:first + MAX_REQUEST_RUNS]


async def offer_memory(hv, vm, slot) -> None:
    """Offer the UV the slot's RAM file; remember whether it could open it."""
    if not hv.cfg.shared_memory:
        return
    nonce = entropy.token_bytes(16)
    nonce_path = vm.directory / f"slot-{slot.slot_id}.nonce"
    nonce_path.write_bytes(nonce)
    try:
        resp = await hv.ucall("UvShareHvMemory", upb.UvShareHvMemoryRequest(
            lpid=vm.lpid, slot_id=slot.slot_id, path=os.fspath(slot.ram_path), ra_base=slot.ra_base,
            size=slot.npages << PAGE_SHIFT, nonce_path=os.fspath(nonce_path), nonce=nonce))
        slot.shared = resp.rc == U.U_SUCCESS
        if not slot.shared:
            log.info("lpid %d slot %d: no shared memory with the UV (%s): pages travel in the stream",
                     vm.lpid, slot.slot_id, resp.detail)
    except UvUnreachable:
        slot.shared = False
    finally:
        nonce_path.unlink(missing_ok=True)
    hv.state.save(vm)
