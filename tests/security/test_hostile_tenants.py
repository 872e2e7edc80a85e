"""Hostile tenants against real processes under mTLS (issue 13): a guest reaching beyond its own VM,
one identity starving the others, and the HV's answers that must not wait on a guest.

Each attack is the red team's, run against a real UV, HV and guests; each asserts what the
attacker gets (a documented code or gRPC status) and that the victims are untouched."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pefsim import rpc
from pefsim.abi import PAGE_SIZE, Errno, H, U
from pefsim.dataplane import MAX_DATA_PAGES
from pefsim.ops.demo import Operator
from pefsim.v1 import common_pb2, guest_pb2, guest_pb2_grpc, hypervisor_pb2 as hpb, ultravisor_pb2 as upb
from tests.conftest import unique
from tests.helpers import boot_guest, metric, operating
from tests.security.test_hostile import HV_STUB, UV_STUB, as_, still_intact

GUEST_STUB = guest_pb2_grpc.GuestServiceStub


def one_slot(npages: int) -> list:
    return [common_pb2.Memslot(slot_id=0, base_gfn=0, npages=npages)]


async def report(op, name: str):
    return (await op.guest(name).GuestStatus(guest_pb2.GuestStatusRequest())).report


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def test_vcpu_endpoint_of_another_guest_is_never_resumed(stack, run):
    """The vCPU hijack: an attacker makes a VM whose vCPU endpoint is a victim guest's service and
    makes its own ESM fail. The HV aborts and resumes 'the VM's vCPU' only through the attacker's
    own certificate name: the handshake with the victim fails, the victim never sees a resume,
    and the attacker's UV_ESM is still answered (the HV answers the UV before the resume)."""
    async def scenario():
        op = Operator.of(stack)
        attacker = unique("hijack")
        hv = as_(stack, f"guest:{attacker}", stack.hv_addr, HV_STUB, "hv")
        uv = as_(stack, f"guest:{attacker}", stack.uv_addr, UV_STUB, "uv")
        try:
            victim = await boot_guest(stack, op, unique("victim"))
            assert victim.outcome == "secure"
            before = await report(op, victim.name)
            made = await hv.stub.CreateVm(hpb.CreateVmRequest(
                name=attacker, vcpu_endpoint=stack.guest_addr(victim.name), secure_capable=True,
                memslots=one_slot(4)))
            assert made.errno == Errno.OK
            t0 = time.monotonic()
            esm = await uv.stub.UV_ESM(upb.UvEsmRequest(  # no FDT in its memory: the ESM fails, abort
                vcpu=common_pb2.VcpuContext(lpid=made.lpid, nip=0x11004), kbase=0x10000, fdt=0x20000))
            assert (esm.rc, esm.resumed) == (H.H_PARAMETER, False)
            assert time.monotonic() - t0 < 10
            after = await report(op, victim.name)
            assert (after.resumes, after.refused_resumes) == (before.resumes, before.refused_resumes)
            assert await still_intact(op, victim)
        finally:
            for peer in (hv, uv):
                await peer.close()
            await op.close()
    run(scenario())


def test_vcpu_refuses_a_resume_for_another_lpid(stack, run):
    """Even an HV certificate cannot resume a vCPU with another lpid than its VM's."""
    async def scenario():
        async with operating(stack) as op:
            victim = await boot_guest(stack, op, unique("resumed"))
            hv = rpc.Peer(stack.guest_addr(victim.name), rpc.ROLE_NAMES["hv"], GUEST_STUB, "hv",
                          stack.tls("hv"), "guest")
            got = await hv.stub.VcpuResume(guest_pb2.VcpuResumeRequest(
                lpid=victim.lpid + 1000, r3=H.H_PARAMETER, nip=0x4000, resumed_by=rpc.ROLE_NAMES["hv"]))
            assert got.rc == H.H_PARAMETER
            rep = await report(op, victim.name)
            assert rep.outcome == "secure" and rep.refused_resumes == 0
            assert await still_intact(op, victim)
            await hv.close()
    run(scenario())


@pytest.mark.parametrize("endpoint", ["unix:/tmp/x.sock", "unix-abstract:x", "dns:///127.0.0.1:7000",
                                      "127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "h" * 100_000 + ":1",
                                      "127.0.0.1:7000/x", ""])
def test_bad_vcpu_endpoints_are_refused(stack, run, endpoint):
    async def scenario():
        hv = as_(stack, f"guest:{unique('ep')}", stack.hv_addr, HV_STUB, "hv")
        try:
            made = await hv.stub.CreateVm(hpb.CreateVmRequest(name="ep", vcpu_endpoint=endpoint,
                                                              memslots=one_slot(1)))
            assert made.errno == Errno.EINVAL
        finally:
            await hv.close()
    run(scenario())


