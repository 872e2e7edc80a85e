"""What the services do when a peer dies, freezes or misbehaves (beyond the chaos runs)."""
from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from pefsim.abi import PAGE_SHIFT, Errno, GfnState, H, U, VmState
from pefsim.v1 import guest_pb2, hypervisor_pb2 as hpb, ultravisor_pb2 as upb
from tests.conftest import unique
from tests.helpers import blob_for, boot_guest, metric, operating


def test_hv_that_never_answers_the_abort_costs_one_svm(stack_factory, run):
    """A hostile HV that never finishes H_SVM_INIT_ABORT: the UV keeps the SVM in SVM_ABORT
    (reported), and keeps serving other SVMs (memory, a new ESM); destroying the VM ends it."""
    hostile = stack_factory(mutants=("hv-abort-hangs",))

    async def scenario():
        async with operating(hostile) as op:
            other = await boot_guest(hostile, op, unique("other"))
            assert other.outcome == "secure"
            name = unique("stuck")
            addr = await asyncio.to_thread(hostile.add_guest, name, 1 << 20,
                                           blob_for(hostile, name, omit=("kernel",)))
            op.guest(name, addr)
            stuck = asyncio.ensure_future(op.guest(name).Boot(guest_pb2.BootRequest()))
            await asyncio.sleep(1.5)
            status = await op.uv.stub.UvStatus(upb.UvStatusRequest())
            svm = next(s for s in status.svms if s.state == "SVM_ABORT")
            assert svm.abort_pending_s > 1.0
            assert metric(hostile, "uv", "pefsim_uv_abort_pending_seconds") > 1.0
            # the UV still serves the other SVM, and a new one can go secure
            assert (await op.guest(other.name).Verify(guest_pb2.VerifyRequest())).report.memory_intact
            third = await boot_guest(hostile, op, unique("third"))
            assert third.outcome == "secure" and third.memory_intact
            # the VMM gives up on the stuck VM: destroying it terminates the SVM
            destroyed = await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=svm.lpid))
            assert destroyed.terminated
            status = await op.uv.stub.UvStatus(upb.UvStatusRequest())
            assert all(s.lpid != svm.lpid for s in status.svms)
            stuck.cancel()
    run(scenario())


def test_frozen_hv_does_not_stop_the_uv(stack_factory, run):
    """While the HV is stopped (SIGSTOP), a secure guest still reads and writes its memory
    through the UV; after SIGCONT everything carries on."""
    stack = stack_factory()

    async def scenario():
        async with operating(stack) as op:
            sec = await boot_guest(stack, op, unique("sec"))
            hv = stack.procs["hv"]
            hv.signal(signal.SIGSTOP)
            try:
                rep = (await op.guest(sec.name).Verify(guest_pb2.VerifyRequest(), timeout=20)).report
                assert rep.memory_intact
                assert (await op.uv.stub.UvStatus(upb.UvStatusRequest(), timeout=5)).svms
            finally:
                hv.signal(signal.SIGCONT)
            status = await op.hv.stub.HvStatus(hpb.HvStatusRequest(), timeout=20)
            assert any(v.lpid == sec.lpid for v in status.vms)
    run(scenario())


def test_guest_waits_for_a_restarting_hv(stack_factory, run):
    """A normal VM whose HV is killed waits, and carries on when the HV is back; the HV rebuilt
    its VM (RAM and state) from its data directory."""
    stack = stack_factory()

    async def scenario():
        async with operating(stack) as op:
            normal = await boot_guest(stack, op, unique("normal"), extra=("--no-svm",))
            assert normal.outcome == "normal" and normal.memory_intact
            stack.procs["hv"].kill()
            verify = asyncio.ensure_future(op.guest(normal.name).Verify(guest_pb2.VerifyRequest()))
            await asyncio.sleep(1.0)
            assert not verify.done()  # waiting for the HV
            t0 = time.monotonic()
            await asyncio.to_thread(stack.restart, "hv")
            rep = (await asyncio.wait_for(verify, 30)).report
            assert rep.memory_intact, rep.detail
            assert time.monotonic() - t0 < 10
            deadline = time.monotonic() + 8  # within the HV's session grace period
            while time.monotonic() < deadline:
                status = await op.hv.stub.HvStatus(hpb.HvStatusRequest())
                vm = next(v for v in status.vms if v.lpid == normal.lpid)
                if vm.session:
                    break
                await asyncio.sleep(0.1)
            assert vm.session, "the guest's VMM did not reconnect its session"
            assert status.vms_recovered >= 1
    run(scenario())


