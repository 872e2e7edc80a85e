"""The secure-VM life cycle across real UV, HV and guest processes."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from pefsim import rpc
from pefsim.abi import PAGE_SIZE, Errno, GfnState, H, Role, SecureGuest, U
from pefsim.blob import new_signing_key
from pefsim.image import GuestImage
from pefsim.ops.stack import ROOT
from pefsim.v1 import common_pb2, guest_pb2, hypervisor_pb2 as hpb, ultravisor_pb2 as upb
from pefsim.v1 import ultravisor_pb2_grpc
from tests.conftest import history, unique
from tests.helpers import MEM, blob_for, boot_guest, operating


def uv_status(op):
    return op.uv.stub.UvStatus(upb.UvStatusRequest())


def hv_ram(stack, lpid: int) -> bytes:
    """The HV's copy of a VM's slot-0 RAM, from its data directory."""
    return (stack.run_dir / "hv-data" / f"vm-{lpid}" / "slot-0.ram").read_bytes()


def vm_info(status, lpid):
    return next(v for v in status.vms if v.lpid == lpid)


def test_demo_json_reports_four_outcomes_intact():
    """`pefsim demo --json` (the README's first command) reports the four outcomes, all intact."""
    out = subprocess.run([sys.executable, "-m", "pefsim", "demo", "--json", "--mem-mib", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    doc = json.loads(out.stdout)
    assert [g["outcome"] for g in doc["guests"]] == ["secure", "aborted", "terminated", "reset"]
    assert all(g["memory_intact"] for g in doc["guests"])
    assert doc["uv_secure_pages_in_use"] == 0
    aborted = doc["guests"][1]
    assert aborted["esm_rc"] == H.H_PARAMETER and aborted["abort_latency_s"] > 0
    assert doc["guests"][2]["terminate_latency_s"] > 0


def test_secure_guest_runs_from_uv_memory(stack, run):
    """A guest goes secure: every page went to the UV, the HV holds only zeroed device pages."""
    async def scenario():
        async with operating(stack) as op:
            name = unique("sec")
            rep = await boot_guest(stack, op, name)
            assert (rep.outcome, rep.esm_rc, rep.msr_s, rep.memory_intact) == ("secure", U.U_SUCCESS, True, True)
            assert rep.resumes == 1
            vm = vm_info(await op.hv.stub.HvStatus(hpb.HvStatusRequest()), rep.lpid)
            assert vm.secure_guest == SecureGuest.KVMPPC_SECURE_INIT_START | SecureGuest.KVMPPC_SECURE_INIT_DONE
            assert vm.gfns_by_state["GFN_SECURE_IN"] == MEM // PAGE_SIZE
            svm = next(s for s in (await uv_status(op)).svms if s.lpid == rep.lpid)
            assert (svm.state, svm.secure_pages) == ("SVM_SECURE", MEM // PAGE_SIZE)
            # the HV's copy of guest RAM holds no plaintext: every page is zero
            ram = hv_ram(stack, rep.lpid)
            assert ram == bytes(len(ram))
            await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=rep.lpid))
    run(scenario())


@pytest.mark.parametrize("bad, reason", [
    ({"override": {"kernel": "0" * 128}}, "blob-mismatch-kernel"),
    ({"override": {"bootargs": "1" * 128}}, "blob-mismatch-bootargs"),
    ({"omit": ("initrd",)}, "blob-missing-initrd"),
    ({"key": "other"}, "blob-bad-signature"),
])
def test_bad_blob_aborts_with_memory_intact(stack, run, bad, reason):
    """Any blob mismatch, missing item or bad signature -> abort: the guest resumes after UV_ESM
    as a normal VM with H_PARAMETER, memory byte-identical, and the UV forgets the SVM."""
    async def scenario():
        async with operating(stack) as op:
            name = unique("bad")
            kw = dict(bad)
            if kw.get("key") == "other":
                kw["key"] = new_signing_key()
            rep = await boot_guest(stack, op, name, blob=blob_for(stack, name, **kw))
            assert (rep.outcome, rep.esm_rc, rep.msr_s) == ("aborted", H.H_PARAMETER, False)
            assert rep.memory_intact and rep.pages_checked == MEM // PAGE_SIZE
            assert rep.resumes == 1 and rep.abort_latency_s > 0
            status = await uv_status(op)
            assert rep.lpid in status.terminated_lpids
            assert all(s.lpid != rep.lpid for s in status.svms)
            vm = vm_info(await op.hv.stub.HvStatus(hpb.HvStatusRequest()), rep.lpid)
            assert vm.secure_guest == 0 and vm.gfns_by_state["GFN_NORMAL"] == vm.npages
            await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=rep.lpid))
    run(scenario())
    metrics = urllib.request.urlopen(f"http://{stack.metrics_targets()['uv']}/metrics").read().decode()
    assert f'pefsim_uv_esm_failures_total{{reason="{reason}"}}' in metrics


