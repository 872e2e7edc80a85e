"""Check-then-act races at the HV (issue 13, item 9), in process and at a real HV process, made
deterministic with a scripted UV that holds a ucall open and the HV's own pefsim_calls_in_flight
gauge.

The dispatcher checks a call's state before its handler takes the VM's lock; a call that waited
for the lock behind an abort's page-out or a ResetVm must look at the state again under it
(CallTable.guard). Without that, H_SVM_INIT_DONE swept a VM that was normal again: every HV page
scrubbed, secure_guest = 2 (a value the design never assigns)."""
from __future__ import annotations

import asyncio

from pefsim.abi import PAGE_SIZE, Errno, GfnState, H, gpa_of
from pefsim.rpc import ON_BEHALF_HEADER
from pefsim.v1 import common_pb2, hypervisor_pb2 as hpb

NPAGES = 4


def content(gfn: int) -> bytes:
    return bytes([0x40 + gfn]) * PAGE_SIZE


async def until_waiting(w, call: str) -> None:
    """Until the HV runs a handler of ``call`` (it is then waiting for the VM's lock)."""
    for _ in range(500):
        if await w.in_flight(call) >= 1:
            return
        await asyncio.sleep(0.01)  # polling a condition, bounded: not a synchronisation by time
    raise AssertionError(f"{call} never reached its handler")


async def booted_transient(stub, vcpu_listen: str) -> int:
    """A guest's VM with known pages, INIT_START done and page 1 paged in."""
    made = await stub("guest").CreateVm(hpb.CreateVmRequest(
        name="race", vcpu_endpoint=vcpu_listen, secure_capable=True,
        memslots=[common_pb2.Memslot(slot_id=0, base_gfn=0, npages=NPAGES)]))
    assert made.errno == Errno.OK
    lpid = made.lpid
    assert (await stub("guest").VcpuStore(hpb.VcpuStoreRequest(
        lpid=lpid, gpa=0, data=b"".join(content(g) for g in range(NPAGES))))).errno == Errno.OK
    assert (await stub("uv").H_SVM_INIT_START(hpb.HSvmInitStartRequest(lpid=lpid))).rc == H.H_SUCCESS
    assert (await stub("uv").H_SVM_PAGE_IN(hpb.HSvmPageInRequest(lpid=lpid, guest_pa=gpa_of(1), order=16))).rc \
        == H.H_SUCCESS
    return lpid


async def vm_info(stub, lpid: int):
    status = await stub("operator").HvStatus(hpb.HvStatusRequest())
    return next(v for v in status.vms if v.lpid == lpid)


def run_race(hv_side, race, resumes: int | None = None) -> None:
    """Boot a VM to TRANSIENT at the merged HV, run ``race``; with ``resumes``, the scripted vCPU
    must have been resumed that many times by the end (checked once the HV has no abort left)."""
    async def scenario():
        async with hv_side.world("guest") as w:
            stub, uv, vcpu = w.stub, w.uv, w.vcpu
            lpid = await booted_transient(stub, w.vcpu_endpoint)
            try:
                await race(w, stub, uv, lpid)
                if resumes is not None:
                    assert not (await vm_info(stub, lpid)).aborting
                    assert len([r for r in vcpu.resumes if r.lpid == lpid]) == resumes
            finally:
                await stub("operator").DestroyVm(hpb.DestroyVmRequest(lpid=lpid))
    asyncio.run(scenario())


def test_init_done_behind_an_aborts_page_out_finds_the_vm_normal(hv_side):
    """H_SVM_INIT_DONE passes the dispatcher's check (TRANSIENT) while an abort holds the VM's lock
    paging out; once the abort has made the VM normal, INIT_DONE answers H_UNSUPPORTED and
    changes nothing: the page given back keeps its content, secure_guest stays 0."""
    async def race(w, stub, uv, lpid):
        gate = uv.hold("UV_PAGE_OUT")
        abort = asyncio.ensure_future(stub("uv").H_SVM_INIT_ABORT(hpb.HSvmInitAbortRequest(lpid=lpid, srr0=4)))
        await asyncio.wait_for(uv.reached("UV_PAGE_OUT").wait(), 10)
        done = asyncio.ensure_future(stub("uv").H_SVM_INIT_DONE(hpb.HSvmInitDoneRequest(lpid=lpid)))
        await until_waiting(w, "H_SVM_INIT_DONE")
        gate.set()
        assert (await abort).rc == H.H_PARAMETER
        assert (await done).rc == H.H_UNSUPPORTED
        info = await vm_info(stub, lpid)
        assert info.secure_guest == 0 and info.gfns_by_state[GfnState.GFN_NORMAL.name] == NPAGES
        loaded = await stub("guest").VcpuLoad(hpb.VcpuLoadRequest(lpid=lpid, gpa=0, npages=NPAGES))
        assert loaded.data == b"".join(content(g) for g in range(NPAGES))
    run_race(hv_side, race)