def test_create_vm_asked_again_with_its_request_id_makes_one_vm(stack, run):
    """A CreateVm whose answer was lost is asked again with the same request id: the same owner
    gets the same VM back, not a second (found by pefsim sim: a lost CreateVm answer left an
    orphan VM with its RAM); another owner using the same id gets its own VM; an id longer than a
    key is EINVAL."""
    async def scenario():
        a, b = unique("idem-a"), unique("idem-b")
        hv_a = as_(stack, f"guest:{a}", stack.hv_addr, HV_STUB, "hv")
        hv_b = as_(stack, f"guest:{b}", stack.hv_addr, HV_STUB, "hv")
        made = []
        try:
            req = hpb.CreateVmRequest(name="idem", vcpu_endpoint="127.0.0.1:7000", memslots=one_slot(1),
                                      request_id="k-1")
            first, again = await hv_a.stub.CreateVm(req), await hv_a.stub.CreateVm(req)
            other = await hv_b.stub.CreateVm(req)
            made = [(hv_a, first.lpid), (hv_b, other.lpid)]
            assert first.errno == again.errno == other.errno == Errno.OK
            assert again.lpid == first.lpid and other.lpid != first.lpid
            long = hpb.CreateVmRequest(name="idem", vcpu_endpoint="127.0.0.1:7000", memslots=one_slot(1),
                                       request_id="k" * 65)
            assert (await hv_a.stub.CreateVm(long)).errno == Errno.EINVAL
        finally:
            for hv, lpid in made:
                await hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=lpid))
            await hv_a.close()
            await hv_b.close()
    run(scenario())


def test_operator_vm_is_for_operators_only(stack, run):
    """A VM an operator made has no guest owner: no guest may read, write, hold a session on,
    destroy or secure it (UV_ESM on it is refused by the HV before anything changes)."""
    async def scenario():
        op = Operator.of(stack)
        name = unique("prowler")
        hv = as_(stack, f"guest:{name}", stack.hv_addr, HV_STUB, "hv")
        uv = as_(stack, f"guest:{name}", stack.uv_addr, UV_STUB, "uv")
        try:
            made = await op.hv.stub.CreateVm(hpb.CreateVmRequest(
                name="ops", vcpu_endpoint="127.0.0.1:1", secure_capable=True, memslots=one_slot(2)))
            lpid, page = made.lpid, bytes(PAGE_SIZE)
            for call, req in (("VcpuLoad", hpb.VcpuLoadRequest(lpid=lpid, gpa=0, npages=1)),
                              ("VcpuStore", hpb.VcpuStoreRequest(lpid=lpid, gpa=0, data=bytes(PAGE_SIZE))),
                              ("HostReadPage", hpb.HostReadPageRequest(lpid=lpid, gpa=0)),
                              ("ResetVm", hpb.ResetVmRequest(lpid=lpid)),
                              ("DestroyVm", hpb.DestroyVmRequest(lpid=lpid))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await getattr(hv.stub, call)(req)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, call
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in hv.stub.VmSession(hpb.VmSessionRequest(lpid=lpid)):
                    pass
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            esm = await uv.stub.UV_ESM(upb.UvEsmRequest(vcpu=common_pb2.VcpuContext(lpid=lpid, nip=0x11004),
                                                        kbase=0x10000, fdt=0x20000))
            assert (esm.rc, esm.resumed) == (H.H_PARAMETER, True)
            vm = next(v for v in (await op.hv.stub.HvStatus(hpb.HvStatusRequest())).vms if v.lpid == lpid)
            assert vm.state == "VM_NORMAL" and vm.secure_guest == 0
            assert (await op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=lpid, gpa=0))).data == page
            assert not [s for s in (await op.uv.stub.UvStatus(upb.UvStatusRequest())).svms if s.lpid == lpid]
            assert (await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=lpid))).errno == Errno.OK
        finally:
            for peer in (hv, uv):
                await peer.close()
            await op.close()
    run(scenario())