def test_abort_pages_come_back_from_the_uv(stack, run):
    """The abort really copies each page back out of the UV: the HV scrubbed its pages when they
    went secure, so the intact memory the guest finds came through UV_PAGE_OUT."""
    async def scenario():
        async with operating(stack) as op:
            name = unique("back")
            rep = await boot_guest(stack, op, name, blob=blob_for(stack, name, omit=("kernel",)))
            assert rep.outcome == "aborted" and rep.memory_intact
            outs = [e for e in history(stack, "hv") if e["call"] == "H_SVM_INIT_ABORT"
                    and e["lpid"] == rep.lpid]
            assert outs and outs[-1]["rc_name"] == "H_PARAMETER"
            page_outs = [e for e in history(stack, "uv") if e["lpid"] == rep.lpid
                         and (e["call"] == "UV_PAGE_OUT" or e.get("batches") == "UV_PAGE_OUT")]
            assert sum(e.get("pages", 1) for e in page_outs) == MEM // PAGE_SIZE
            assert {e["state"] for e in page_outs} == {"SVM_ABORT"}
            assert {name for e in page_outs for name in e.get("results", {e.get("rc_name"): 1})} == {"U_SUCCESS"}
            await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=rep.lpid))
    run(scenario())


def test_no_secure_capability_aborts(stack, run):
    """Without KVM_CAP_PPC_SECURE_GUEST, H_SVM_INIT_START answers H_AUTHORITY and ESM aborts."""
    async def scenario():
        async with operating(stack) as op:
            rep = await boot_guest(stack, op, unique("nocap"), extra=("--no-secure-capable",))
            assert (rep.outcome, rep.esm_rc, rep.memory_intact) == ("aborted", H.H_PARAMETER, True)
            starts = [e for e in history(stack, "hv") if e["call"] == "H_SVM_INIT_START"
                      and e["lpid"] == rep.lpid]
            assert starts[-1]["rc_name"] == "H_AUTHORITY"
    run(scenario())


def test_secure_memory_exhaustion_aborts(stack_factory, run):
    """Running out of secure memory is a resource failure that aborts ESM (the memslot cannot be
    registered), and leaves the guest intact."""
    small = stack_factory(pool_pages=8)

    async def scenario():
        async with operating(small) as op:
            rep = await boot_guest(small, op, unique("big"))
            assert (rep.outcome, rep.esm_rc, rep.memory_intact) == ("aborted", H.H_PARAMETER, True)
            regs = [e for e in history(small, "uv") if e["call"] == "UV_REGISTER_MEM_SLOT"]
            assert regs[-1]["rc_name"] == "U_PARAMETER"
            assert (await uv_status(op)).pool_pages_in_use == 0
    run(scenario())


def test_abort_returning_to_uv_v10(stack_factory, run):
    """The v10 proposal (abort_return = uv): the HV returns H_SUCCESS to the UV, which
    terminates the SVM and resumes the guest with H_PARAMETER; memory intact; the HV's
    INIT_ABORT flag clears when the vCPU next enters the HV."""
    v10 = stack_factory(abort_return="uv")

    async def scenario():
        async with operating(v10) as op:
            name = unique("v10")
            rep = await boot_guest(v10, op, name, blob=blob_for(v10, name, omit=("bootargs",)))
            assert (rep.outcome, rep.esm_rc, rep.memory_intact) == ("aborted", H.H_PARAMETER, True)
            assert rep.resumed_by == Role.ROLE_UV
            aborts = [e for e in history(v10, "hv") if e["call"] == "H_SVM_INIT_ABORT"]
            assert aborts[-1]["rc_name"] == "H_SUCCESS"
            vm = vm_info(await op.hv.stub.HvStatus(hpb.HvStatusRequest()), rep.lpid)
            assert vm.secure_guest == 0  # the guest's memory check entered the HV: flag cleared
            assert rep.lpid in (await uv_status(op)).terminated_lpids
    run(scenario())


