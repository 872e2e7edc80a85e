"""A hostile hypervisor, hostile guests and a hostile network, against real processes under mTLS.

Each case asserts the documented answer, that the UV (or HV) keeps serving, that no plaintext of a
secure VM reaches the attacker, and that other SVMs are unaffected. (Every call in every wrong
state, every bad argument and every wrong caller is also a row of the conformance table.)
"""
from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest

from pefsim import rpc
from pefsim.abi import HV_RA_BASE, PAGE_SHIFT, PAGE_SIZE, Errno, H, Role, U
from pefsim.ops.demo import Operator
from pefsim.ops.health import check
from pefsim.image import GuestImage
from pefsim.tls import Tls, make_ca, make_cert
from pefsim.v1 import (common_pb2, guest_pb2, guest_pb2_grpc, hypervisor_pb2 as hpb, hypervisor_pb2_grpc,
                       ultravisor_pb2 as upb, ultravisor_pb2_grpc)
from tests.conftest import unique
from tests.helpers import MEM, blob_for, boot_guest, operating

UV_STUB, HV_STUB = ultravisor_pb2_grpc.UltravisorServiceStub, hypervisor_pb2_grpc.HypervisorServiceStub


def as_(stack, identity: str, target: str, stub, server_role: str) -> rpc.Peer:
    role = rpc.ROLE_NAMES[identity.split(":")[0]]
    return rpc.Peer(target, role, stub, identity.partition(":")[2], stack.tls(identity), server_role)


async def secure_guest(stack, op, prefix="victim"):
    rep = await boot_guest(stack, op, unique(prefix))
    assert rep.outcome == "secure"
    return rep


async def svm_info(op, lpid):
    status = await op.uv.stub.UvStatus(upb.UvStatusRequest())
    return next((s for s in status.svms if s.lpid == lpid), None)


async def still_intact(op, rep) -> bool:
    return (await op.guest(rep.name).Verify(guest_pb2.VerifyRequest())).report.memory_intact