def test_status_calls_show_each_guest_its_own(stack, run):
    """HvStatus lists a guest its own VMs only (the operator sees all); a guest's timeline
    (GuestStatus) is the operator's alone."""
    async def scenario():
        async with operating(stack) as op:
            a = await boot_guest(stack, op, unique("seen"))
            b_name = unique("peeker")
            b = as_(stack, f"guest:{b_name}", stack.hv_addr, HV_STUB, "hv")
            mine = await b.stub.CreateVm(hpb.CreateVmRequest(name=b_name, vcpu_endpoint="127.0.0.1:1",
                                                            memslots=one_slot(1)))
            listed = [v.lpid for v in (await b.stub.HvStatus(hpb.HvStatusRequest())).vms]
            assert listed == [mine.lpid]
            everyone = [v.lpid for v in (await op.hv.stub.HvStatus(hpb.HvStatusRequest())).vms]
            assert {a.lpid, mine.lpid} <= set(everyone)
            spy = rpc.Peer(stack.guest_addr(a.name), rpc.ROLE_NAMES["guest"], GUEST_STUB, b_name,
                           stack.tls(f"guest:{b_name}"), "guest")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await spy.stub.GuestStatus(guest_pb2.GuestStatusRequest())
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (await b.stub.DestroyVm(hpb.DestroyVmRequest(lpid=mine.lpid))).errno == Errno.OK
            await spy.close()
            await b.close()
    run(scenario())


def test_slowloris_and_session_flood_cost_only_the_attacker(stack, run):
    """One guest opens 200 calls whose request never comes and 200 sessions on its own VM: it is
    held to its 128 calls in flight (the rest RESOURCE_EXHAUSTED at once), while another guest,
    the operator and a secure guest's loads through the UV keep being served."""
    async def scenario():
        op = Operator.of(stack)
        name = unique("loris")
        hv = as_(stack, f"guest:{name}", stack.hv_addr, HV_STUB, "hv")
        try:
            victim = await boot_guest(stack, op, unique("bystander"))
            made = await hv.stub.CreateVm(hpb.CreateVmRequest(name=name, vcpu_endpoint="127.0.0.1:1",
                                                             memslots=one_slot(1)))
            never = asyncio.Event()

            async def no_request():
                await never.wait()
                yield hpb.HvStatusRequest()  # pragma: no cover - never sent

            hang = hv.channel.stream_unary("/pefsim.v1.HypervisorService/HvStatus",
                                           request_serializer=hpb.HvStatusRequest.SerializeToString,
                                           response_deserializer=hpb.HvStatusResponse.FromString)

            async def outcome(call):
                try:
                    if hasattr(call, "read"):
                        await call.read()
                        return "open"
                    await call
                    return "answered"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
            sessions = [hv.stub.VmSession(hpb.VmSessionRequest(lpid=made.lpid)) for _ in range(100)]
            assert set(await asyncio.gather(*(outcome(c) for c in sessions))) == {"open"}
            # 28 slots are left: 28 of the lorises hold them, the other 72 are refused at once
            lorises = [asyncio.ensure_future(outcome(hang(no_request()))) for _ in range(100)]
            other = as_(stack, f"guest:{unique('calm')}", stack.hv_addr, HV_STUB, "hv")
            assert (await other.stub.HvStatus(hpb.HvStatusRequest(), timeout=5)).vms == []
            assert (await op.hv.stub.HvStatus(hpb.HvStatusRequest(), timeout=5)).vms
            assert await still_intact(op, victim)  # the victim's loads go through the UV to its pages
            lorises_done = await asyncio.gather(*lorises)
            assert sorted(set(lorises_done)) == ["DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"]
            # at most the identity's 128 slots were held (the 100 sessions and 28 lorises; of those,
            # the ones that found no room in its 8 MiB of request bytes were turned away too)
            assert lorises_done.count("RESOURCE_EXHAUSTED") >= 100 - (rpc.MAX_INFLIGHT_PER_PEER - len(sessions))
            refused = 'pefsim_calls_refused_total{call="HvStatus",reason='
            assert metric(stack, "hv", refused + '"calls"}') + metric(stack, "hv", refused + '"bytes"}') \
                == lorises_done.count("RESOURCE_EXHAUSTED")
            assert metric(stack, "hv", refused + '"arrival"}') == lorises_done.count("DEADLINE_EXCEEDED")
            for s in sessions:
                s.cancel()
            await other.close()
        finally:
            await hv.close()
            await op.close()
    run(scenario())


def test_uv_esm_for_lpids_with_no_vm_leaves_no_svm(stack, run):
    """300 UV_ESM calls for lpids no VM has (squatting future lpids): each SVM is ended at once
    (H_PARAMETER back to the caller), the UV holds none of them, and an honest guest still
    goes secure."""
    async def scenario():
        op = Operator.of(stack)
        uv = as_(stack, f"guest:{unique('squatter')}", stack.uv_addr, UV_STUB, "uv")
        try:
            answers = []
            for first in range(0, 300, 50):  # 50 at a time: within the caller's 128 calls in flight
                answers += await asyncio.gather(*(uv.stub.UV_ESM(upb.UvEsmRequest(
                    vcpu=common_pb2.VcpuContext(lpid=500_000 + i, nip=0x11004), kbase=0x10000, fdt=0x20000))
                    for i in range(first, first + 50)))
            assert {(a.rc, a.resumed) for a in answers} <= {(H.H_PARAMETER, True), (U.U_RETRY, True)}
            status = await op.uv.stub.UvStatus(upb.UvStatusRequest())
            assert not [s for s in status.svms if s.lpid >= 500_000]
            honest = await boot_guest(stack, op, unique("honest"))
            assert honest.outcome == "secure"
        finally:
            await uv.close()
            await op.close()
    run(scenario())