def test_vmm_that_does_not_come_back_loses_its_vm(stack_factory, run):
    """After an HV restart, a VM whose VMM (guest process) is gone is destroyed after the grace
    period, and its SVM terminated."""
    stack = stack_factory()

    async def scenario():
        async with operating(stack) as op:
            sec = await boot_guest(stack, op, unique("orphan"))
            stack.procs["hv"].kill()
            stack.procs[f"guest-{sec.name}"].kill()
            await asyncio.to_thread(stack.restart, "hv")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = await op.hv.stub.HvStatus(hpb.HvStatusRequest())
                if all(v.lpid != sec.lpid for v in status.vms):
                    break
                await asyncio.sleep(0.5)
            else:
                raise AssertionError("the orphaned VM was not destroyed")
            uv = await op.uv.stub.UvStatus(upb.UvStatusRequest())
            assert sec.lpid in uv.terminated_lpids and all(s.lpid != sec.lpid for s in uv.svms)
    run(scenario())


async def boot_through_hv_kill(stack, op, name: str, failpoint: str, while_down=None, **blob_kw):
    """Boot guest ``name`` (1 MiB) on an HV armed to kill itself at ``failpoint`` for it; once
    it has (and ``await while_down()`` has returned), restart the HV and return the guest's boot
    report."""
    await asyncio.to_thread(stack.restart, "hv", (f"{failpoint}@{name}",))
    addr = await asyncio.to_thread(stack.add_guest, name, 1 << 20, blob_for(stack, name, **blob_kw))
    boot = asyncio.ensure_future(op.guest(name, addr).Boot(guest_pb2.BootRequest()))
    deadline = time.monotonic() + 30
    while stack.procs["hv"].alive and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not stack.procs["hv"].alive, "the failpoint did not fire"
    if while_down is not None:
        await while_down()
    await asyncio.to_thread(stack.restart, "hv")
    return (await asyncio.wait_for(boot, 60)).report


def test_abort_result_code_is_h_parameter_after_recovery(stack_factory, run):
    """kill -9 of the HV between two page-outs of an abort: the restarted HV finishes it, the
    guest is resumed once with H_PARAMETER and finds all its memory."""
    stack = stack_factory()

    async def scenario():
        async with operating(stack) as op:
            rep = await boot_through_hv_kill(stack, op, unique("mid"), "hv.abort.page_out:5",
                                             omit=("initrd",))
            assert (rep.outcome, rep.esm_rc, rep.resumes, rep.memory_intact) == ("aborted", H.H_PARAMETER, 1, True)
    run(scenario())


def test_init_done_whose_answer_is_lost_is_asked_again(stack_factory, run):
    """kill -9 of the HV after it recorded H_SVM_INIT_DONE, before answering: the UV asks again
    (the call succeeds when repeated) instead of aborting, and the guest comes up secure with all
    its memory, the HV holding it as secure too."""
    stack = stack_factory()

    async def scenario():
        async with operating(stack) as op:
            seen = {}

            async def while_down():  # the UV keeps asking, and says so
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    svms = (await op.uv.stub.UvStatus(upb.UvStatusRequest())).svms
                    waiting = [s for s in svms if s.unanswered_hcall]
                    gauge = metric(stack, "uv", 'pefsim_uv_hcall_unanswered_seconds{call="H_SVM_INIT_DONE"}')
                    if waiting and waiting[0].unanswered_s > 0.2 and gauge > 0.2:
                        seen.update(call=waiting[0].unanswered_hcall, state=waiting[0].state)
                        return
                    await asyncio.sleep(0.05)

            rep = await boot_through_hv_kill(stack, op, unique("done"), "hv.esm.init_done", while_down)
            assert seen == {"call": "H_SVM_INIT_DONE", "state": "SVM_ACTIVE"}
            assert metric(stack, "uv", 'pefsim_uv_hcall_unanswered_seconds{call="H_SVM_INIT_DONE"}') == 0
            assert (rep.outcome, rep.esm_rc, rep.resumes, rep.memory_intact) == ("secure", U.U_SUCCESS, 1, True)
            vm = next(v for v in (await op.hv.stub.HvStatus(hpb.HvStatusRequest())).vms if v.lpid == rep.lpid)
            assert vm.state == VmState.VM_SECURE.name
    run(scenario())


async def secure_guest_with_armed_hv(stack, op, prefix: str, action: str = ""):
    """Boot a guest to secure, then restart the HV with hv.secure.page_out armed for it (``action``:
    "" kills the HV there, "=lose" drops the UV's answer); returns the guest's report."""
    rep = await boot_guest(stack, op, unique(prefix))
    assert rep.outcome == "secure"
    await asyncio.to_thread(stack.restart, "hv", (f"hv.secure.page_out@{rep.name}{action}",))
    return rep


async def host_touch_through_hv_kill(stack, op, prefix: str):
    """A secure guest, an HV armed to kill itself at hv.secure.page_out for it
    (secure_guest_with_armed_hv), the host touching the guest's page 2 (the HV pages it out and
    dies once the UV answered, before writing the ciphertext), and the HV restarted; returns the
    guest's report."""
    rep = await secure_guest_with_armed_hv(stack, op, prefix)
    try:
        await op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=rep.lpid, gpa=2 << PAGE_SHIFT), timeout=10)
        raise AssertionError("the failpoint did not fire")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
    deadline = time.monotonic() + 10  # its connection drops a moment before its exit is reaped
    while stack.procs["hv"].alive and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not stack.procs["hv"].alive, "the HV is still running: the failpoint did not fire"
    await asyncio.to_thread(stack.restart, "hv")
    return rep