def test_init_done_behind_a_reset_finds_the_vm_normal(hv_side):
    """The VMM resets the VM (KVM_PPC_SVM_OFF, as QEMU does on a machine reset) during ESM; the
    UV's H_SVM_INIT_DONE waits behind it and then answers H_UNSUPPORTED: no sweep, no
    secure_guest = 2, the pages the HV still held keep their content."""
    async def race(w, stub, uv, lpid):
        gate = uv.hold("UV_SVM_TERMINATE")
        reset = asyncio.ensure_future(stub("guest").ResetVm(hpb.ResetVmRequest(lpid=lpid)))
        await asyncio.wait_for(uv.reached("UV_SVM_TERMINATE").wait(), 10)
        done = asyncio.ensure_future(stub("uv").H_SVM_INIT_DONE(hpb.HSvmInitDoneRequest(lpid=lpid)))
        await until_waiting(w, "H_SVM_INIT_DONE")
        gate.set()
        assert (await reset).errno == Errno.OK
        assert (await done).rc == H.H_UNSUPPORTED
        info = await vm_info(stub, lpid)
        assert info.secure_guest == 0 and info.gfns_by_state[GfnState.GFN_NORMAL.name] == NPAGES
        loaded = await stub("guest").VcpuLoad(hpb.VcpuLoadRequest(lpid=lpid, gpa=0, npages=NPAGES))
        # page 1 was in the UV: a reset drops it (zeros); the others stayed with the HV untouched
        assert loaded.data == b"".join(bytes(PAGE_SIZE) if g == 1 else content(g) for g in range(NPAGES))
    run_race(hv_side, race)


def test_init_abort_behind_a_reset_finds_the_vm_normal(hv_side):
    """The UV's H_SVM_INIT_ABORT passes the dispatcher's check (TRANSIENT) while a ResetVm holds
    the VM's lock; once the reset has made the VM normal the abort answers H_UNSUPPORTED: no second
    UV_SVM_TERMINATE (which could end the rebooted guest's next SVM), no resume of the vCPU at the
    old abort's address."""
    async def race(w, stub, uv, lpid):
        gate = uv.hold("UV_SVM_TERMINATE")
        reset = asyncio.ensure_future(stub("guest").ResetVm(hpb.ResetVmRequest(lpid=lpid)))
        await asyncio.wait_for(uv.reached("UV_SVM_TERMINATE").wait(), 10)
        abort = asyncio.ensure_future(stub("uv").H_SVM_INIT_ABORT(hpb.HSvmInitAbortRequest(lpid=lpid, srr0=0x1234)))
        await until_waiting(w, "H_SVM_INIT_ABORT")
        gate.set()
        assert (await reset).errno == Errno.OK
        assert (await abort).rc == H.H_UNSUPPORTED
        assert len(uv.calls("UV_SVM_TERMINATE", lpid)) == 1
        assert (await vm_info(stub, lpid)).secure_guest == 0
    run_race(hv_side, race, resumes=0)


def test_init_abort_behind_init_done_finds_the_vm_secure(hv_side):
    """The guest's own H_SVM_INIT_ABORT waits behind the UV's H_SVM_INIT_DONE sweep; once the VM is
    secure it answers H_STATE and leaves it secure (it used to page the secure VM out, make it
    normal and terminate the SVM the UV had just declared secure)."""
    async def race(w, stub, uv, lpid):
        gate = uv.hold("UV_PAGE_IN")  # a page-in holds the VM's lock, waiting on the UV
        page_in = asyncio.ensure_future(stub("uv").H_SVM_PAGE_IN(hpb.HSvmPageInRequest(
            lpid=lpid, guest_pa=gpa_of(3), order=16)))
        await asyncio.wait_for(uv.reached("UV_PAGE_IN").wait(), 10)
        done = asyncio.ensure_future(stub("uv").H_SVM_INIT_DONE(hpb.HSvmInitDoneRequest(lpid=lpid)))
        await until_waiting(w, "H_SVM_INIT_DONE")
        abort = asyncio.ensure_future(stub("guest").H_SVM_INIT_ABORT(hpb.HSvmInitAbortRequest(lpid=lpid, srr0=0x1234)))
        await until_waiting(w, "H_SVM_INIT_ABORT")
        gate.set()  # the lock goes to INIT_DONE, then to the abort (asyncio.Lock is FIFO)
        assert (await page_in).rc == H.H_SUCCESS
        assert (await done).rc == H.H_SUCCESS
        assert (await abort).rc == H.H_STATE
        assert uv.calls("UV_PAGE_OUT", lpid) == [] and uv.calls("UV_SVM_TERMINATE", lpid) == []
        assert (await vm_info(stub, lpid)).state == "VM_SECURE"
    run_race(hv_side, race, resumes=0)


def test_an_hcall_the_uv_makes_for_one_guest_cannot_touch_anothers_vm(hv_side):
    """The UV names the guest each hcall serves; an H_SVM_INIT_ABORT (or page-in, INIT_DONE) for a
    VM another guest owns is refused before anything changes: a guest whose UV_ESM for someone
    else's lpid failed cannot have that VM aborted and its vCPU resumed at its own address."""
    async def race(w, stub, uv, lpid):
        mallory = ((ON_BEHALF_HEADER, "mallory"),)
        abort = await stub("uv").H_SVM_INIT_ABORT(hpb.HSvmInitAbortRequest(lpid=lpid, srr0=0xBAD), metadata=mallory)
        assert abort.rc == H.H_UNSUPPORTED
        page_in = await stub("uv").H_SVM_PAGE_IN(hpb.HSvmPageInRequest(lpid=lpid, guest_pa=gpa_of(2), order=16),
                                                 metadata=mallory)
        assert page_in.rc == H.H_UNSUPPORTED
        done = await stub("uv").H_SVM_INIT_DONE(hpb.HSvmInitDoneRequest(lpid=lpid), metadata=mallory)
        assert done.rc == H.H_UNSUPPORTED
        info = await vm_info(stub, lpid)
        assert info.state == "VM_TRANSIENT" and info.gfns_by_state[GfnState.GFN_SECURE_IN.name] == 1
        assert uv.calls("UV_PAGE_OUT", lpid) == [] and uv.calls("UV_SVM_TERMINATE", lpid) == []
    run_race(hv_side, race, resumes=0)