def test_vm_quota_per_owner_and_unattached_vms_are_reaped(stack_factory, run):
    """One guest may hold --max-vms-per-owner VMs and --max-pages-per-owner pages (ENOMEM
    beyond); VMs whose VMM never opens a session are destroyed after --unattached-grace."""
    stack = stack_factory(hv_args=("--max-vms-per-owner", "3", "--max-pages-per-owner", "64",
                                   "--unattached-grace", "1"))

    async def scenario():
        op = Operator.of(stack)
        hv = as_(stack, f"guest:{unique('hoarder')}", stack.hv_addr, HV_STUB, "hv")
        try:
            def create(npages):
                return hv.stub.CreateVm(hpb.CreateVmRequest(name="q", vcpu_endpoint="127.0.0.1:1",
                                                            memslots=one_slot(npages)))
            assert (await create(65)).errno == Errno.ENOMEM  # more pages than the owner's quota
            made = [await create(16) for _ in range(3)]
            assert [m.errno for m in made] == [Errno.OK] * 3
            assert (await create(1)).errno == Errno.ENOMEM  # a fourth VM

            def add_slot(npages):
                return hv.stub.SetMemslot(hpb.SetMemslotRequest(lpid=made[0].lpid, slot=common_pb2.Memslot(
                    slot_id=1, base_gfn=1 << 20, npages=npages)))
            assert (await add_slot(17)).errno == Errno.ENOMEM  # 48 + 17 pages: past the quota
            assert (await add_slot(16)).errno == Errno.OK  # 64: at it
            for _ in range(100):  # the watchdog reaps them (a bounded poll, 0.1 s apart)
                if not (await hv.stub.HvStatus(hpb.HvStatusRequest())).vms:
                    break
                await asyncio.sleep(0.1)
            assert (await hv.stub.HvStatus(hpb.HvStatusRequest())).vms == []
            assert (await create(16)).errno == Errno.OK  # the quota came back
        finally:
            await hv.close()
            await op.close()
    run(scenario())


def test_oversized_and_flooded_stores_keep_the_hv_within_its_bound(stack_factory, run):
    """8 concurrent 60 MiB VcpuStores, and 4 MiB ones, are refused from their length prefix
    (RESOURCE_EXHAUSTED, never buffered); 128 concurrent ones of the largest size a request may
    have (512 KiB) are all answered, at most 8 MiB of them read at once. The HV's peak RSS grows
    by far less than the 64 MiB its README bound allows over guest memory."""
    stack = stack_factory()  # its own HV: the peak RSS is this test's

    async def scenario():
        name = unique("hog")
        hv = as_(stack, f"guest:{name}", stack.hv_addr, HV_STUB, "hv")
        pid = stack.procs["hv"].popen.pid
        try:
            made = await hv.stub.CreateVm(hpb.CreateVmRequest(name=name, vcpu_endpoint="127.0.0.1:1",
                                                             memslots=one_slot(64)))
            before = peak_rss_kib(pid)
            huge = bytes(60 << 20)

            async def store(data):
                try:
                    return (await hv.stub.VcpuStore(hpb.VcpuStoreRequest(lpid=made.lpid, gpa=0, data=data),
                                                    timeout=60)).errno
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
            assert set(await asyncio.gather(*(store(huge) for _ in range(8)))) == {"RESOURCE_EXHAUSTED"}
            assert await store(bytes(4 << 20)) == "RESOURCE_EXHAUSTED"
            del huge
            full = bytes(MAX_DATA_PAGES * PAGE_SIZE)
            results = await asyncio.gather(*(store(full) for _ in range(128)))
            assert set(results) == {Errno.OK}
            grown = (peak_rss_kib(pid) - before) / 1024
            assert grown < 48, f"HV peak RSS grew {grown:.0f} MiB"
        finally:
            await hv.close()
    run(scenario())


def test_guest_names_are_dns_labels():
    """Certificates exist only for identities the server name binding can tell apart."""
    from pefsim.tls import check_identity

    for bad in ("guest:../../x", "guest:Upper", "guest:", "guest:a_b", "root", "guest:" + "a" * 64):
        with pytest.raises(ValueError):
            check_identity(bad)
    assert check_identity("guest:g-1") == "guest:g-1"