def test_no_certificate_never_reaches_a_handler(stack, run):
    """A plaintext client, or one with a certificate from another CA, fails the handshake: no call
    is served (the UV's history gets no line)."""
    async def scenario(tmp):
        def terminates():
            return [line for line in (stack.run_dir / "uv.history.jsonl").read_text().splitlines()
                    if '"UV_SVM_TERMINATE"' in line and '"lpid": 424242' in line]
        before = terminates()
        plain = rpc.Peer(stack.uv_addr, Role.ROLE_HV, UV_STUB)
        make_ca(tmp)
        make_cert(tmp, "hv")
        forged = rpc.Peer(stack.uv_addr, Role.ROLE_HV, UV_STUB, "", Tls(tmp, "hv"), "uv")
        for peer in (plain, forged):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await peer.stub.UV_SVM_TERMINATE(upb.UvSvmTerminateRequest(lpid=424242), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            await peer.close()
        assert terminates() == before == []
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        run(scenario(Path(tmp)))


def test_guest_certificate_gets_u_permission_for_hv_ucalls(stack, run):
    """A guest presenting its own certificate for HV-only ucalls gets U_PERMISSION and nothing
    changes in the SVM."""
    async def scenario():
        async with operating(stack) as op:
            rep = await secure_guest(stack, op)
            before = await svm_info(op, rep.lpid)
            guest = as_(stack, f"guest:{rep.name}", stack.uv_addr, UV_STUB, "uv")
            lpid, gpa = rep.lpid, GuestImage.of_size(rep.name, MEM).data_start
            answers = [
                (await guest.stub.UV_PAGE_OUT(upb.UvPageOutRequest(lpid=lpid, dest_ra=HV_RA_BASE, src_gpa=gpa,
                                                                   order=PAGE_SHIFT))).rc,
                (await guest.stub.UV_SVM_TERMINATE(upb.UvSvmTerminateRequest(lpid=lpid))).rc,
                (await guest.stub.UV_REGISTER_MEM_SLOT(upb.UvRegisterMemSlotRequest(
                    lpid=lpid, start_gpa=1 << 30, size=PAGE_SIZE, slotid=3))).rc,
                (await guest.stub.UV_UNREGISTER_MEM_SLOT(upb.UvUnregisterMemSlotRequest(lpid=lpid, slotid=0))).rc,
                (await guest.stub.UV_PAGE_IN(upb.UvPageInRequest(lpid=lpid, src_ra=HV_RA_BASE, dest_gpa=gpa,
                                                                 order=PAGE_SHIFT, data=bytes(PAGE_SIZE)))).rc,
            ]
            assert answers == [U.U_PERMISSION] * len(answers)
            assert await svm_info(op, rep.lpid) == before
            assert await still_intact(op, rep)
            await guest.close()
    run(scenario())


def test_guest_cannot_reach_another_guests_vm_or_svm(stack, run):
    """Guest B's certificate gets U_PERMISSION for A's SVM calls and PERMISSION_DENIED for A's
    VM at the HV; A is untouched."""
    async def scenario():
        async with operating(stack) as op:
            a = await secure_guest(stack, op, "a")
            b = await secure_guest(stack, op, "b")
            uv_b = as_(stack, f"guest:{b.name}", stack.uv_addr, UV_STUB, "uv")
            hv_b = as_(stack, f"guest:{b.name}", stack.hv_addr, HV_STUB, "hv")
            vcpu = common_pb2.VcpuContext(lpid=a.lpid, msr_s=True)
            assert (await uv_b.stub.SvmLoad(upb.SvmLoadRequest(vcpu=vcpu, gpa=0, npages=1))).rc == U.U_PERMISSION
            assert (await uv_b.stub.UV_SHARE_PAGE(upb.UvSharePageRequest(vcpu=vcpu, gfn=10, npages=1))).rc \
                == U.U_PERMISSION
            for call, req in (("DestroyVm", hpb.DestroyVmRequest(lpid=a.lpid)),
                              ("VcpuLoad", hpb.VcpuLoadRequest(lpid=a.lpid, gpa=0, npages=1)),
                              ("HostReadPage", hpb.HostReadPageRequest(lpid=a.lpid, gpa=0))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await getattr(hv_b.stub, call)(req)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, call
            assert (await svm_info(op, a.lpid)).state == "SVM_SECURE"
            assert await still_intact(op, a)
            await uv_b.close()
            await hv_b.close()
    run(scenario())


def test_uv_esm_for_another_guests_vm_is_refused(stack, run):
    """Guest B makes UV_ESM claiming A's (normal) VM: the HV refuses INIT_START (H_AUTHORITY)
    before touching A's VM; B gets H_PARAMETER; A runs on, memory intact, still normal."""
    async def scenario():
        async with operating(stack) as op:
            a = await boot_guest(stack, op, unique("normal"), extra=("--no-svm",))
            b_name = unique("thief")
            thief = as_(stack, f"guest:{b_name}", stack.uv_addr, UV_STUB, "uv")
            image = GuestImage.of_size(a.name, MEM)
            resp = await thief.stub.UV_ESM(upb.UvEsmRequest(
                vcpu=common_pb2.VcpuContext(lpid=a.lpid, nip=0x11004), kbase=image.kbase, fdt=image.fdt))
            assert (resp.rc, resp.msr_s) == (H.H_PARAMETER, False)
            vm = next(v for v in (await op.hv.stub.HvStatus(hpb.HvStatusRequest())).vms if v.lpid == a.lpid)
            assert vm.state == "VM_NORMAL" and vm.gfns_by_state["GFN_NORMAL"] == vm.npages
            assert await svm_info(op, a.lpid) is None
            assert await still_intact(op, a)
            await thief.close()
    run(scenario())


def test_hostile_hv_bad_page_ins(stack, run):
    """An HV (certificate and all) that pages in outside memory, unaligned, with a wrong order,
    a page already in, a tampered or a replayed ciphertext: each gets its code, and the guest's
    memory stays intact."""
    async def scenario():
        op = Operator.of(stack)
        hv = as_(stack, "hv", stack.uv_addr, UV_STUB, "uv")
        try:
            rep = await secure_guest(stack, op)
            image = GuestImage.of_size(rep.name, MEM)
            gpa = image.data_start
            first = await op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=rep.lpid, gpa=gpa))
            assert first.errno == Errno.OK and first.data != image.page(gpa >> PAGE_SHIFT)
            assert await still_intact(op, rep)  # faults it back in (version 2 next time)
            second = await op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=rep.lpid, gpa=gpa))

            def page_in(**kw):
                args = dict(lpid=rep.lpid, src_ra=HV_RA_BASE, dest_gpa=gpa, order=PAGE_SHIFT, data=second.data)
                args.update(kw)
                return hv.stub.UV_PAGE_IN(upb.UvPageInRequest(**args))
            assert (await page_in(dest_gpa=1 << 40)).rc == U.U_P3
            assert (await page_in(dest_gpa=gpa + 8)).rc == U.U_P3
            assert (await page_in(order=12)).rc == U.U_P5
            assert (await page_in(data=bytes([second.data[0] ^ 1]) + second.data[1:])).rc == U.U_P3
            assert (await page_in(data=first.data)).rc == U.U_P3  # replay of the older version
            assert (await page_in(dest_gpa=0)).rc == U.U_P2  # a page already in
            assert await still_intact(op, rep)
        finally:
            await hv.close()
            await op.close()
    run(scenario())


