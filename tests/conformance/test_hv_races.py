"""Check-then-act races at a real HV (issue 13, item 9), made deterministic with a scripted UV that
holds a ucall open and the HV's own pefsim_calls_in_flight gauge.

The dispatcher checks a call's state before its handler takes the VM's lock; a call that waited
for the lock behind an abort's page-out or a ResetVm must look at the state again under it
(Dispatcher.guard). Without that, H_SVM_INIT_DONE swept a VM that was normal again: every HV page
scrubbed, secure_guest = 2 (a value the design never assigns)."""
from __future__ import annotations

import asyncio
import urllib.request

from pefsim.abi import PAGE_SIZE, Errno, GfnState, H, gpa_of
from pefsim.v1 import common_pb2, hypervisor_pb2 as hpb, hypervisor_pb2_grpc
from tests.conformance.peers import ROLES, ScriptedUv, ScriptedVcpu, caller

NPAGES = 4


def content(gfn: int) -> bytes:
    return bytes([0x40 + gfn]) * PAGE_SIZE


def in_flight(stack, service: str, call: str) -> float:
    url = f"http://{stack.metrics_targets()[service]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f'pefsim_calls_in_flight{{call="{call}"}}'):
                return float(line.split()[-1])
    return 0.0


async def until_waiting(stack, call: str) -> None:
    """Until the HV runs a handler of ``call`` (it is then waiting for the VM's lock)."""
    for _ in range(500):
        if await asyncio.to_thread(in_flight, stack, "hv", call) >= 1:
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


def run_race(hv_side, race) -> None:
    stack, hvs, uv_listen, vcpu_listen = hv_side

    async def scenario():
        peers = {who: caller(hvs["guest"], role, hypervisor_pb2_grpc.HypervisorServiceStub, stack, "hv")
                 for who, role in ROLES.items()}
        stub = lambda who: peers[who].stub  # noqa: E731
        async with ScriptedUv(uv_listen, stack) as uv, ScriptedVcpu(vcpu_listen, stack):
            lpid = await booted_transient(stub, vcpu_listen)
            try:
                await race(stack, stub, uv, lpid)
            finally:
                await stub("operator").DestroyVm(hpb.DestroyVmRequest(lpid=lpid))
                for p in peers.values():
                    await p.close()
    asyncio.run(scenario())


def test_init_done_behind_an_aborts_page_out_finds_the_vm_normal(hv_side):
    """H_SVM_INIT_DONE passes the dispatcher's check (TRANSIENT) while an abort holds the VM's lock
    paging out; once the abort has made the VM normal, INIT_DONE answers H_UNSUPPORTED and
    changes nothing: the page given back keeps its content, secure_guest stays 0."""
    async def race(stack, stub, uv, lpid):
        gate = uv.hold("UV_PAGE_OUT")
        abort = asyncio.ensure_future(stub("uv").H_SVM_INIT_ABORT(hpb.HSvmInitAbortRequest(lpid=lpid, srr0=4)))
        await asyncio.wait_for(uv.reached("UV_PAGE_OUT").wait(), 10)
        done = asyncio.ensure_future(stub("uv").H_SVM_INIT_DONE(hpb.HSvmInitDoneRequest(lpid=lpid)))
        await until_waiting(stack, "H_SVM_INIT_DONE")
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
    async def race(stack, stub, uv, lpid):
        gate = uv.hold("UV_SVM_TERMINATE")
        reset = asyncio.ensure_future(stub("guest").ResetVm(hpb.ResetVmRequest(lpid=lpid)))
        await asyncio.wait_for(uv.reached("UV_SVM_TERMINATE").wait(), 10)
        done = asyncio.ensure_future(stub("uv").H_SVM_INIT_DONE(hpb.HSvmInitDoneRequest(lpid=lpid)))
        await until_waiting(stack, "H_SVM_INIT_DONE")
        gate.set()
        assert (await reset).errno == Errno.OK
        assert (await done).rc == H.H_UNSUPPORTED
        info = await vm_info(stub, lpid)
        assert info.secure_guest == 0 and info.gfns_by_state[GfnState.GFN_NORMAL.name] == NPAGES
        loaded = await stub("guest").VcpuLoad(hpb.VcpuLoadRequest(lpid=lpid, gpa=0, npages=NPAGES))
        # page 1 was in the UV: a reset drops it (zeros); the others stayed with the HV untouched
        assert loaded.data == b"".join(bytes(PAGE_SIZE) if g == 1 else content(g) for g in range(NPAGES))
    run_race(hv_side, race)