def test_measured_only_esm(stack_factory, run):
    """ESM_COPY_MEASURED: the UV pages in the FDT, blob, kernel and initrd only; INIT_DONE sweeps
    the rest without copying (they read as zeros once secure)."""
    measured = stack_factory(esm_copy="measured")

    async def scenario():
        async with operating(measured) as op:
            name = unique("meas")
            image = GuestImage.of_size(name, MEM)
            rep = await boot_guest(measured, op, name)
            assert (rep.outcome, rep.memory_intact) == ("secure", True)
            page_ins = [e for e in history(measured, "uv") if e["call"] == "UV_PAGE_IN"
                        and e["lpid"] == rep.lpid]
            assert len(page_ins) == image.data_start // PAGE_SIZE - 1  # kernel .. blob
            await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=rep.lpid))
    run(scenario())


def test_host_touch_pages_out_ciphertext_and_tamper_is_refused(stack, run):
    """After INIT_DONE the host touching a page gets AES-GCM ciphertext only; a tampered or
    replayed ciphertext is refused with U_P3 and the page stays intact in the UV's keeping."""
    async def scenario():
        async with operating(stack) as op:
            name = unique("enc")
            rep = await boot_guest(stack, op, name)
            image = GuestImage.of_size(name, MEM)
            gfn = image.npages - 1
            ram = stack.run_dir / "hv-data" / f"vm-{rep.lpid}" / "slot-0.ram"
            off = gfn * PAGE_SIZE
            touch = await op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=rep.lpid, gpa=off))
            assert touch.errno == Errno.OK and touch.state == GfnState.GFN_SECURE_OUT
            assert touch.data != image.page(gfn) and len(touch.data) == PAGE_SIZE
            old_cipher = touch.data
            # tamper: flip a byte of the ciphertext in the HV's RAM; the SVM's access is refused
            with open(ram, "r+b") as fh:
                fh.seek(off)
                fh.write(bytes([old_cipher[0] ^ 1]))
            verify = (await op.guest(name).Verify(guest_pb2.VerifyRequest())).report
            assert not verify.memory_intact
            ins = [e for e in history(stack, "uv") if e["call"] == "UV_PAGE_IN" and e["lpid"] == rep.lpid]
            assert ins[-1]["rc_name"] == "U_P3"
            # put the real ciphertext back: the page decrypts and is intact
            with open(ram, "r+b") as fh:
                fh.seek(off)
                fh.write(old_cipher[:1])
            assert (await op.guest(name).Verify(guest_pb2.VerifyRequest())).report.memory_intact
            # replay: page out again (a new version), then offer the old ciphertext
            again = await op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=rep.lpid, gpa=off))
            assert again.data != old_cipher
            with open(ram, "r+b") as fh:
                fh.seek(off)
                fh.write(old_cipher)
            assert not (await op.guest(name).Verify(guest_pb2.VerifyRequest())).report.memory_intact
            ins = [e for e in history(stack, "uv") if e["call"] == "UV_PAGE_IN" and e["lpid"] == rep.lpid]
            assert ins[-1]["rc_name"] == "U_P3"
            with open(ram, "r+b") as fh:
                fh.seek(off)
                fh.write(again.data)
            assert (await op.guest(name).Verify(guest_pb2.VerifyRequest())).report.memory_intact
            await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=rep.lpid))
    run(scenario())


def test_share_unshare_and_page_inval(stack, run):
    """Shared pages are zeroed on share, readable by both sides, zeroed on unshare; the HV's
    unmap of a shared page invalidates the UV's mapping, which the next access restores."""
    async def scenario():
        async with operating(stack) as op:
            name = unique("share")
            rep = await boot_guest(stack, op, name)
            ex = await op.guest(name).Exercise(guest_pb2.ExerciseRequest())
            assert ex.ok, ex.steps
            assert any("same bytes" in s for s in ex.steps)
            # share again, unmap it on the host side (MMU notifier) -> UV_PAGE_INVAL
            image = GuestImage.of_size(name, MEM)
            gfn = image.npages - 2
            vcpu = common_pb2.VcpuContext(lpid=rep.lpid, msr_s=True)
            svm = rpc.Peer(stack.uv_addr, Role.ROLE_GUEST, ultravisor_pb2_grpc.UltravisorServiceStub, name,
                           stack.tls(f"guest:{name}"), "uv")
            try:
                share = await svm.stub.UV_SHARE_PAGE(upb.UvSharePageRequest(vcpu=vcpu, gfn=gfn, npages=1))
                assert share.rc == U.U_SUCCESS
                unmap = await op.hv.stub.HostUnmapPage(hpb.HostUnmapPageRequest(lpid=rep.lpid, gpa=gfn * PAGE_SIZE))
                assert unmap.errno == Errno.OK
                inval = [e for e in history(stack, "uv") if e["call"] == "UV_PAGE_INVAL" and e["lpid"] == rep.lpid]
                assert inval[-1]["rc_name"] == "U_SUCCESS"
                svm_info = next(s for s in (await uv_status(op)).svms if s.lpid == rep.lpid)
                assert svm_info.shared_pages == 1
                load = await svm.stub.SvmLoad(upb.SvmLoadRequest(vcpu=vcpu, gpa=gfn * PAGE_SIZE, npages=1))
                assert load.rc == U.U_SUCCESS and load.data == bytes(PAGE_SIZE)
                all_off = await svm.stub.UV_UNSHARE_ALL_PAGES(upb.UvUnshareAllPagesRequest(vcpu=vcpu))
                assert all_off.rc == U.U_SUCCESS
                svm_info = next(s for s in (await uv_status(op)).svms if s.lpid == rep.lpid)
                assert svm_info.shared_pages == 0
            finally:
                await svm.close()
            await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=rep.lpid))
    run(scenario())


