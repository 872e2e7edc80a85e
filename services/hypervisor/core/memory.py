"""Guest memory as the vCPU and the host see it: VcpuLoad/VcpuStore (a normal VM's loads and
stores; the UV's accesses to shared pages), HostReadPage (the host touches a page: a secure one
is paged out first, so the host only sees ciphertext) and HostUnmapPage (MMU notifier)."""
from __future__ import annotations

from pefsim.dataplane import MAX_DATA_PAGES
from pefsim.abi import PAGE_SHIFT, PAGE_SIZE, Errno, GfnState, Role, SecureGuest, gfn_of, gpa_of
from pefsim.v1 import hypervisor_pb2 as pb, ultravisor_pb2 as upb
from services.hypervisor.ports import UvUnreachable
from services.hypervisor.core.pages import secure_page_out

MAX_ACCESS_PAGES = 64  # pages per VcpuLoad (4 MiB answers)
MAX_STORE_PAGES = MAX_DATA_PAGES  # pages per VcpuStore (a request: 512 KiB, rpc.MAX_REQUEST_BYTES)


def _accessible(caller) -> int:
    """The GFN state a caller may touch directly: the vCPU of a normal VM touches normal pages;
    the UV touches shared pages on the SVM's behalf."""
    return GfnState.GFN_SHARED if caller.role == Role.ROLE_UV else GfnState.GFN_NORMAL


def _pages(vm, gpa: int, npages: int, caller):
    """(slot, idx) of each page, or None if any is outside memory or not the caller's to touch."""
    out = []
    for gfn in range(gfn_of(gpa), gfn_of(gpa) + npages):
        where = vm.locate(gpa_of(gfn))
        if where is None or where[0].state(where[1]) != _accessible(caller):
            return None
        out.append(where)
    return out


def _runs(pages):
    """(slot, idx, n) of each run of consecutive pages in one slot, in order: one pread or pwritev
    a run, not one a page."""
    run = None
    for slot, idx in pages:
        if run and run[0] is slot and run[1] + run[2] == idx:
            run[2] += 1
            continue
        if run:
            yield tuple(run)
        run = [slot, idx, 1]
    if run:
        yield tuple(run)


def _read(pages) -> bytes:
    """The RAM of ``pages`` ((slot, idx) each), back to back."""
    return b"".join(slot.run(idx, n) for slot, idx, n in _runs(pages))


async def vcpu_load(hv, req: pb.VcpuLoadRequest, caller) -> pb.VcpuLoadResponse:
    vm = hv.state.vms[req.lpid]
    pages = _pages(vm, req.gpa, req.npages, caller)
    if pages is None:
        return pb.VcpuLoadResponse(errno=Errno.EFAULT)
    return pb.VcpuLoadResponse(errno=Errno.OK, data=_read(pages))


async def vcpu_store(hv, req: pb.VcpuStoreRequest, caller) -> pb.VcpuStoreResponse:
    vm = hv.state.vms[req.lpid]
    pages = _pages(vm, req.gpa, len(req.data) >> PAGE_SHIFT, caller)
    if pages is None:
        return pb.VcpuStoreResponse(errno=Errno.EFAULT)
    data, at = memoryview(req.data), 0
    for slot, idx, n in _runs(pages):
        slot.write(idx, data[at:at + n * PAGE_SIZE])
        at += n * PAGE_SIZE
    return pb.VcpuStoreResponse(errno=Errno.OK)


async def host_read_page(hv, req: pb.HostReadPageRequest, caller) -> pb.HostReadPageResponse:
    """The host touches ``npages`` pages from ``gpa`` (one if 0), in turn: EFAULT at the first
    outside memory or whose page-out fails (the ones before it stay paged out, as after single
    touches)."""
    vm = hv.state.vms[req.lpid]
    async with hv.table.guard("HostReadPage", req, vm.lock):
        pages = [vm.locate(req.gpa + n * PAGE_SIZE) for n in range(req.npages or 1)]
        if None in pages:
            return pb.HostReadPageResponse(errno=Errno.EFAULT)
        for slot, idx in pages:
            if slot.state(idx) == GfnState.GFN_SECURE_IN:  # migrate_to_ram: UV_PAGE_OUT first
                if not await secure_page_out(hv, vm, slot, idx):
                    return pb.HostReadPageResponse(errno=Errno.EFAULT)  # SIGBUS to the host
        return pb.HostReadPageResponse(errno=Errno.OK, data=_read(pages),
                                       state=pages[0][0].state(pages[0][1]))


async def host_unmap_page(hv, req: pb.HostUnmapPageRequest, caller) -> pb.HostUnmapPageResponse:
    """kvm_unmap_radix for a VM past INIT_DONE: UV_PAGE_INVAL, result ignored."""
    vm = hv.state.vms[req.lpid]
    where = vm.locate(req.gpa)
    if where is None:
        return pb.HostUnmapPageResponse(errno=Errno.EFAULT)
    if vm.secure_guest & SecureGuest.KVMPPC_SECURE_INIT_DONE:
        try:
            await hv.ucall("UV_PAGE_INVAL", upb.UvPageInvalRequest(
                lpid=vm.lpid, guest_pa=where[0].gpa(where[1]), order=PAGE_SHIFT))
        except UvUnreachable:
            return pb.HostUnmapPageResponse(errno=Errno.EIO)
    return pb.HostUnmapPageResponse(errno=Errno.OK)