def test_hostile_hv_page_out_flood_and_foreign_terminate(stack, run):
    """A flood of UV_PAGE_OUT (and UV_SVM_TERMINATE of an lpid with no SVM): the UV answers each
    (or refuses the excess with RESOURCE_EXHAUSTED), hands out no plaintext, loses nothing, and
    serves the other SVM meanwhile."""
    async def scenario():
        op = Operator.of(stack)
        hv = as_(stack, "hv", stack.uv_addr, UV_STUB, "uv")
        try:
            victim = await secure_guest(stack, op)
            other = await secure_guest(stack, op, "other")
            image = GuestImage.of_size(victim.name, MEM)
            plain = {image.page(g) for g in range(image.npages)}

            async def one(gfn):
                try:
                    return await hv.stub.UV_PAGE_OUT(upb.UvPageOutRequest(
                        lpid=victim.lpid, dest_ra=HV_RA_BASE, src_gpa=gfn << PAGE_SHIFT, order=PAGE_SHIFT))
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
            flood = asyncio.gather(*(one(g % image.npages) for g in range(1000)))
            other_ok = await still_intact(op, other)
            answers = await flood
            codes = {a if isinstance(a, grpc.StatusCode) else U(a.rc).name for a in answers}
            assert codes <= {"U_SUCCESS", "U_PARAMETER", grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
            assert not any(a.data in plain for a in answers if not isinstance(a, grpc.StatusCode))
            assert other_ok
            pool = (await op.uv.stub.UvStatus(upb.UvStatusRequest())).pool_pages_in_use
            assert (await hv.stub.UV_SVM_TERMINATE(upb.UvSvmTerminateRequest(lpid=999_999))).rc == U.U_SUCCESS
            assert (await op.uv.stub.UvStatus(upb.UvStatusRequest())).pool_pages_in_use == pool
            # the pages the flood took are ciphertext in the attacker's hands; the real HV still
            # has what it had: the guest's own pages come back when it reads them
            info = await svm_info(op, victim.lpid)
            assert info.state == "SVM_SECURE"
        finally:
            await hv.close()
            await op.close()
    run(scenario())


def test_dropped_and_truncated_streams(stack, run):
    """A bulk stream cut mid-way, and frames cut short: errors for that stream, nothing else."""
    async def scenario():
        op = Operator.of(stack)
        hv = as_(stack, "hv", stack.uv_addr, UV_STUB, "uv")
        try:
            rep = await secure_guest(stack, op)
            call = hv.channel.stream_stream("/pefsim.v1.UltravisorService/UvPageInStream",
                                            request_serializer=bytes,
                                            response_deserializer=upb.PageBatchResult.FromString)

            async def truncated():
                yield b"\x00\x00\x00\x40abc"
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in call(truncated(), timeout=10):
                    pass
            from pefsim.dataplane import encode

            async def then_hang_up():
                yield encode(upb.PageInBatch(lpid=rep.lpid, pages=[upb.PageRef(
                    ra=HV_RA_BASE, gpa=0, order=PAGE_SHIFT)]), [bytes(PAGE_SIZE)])
                await asyncio.sleep(30)
            stream = call(then_hang_up(), timeout=30)
            result = await stream.read()
            assert list(result.rc) == [U.U_P2]  # a page already in
            stream.cancel()
            assert await still_intact(op, rep)
            assert check(stack.uv_addr, tls=stack.tls("operator"), server_role="uv")
        finally:
            await hv.close()
            await op.close()
    run(scenario())


def test_hostile_hv_cannot_make_the_uv_build_huge_frames(stack, run):
    """UvPageOutStream with an absurd batch_pages: the UV caps each frame (MAX_BATCH pages with
    data), so one request cannot make it hold the whole SVM in one message; page runs whose
    counts name billions of pages are refused (INVALID_ARGUMENT) in both bulk calls."""
    from pefsim.dataplane import decoder
    from services.ultravisor.core.bulk import MAX_BATCH

    async def scenario():
        op = Operator.of(stack)
        hv = as_(stack, "hv", stack.uv_addr, UV_STUB, "uv")
        try:
            rep = await secure_guest(stack, op)
            npages = MEM // PAGE_SIZE
            call = hv.channel.unary_stream("/pefsim.v1.UltravisorService/UvPageOutStream",
                                           request_serializer=upb.PageOutRequest.SerializeToString,
                                           response_deserializer=decoder(upb.PageOutBatch))
            refs = [upb.PageRef(ra=HV_RA_BASE, gpa=(i % npages) << PAGE_SHIFT, order=PAGE_SHIFT)
                    for i in range(3 * MAX_BATCH + 5)]
            frames = [f async for f in call(upb.PageOutRequest(lpid=rep.lpid, batch_pages=10**6, pages=refs),
                                            timeout=30)]
            assert [len(f.header.rc) for f in frames] == [MAX_BATCH] * 3 + [5]
            assert all(len(f.payload) <= MAX_BATCH * PAGE_SIZE for f in frames)
            # runs naming billions of pages: refused whole, before any page is looked at
            bomb = [upb.PageRef(ra=HV_RA_BASE, gpa=0, order=PAGE_SHIFT, count=0xFFFFFFFF)] * 4
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in call(upb.PageOutRequest(lpid=rep.lpid, pages=bomb), timeout=30):
                    pass
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            from pefsim.dataplane import encode
            stream = hv.channel.stream_stream("/pefsim.v1.UltravisorService/UvPageInStream",
                                              request_serializer=bytes,
                                              response_deserializer=upb.PageBatchResult.FromString)

            async def bomb_frames():
                yield encode(upb.PageInBatch(lpid=rep.lpid, pages=bomb, shared_memory=True))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stream(bomb_frames(), timeout=30):
                    pass
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert check(stack.uv_addr, tls=stack.tls("operator"), server_role="uv")
        finally:
            await hv.close()
            await op.close()
    run(scenario())


SERVICES = [("uv", ultravisor_pb2_grpc, "UltravisorService", upb), ("hv", hypervisor_pb2_grpc,
            "HypervisorService", hpb), ("guest", guest_pb2_grpc, "GuestService", guest_pb2)]


def test_malformed_messages_at_every_rpc(stack, run):
    """Garbage bytes as the request of every RPC of every service: a gRPC error, never a crash;
    every service still serves afterwards."""
    async def scenario():
        async with operating(stack) as op:
            rep = await secure_guest(stack, op, "fuzzed")
            targets = {"uv": stack.uv_addr, "hv": stack.hv_addr, "guest": stack.guest_addr(rep.name)}
            identities = {"uv": "hv", "hv": "uv", "guest": "hv"}
            garbage = [b"\xff" * 7, os.urandom(64), b"\x0a\xff\xff\xff\xff\x0f"]
            answered = 0
            for svc, _, service, pb2 in SERVICES:
                peer = as_(stack, identities[svc], targets[svc], HV_STUB, svc)
                for method in pb2.DESCRIPTOR.services_by_name[service].methods:
                    path = f"/pefsim.v1.{service}/{method.name}"
                    for junk in garbage:
                        try:
                            if method.client_streaming:
                                async def frames(j=junk):
                                    yield j
                                call = peer.channel.stream_stream(path, request_serializer=bytes,
                                                                  response_deserializer=bytes)
                                async for _ in call(frames(), timeout=5):
                                    pass
                            elif method.server_streaming:
                                call = peer.channel.unary_stream(path, request_serializer=bytes,
                                                                 response_deserializer=bytes)
                                async for _ in call(junk, timeout=5):
                                    break
                            else:
                                call = peer.channel.unary_unary(path, request_serializer=bytes,
                                                                response_deserializer=bytes)
                                await call(junk, timeout=5)
                        except grpc.aio.AioRpcError as exc:
                            assert exc.code() not in (grpc.StatusCode.UNAVAILABLE,), (path, exc.code())
                        answered += 1
                await peer.close()
            assert answered >= 3 * 40
            for svc, addr in targets.items():
                assert check(addr, tls=stack.tls("operator"), server_role=svc), svc
            assert await still_intact(op, rep)
    run(scenario())


def test_a_flooding_guest_does_not_starve_another(stack_factory, run):
    """One guest floods the UV with loads that wait on the (stopped) HV; beyond its in-flight
    allowance it gets RESOURCE_EXHAUSTED, and another guest's memory check completes meanwhile."""
    small = stack_factory(uv_args=("--max-inflight-per-peer", "16"))

    async def scenario():
        async with operating(small) as op:
            noisy = await secure_guest(small, op, "noisy")
            quiet = await secure_guest(small, op, "quiet")
            peer = as_(small, f"guest:{noisy.name}", small.uv_addr, UV_STUB, "uv")
            vcpu = common_pb2.VcpuContext(lpid=noisy.lpid, msr_s=True)
            shared = GuestImage.of_size(noisy.name, MEM).npages - 1  # loads of it wait on the HV
            assert (await peer.stub.UV_SHARE_PAGE(upb.UvSharePageRequest(vcpu=vcpu, gfn=shared, npages=1))).rc \
                == U.U_SUCCESS

            async def load():
                try:
                    return (await peer.stub.SvmLoad(upb.SvmLoadRequest(vcpu=vcpu, gpa=shared << PAGE_SHIFT,
                                                                       npages=1))).rc
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
            # The HV is stopped meanwhile, so the loads the UV admits wait on it and the
            # allowance is really full (with a quick HV they could all fit in it, one after another).
            hv_pid = small.procs["hv"].popen.pid
            os.kill(hv_pid, signal.SIGSTOP)
            try:
                flood = asyncio.gather(*(load() for _ in range(400)))
                quiet_ok = await asyncio.wait_for(still_intact(op, quiet), 30)
            finally:
                os.kill(hv_pid, signal.SIGCONT)
            results = await flood
            assert quiet_ok
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in results and U.U_SUCCESS in results
            await peer.close()
    run(scenario())


def test_limits_on_svms_and_secure_memory_per_svm(stack_factory, run):
    """Beyond --max-svms, UV_ESM answers U_RETRY; a guest larger than --max-svm-pages cannot
    register its memory, so its ESM aborts (memory intact)."""
    limited = stack_factory(uv_args=("--max-svms", "1", "--max-svm-pages", "32"))

    async def scenario():
        async with operating(limited) as op:
            first = await boot_guest(limited, op, unique("one"))
            assert first.outcome == "secure"
            second = await boot_guest(limited, op, unique("two"))
            assert (second.outcome, second.esm_rc) == ("failed", U.U_RETRY)
            await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=first.lpid))
            big_name = unique("big")
            big = await boot_guest(limited, op, big_name, mem=4 << 20, blob=blob_for(limited, big_name, 4 << 20))
            assert (big.outcome, big.esm_rc, big.memory_intact) == ("aborted", H.H_PARAMETER, True)
    run(scenario())