def test_memslot_hotplug_while_secure(stack, run):
    """A memslot added to a secure VM is registered with the UV (and its GFNs made secure); a
    deleted one is dropped and unregistered."""
    async def scenario():
        async with operating(stack) as op:
            rep = await boot_guest(stack, op, unique("hotplug"))
            slot = common_pb2.Memslot(slot_id=1, base_gfn=1024, npages=4)
            add = await op.hv.stub.SetMemslot(hpb.SetMemslotRequest(lpid=rep.lpid, slot=slot))
            assert add.errno == Errno.OK
            svm = next(s for s in (await uv_status(op)).svms if s.lpid == rep.lpid)
            assert svm.memslots == 2 and svm.reserved_pages == MEM // PAGE_SIZE + 4
            vm = vm_info(await op.hv.stub.HvStatus(hpb.HvStatusRequest()), rep.lpid)
            assert vm.gfns_by_state["GFN_SECURE_IN"] == MEM // PAGE_SIZE + 4
            dup = await op.hv.stub.SetMemslot(hpb.SetMemslotRequest(lpid=rep.lpid, slot=slot))
            assert dup.errno == Errno.EEXIST
            gone = await op.hv.stub.SetMemslot(hpb.SetMemslotRequest(lpid=rep.lpid, slot=slot, delete=True))
            assert gone.errno == Errno.OK
            svm = next(s for s in (await uv_status(op)).svms if s.lpid == rep.lpid)
            assert svm.memslots == 1 and svm.reserved_pages == MEM // PAGE_SIZE
            await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=rep.lpid))
    run(scenario())


def test_reset_needs_stopped_vcpus_and_drops_secure_content(stack, run):
    """KVM_PPC_SVM_OFF: EBUSY while a vCPU runs; then secure contents dropped without page-out,
    memslots unregistered, the SVM terminated; the HV keeps no plaintext of them."""
    async def scenario():
        async with operating(stack) as op:
            rep = await boot_guest(stack, op, unique("reset"))
            busy = await op.hv.stub.ResetVm(hpb.ResetVmRequest(lpid=rep.lpid))
            assert busy.errno == Errno.EBUSY
            await op.hv.stub.StopVm(hpb.StopVmRequest(lpid=rep.lpid))
            done = await op.hv.stub.ResetVm(hpb.ResetVmRequest(lpid=rep.lpid))
            assert done.errno == Errno.OK
            again = await op.hv.stub.ResetVm(hpb.ResetVmRequest(lpid=rep.lpid))
            assert again.errno == Errno.OK  # INIT_START clear: no-op
            uv_calls = [e["call"] for e in history(stack, "uv") if e.get("lpid") == rep.lpid]
            assert "UV_UNREGISTER_MEM_SLOT" in uv_calls and uv_calls[-1] == "UV_SVM_TERMINATE"
            assert "UV_PAGE_OUT" not in uv_calls
            ram = hv_ram(stack, rep.lpid)
            assert ram == bytes(len(ram))
            await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=rep.lpid))
    run(scenario())


def test_insecure_stack_runs_the_life_cycle(stack_factory, run):
    """With --insecure (roles asserted in metadata) the life cycle and the role checks work too."""
    from pefsim.ops.demo import run_demo, succeeded

    plain = stack_factory(insecure=True)
    summary = run(run_demo(plain, MEM))
    assert succeeded(summary), summary["guests"]

    async def wrong_role():
        guest = rpc.Peer(plain.uv_addr, Role.ROLE_GUEST, ultravisor_pb2_grpc.UltravisorServiceStub, "someone")
        try:
            return (await guest.stub.UV_SVM_TERMINATE(upb.UvSvmTerminateRequest(lpid=1))).rc
        finally:
            await guest.close()
    assert run(wrong_role()) == U.U_PERMISSION
