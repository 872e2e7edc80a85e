"""The HV's side of pefsim's bulk data plane (pefsim/dataplane.py): page batches streamed to and
from the UV, and the offer of its RAM files to the UV (shared memory).

Batches never mix slots: a batch's pages all travel with data, or all through shared memory.
The caller holds vm.lock and decides each page's transition from its result, page by page, as
the results arrive, so a kill between two batches leaves every page in a state it can explain.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
from itertools import groupby

import grpc

from pefsim.abi import PAGE_SHIFT, U
from pefsim.dataplane import decoder, encode
from pefsim.v1 import ultravisor_pb2 as upb
from services.hypervisor.errors import UvUnreachable

log = logging.getLogger("pefsim.hv.bulk")
BATCH = 16  # pages per frame: 1 MiB (measured: 16-64 pages per message is the grpcio optimum)
SHARED_BATCH = 256  # pages per frame through shared memory: no data travels, only page numbers,
#                    so a frame is ~3 KiB and what counts is the per-message cost of gRPC
WINDOW = 4  # frames in flight before the first is answered: bounds the memory a stream holds
SERVICE = "/pefsim.v1.UltravisorService"


def _batches(items):
    """items: (slot, idx, ...) in any order -> lists of at most batch_pages(slot) items of one slot."""
    for _, group in groupby(items, key=lambda it: it[0].slot_id):
        group = list(group)
        size = batch_pages(group[0][0])
        for first in range(0, len(group), size):
            yield group[first:first + size]


def batch_pages(slot) -> int:
    return SHARED_BATCH if slot.shared else BATCH


async def page_in(hv, vm, items):
    """Stream pages to the UV (UvPageInStream). ``items``: (slot, idx) pairs. Yields, batch by
    batch, (items of the batch, their UV_PAGE_IN results). Raises UvUnreachable on transport
    failure (pages not yet answered are still normal in the HV, with their data)."""
    batches = list(_batches(items))
    channel = hv.uv.channel
    call = channel.stream_stream(f"{SERVICE}/UvPageInStream", request_serializer=bytes,
                                 response_deserializer=upb.PageBatchResult.FromString)

    window = asyncio.Semaphore(WINDOW)

    async def frames():
        for batch in batches:
            await window.acquire()  # released as each answer arrives
            slot = batch[0][0]
            refs = [upb.PageRef(ra=slot.ra(idx), gpa=slot.gpa(idx), flags=0, order=PAGE_SHIFT)
                    for slot, idx in batch]
            payload = () if slot.shared else [slot.page(idx) for _, idx in batch]
            yield encode(upb.PageInBatch(lpid=vm.lpid, pages=refs, shared_memory=slot.shared), payload)

    stream = call(frames(), timeout=hv.cfg.ucall_timeout_s + len(batches), wait_for_ready=True)
    try:
        i = 0
        async for result in stream:
            window.release()
            yield batches[i], list(result.rc)
            i += 1
    except grpc.aio.AioRpcError as exc:
        log.error("UvPageInStream: UV unreachable (%s)", exc.code().name)
        raise UvUnreachable("UvPageInStream") from None
    await hv.check_answer_boot(stream)


async def page_out(hv, vm, items):
    """Take pages back from the UV (UvPageOutStream). ``items``: (slot, idx) pairs. Yields
    (items of the batch, results, page data list) where data is IN_PLACE for shared memory."""
    from services.hypervisor.state import IN_PLACE

    for batch_items in _group_by_slot(items):
        slot = batch_items[0][0]
        request = upb.PageOutRequest(lpid=vm.lpid, batch_pages=batch_pages(slot), shared_memory=slot.shared, pages=[
            upb.PageRef(ra=slot.ra(idx), gpa=slot.gpa(idx), flags=0, order=PAGE_SHIFT) for _, idx in batch_items])
        call = hv.uv.channel.unary_stream(f"{SERVICE}/UvPageOutStream",
                                          request_serializer=upb.PageOutRequest.SerializeToString,
                                          response_deserializer=decoder(upb.PageOutBatch))
        stream = call(request, timeout=hv.cfg.ucall_timeout_s + len(batch_items) / batch_pages(slot), wait_for_ready=True)
        try:
            async for frame in stream:
                hdr, payload = frame.header, frame.payload
                batch = batch_items[hdr.first:hdr.first + len(hdr.rc)]
                data, offset = [], 0
                for rc in hdr.rc:
                    if rc != U.U_SUCCESS:
                        data.append(None)
                    elif slot.shared:
                        data.append(IN_PLACE)
                    else:
                        page = payload[offset:offset + (1 << PAGE_SHIFT)]
                        offset += 1 << PAGE_SHIFT
                        data.append(page if len(page) == 1 << PAGE_SHIFT else None)  # short: lost
                yield batch, list(hdr.rc), data
        except grpc.aio.AioRpcError as exc:
            log.error("UvPageOutStream: UV unreachable (%s)", exc.code().name)
            raise UvUnreachable("UvPageOutStream") from None
        await hv.check_answer_boot(stream)


def _group_by_slot(items):
    for _, group in groupby(items, key=lambda it: it[0].slot_id):
        yield list(group)


async def offer_memory(hv, vm, slot) -> None:
    """Offer the UV the slot's RAM file; remember whether it could open it."""
    if not hv.cfg.shared_memory:
        return
    nonce = secrets.token_bytes(16)
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