def test_insecure_mode_warns(tmp_path):
    import subprocess
    import sys

    from pefsim.ops.stack import ROOT

    out = subprocess.run([sys.executable, "-m", "services.ultravisor", "--hv", "127.0.0.1:1", "--insecure",
                          "--trusted-key", "/nonexistent", "--listen", "127.0.0.1:0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert "INSECURE" in out.stderr
    refused = subprocess.run([sys.executable, "-m", "services.hypervisor", "--uv", "127.0.0.1:1",
                              "--data-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "--tls-dir" in refused.stderr


def test_vcpu_resume_only_from_the_hv_or_uv(stack, run):
    """A guest's vCPU takes resumes from the HV or the UV only: another guest's certificate gets
    H_PERMISSION and the vCPU is not disturbed."""
    async def scenario():
        async with operating(stack) as op:
            rep = await secure_guest(stack, op)
            other = as_(stack, "guest:intruder", stack.guest_addr(rep.name), guest_pb2_grpc.GuestServiceStub, "guest")
            resp = await other.stub.VcpuResume(guest_pb2.VcpuResumeRequest(lpid=rep.lpid, r3=0, msr_s=False))
            assert resp.rc == H.H_PERMISSION
            status = (await op.guest(rep.name).GuestStatus(guest_pb2.GuestStatusRequest())).report
            assert status.outcome == "secure" and status.resumes == 1
            await other.close()
    run(scenario())