def test_secure_page_out_whose_answer_is_lost_is_found_in_shared_memory(stack_factory, run):
    """kill -9 of the HV after the UV paged a secure page out (a host touch), before the HV wrote
    it: the HV had recorded the page-out as pending, asks again after the restart, the UV answers
    U_PARAMETER (already paged out), and the ciphertext is in the HV's RAM file because the UV
    wrote it there before answering. The guest reads all its memory."""
    stack = stack_factory()

    async def scenario():
        async with operating(stack) as op:
            rep = await host_touch_through_hv_kill(stack, op, "touch")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                read = await op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=rep.lpid, gpa=2 << PAGE_SHIFT))
                if read.state == GfnState.GFN_SECURE_OUT:
                    break
                await asyncio.sleep(0.05)
            assert read.state == GfnState.GFN_SECURE_OUT
            verify = (await op.guest(rep.name).Verify(guest_pb2.VerifyRequest())).report
            assert verify.memory_intact, verify.detail
            assert metric(stack, "hv", "pefsim_hv_pages_lost_total") == 0
    run(scenario())


def test_secure_page_out_lost_without_shared_memory_fails_the_vm_loudly(stack_factory, run):
    """The same kill with pages in the answers (no shared memory): the ciphertext died with the HV.
    The restarted HV finds that out (U_PARAMETER to its repeated UV_PAGE_OUT), counts the page as
    lost and fails the VM with a machine check, rather than letting the guest read garbage."""
    stack = stack_factory(shared_memory=False)

    async def scenario():
        async with operating(stack) as op:
            rep = await host_touch_through_hv_kill(stack, op, "lost")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and metric(stack, "hv", "pefsim_hv_pages_lost_total") < 1:
                await asyncio.sleep(0.05)
            assert metric(stack, "hv", "pefsim_hv_pages_lost_total") == 1
            assert metric(stack, "hv", 'pefsim_hv_vms_failed_total{reason="page-lost"}') == 1
            status = (await op.guest(rep.name).GuestStatus(guest_pb2.GuestStatusRequest())).report
            assert (status.outcome, status.detail) == ("failed", "machine check: page-lost")
    run(scenario())


def test_secure_page_out_whose_answer_is_lost_is_settled_before_the_uv_pages_it_in(stack_factory, run):
    """The UV pages a secure page out for a host touch and the answer is lost on the way (the HV
    stays up: failpoint ``=lose``). The page is pending in the HV and paged out in the UV. When
    the guest then reads it, the UV asks for it back with H_SVM_PAGE_IN: the HV settles the
    pending page-out first (its repeated UV_PAGE_OUT gets U_PARAMETER; the ciphertext is in its RAM
    file) and pages the ciphertext in, instead of answering H_PARAMETER for a page it still
    thought secure. The guest reads all its memory."""
    stack = stack_factory()

    async def scenario():
        async with operating(stack) as op:
            rep = await secure_guest_with_armed_hv(stack, op, "lose", "=lose")
            read = await op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=rep.lpid, gpa=2 << PAGE_SHIFT),
                                                 timeout=10)
            assert read.errno == Errno.EFAULT  # the answer was lost: the touch fails, the page-out is pending
            assert stack.procs["hv"].alive
            verify = (await op.guest(rep.name).Verify(guest_pb2.VerifyRequest())).report
            assert verify.memory_intact, verify.detail
            assert "page-in of gfn 0x2 with its page-out pending: settled" in stack.procs["hv"].log_path.read_text()
            assert metric(stack, "hv", "pefsim_hv_pages_lost_total") == 0
    run(scenario())


def test_a_stop_failpoint_is_a_breakpoint(stack_factory, run):
    """``=stop``: the HV stops itself at the exact step (the chaos harness puts another fault in
    place there) and goes on from it after SIGCONT; an unknown action is refused at start."""
    import signal

    from pefsim import faults

    stack = stack_factory()

    async def scenario():
        async with operating(stack) as op:
            name = unique("bp")
            await asyncio.to_thread(stack.restart, "hv", (f"hv.esm.page_in:3@{name}=stop",))
            addr = await asyncio.to_thread(stack.add_guest, name, 1 << 20, blob_for(stack, name))
            boot = asyncio.ensure_future(op.guest(name, addr).Boot(guest_pb2.BootRequest()))
            deadline = time.monotonic() + 30
            while not stack.procs["hv"].stopped and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert stack.procs["hv"].stopped and not boot.done()
            stack.procs["hv"].signal(signal.SIGCONT)
            rep = (await asyncio.wait_for(boot, 60)).report
            assert (rep.outcome, rep.memory_intact) == ("secure", True)
    run(scenario())
    with pytest.raises(SystemExit, match="unknown action"):
        faults.configure(["hv.esm.page_in:1@x=explode"])
