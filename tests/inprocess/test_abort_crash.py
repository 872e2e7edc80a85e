"""The HV's H_SVM_INIT_ABORT in process: the journal, the crash ordering docs/recovery.md rests
on, and the bulk page-out, with the real UV and HV cores wired by services/local.py. An HV crash
(a failpoint armed ``=crash``: every task of the HV core cancelled where it stands, as kill -9)
at each step of the abort, or of the ESM before it, must end the same way as no crash once a new
HV starts on the same data directory:

* the guest's vCPU is resumed exactly once, with H_PARAMETER at the nip after its `sc 2`;
* the VM is normal and its memory is what the guest wrote (every page given back);
* the UV forgot the SVM (UV_SVM_TERMINATE reached it) and holds none of its pages;
* no abort journal is left.
"""
from __future__ import annotations

import asyncio

import pytest

from pefsim.abi import H, VmState
from pefsim.v1 import ultravisor_pb2 as upb
from services.local import Machine
from tests.inprocess.conftest import NIP, GuestVm, create_guest

BOUND_S = 20  # every wait below ends long before; a hang fails the test instead of stalling it


async def finished(m: Machine, g: GuestVm, esm: asyncio.Task) -> None:
    """Wait (bounded) for the abort to reach the guest, then check everything it must leave."""
    vcpu = m.vcpus.of(g.lpid)
    await asyncio.wait_for(vcpu.resumed.wait(), BOUND_S)
    answer = await asyncio.wait_for(esm, BOUND_S)
    # the UV's UV_ESM ends with its H_SVM_INIT_ABORT's answer: H_PARAMETER, or H_UNSUPPORTED when
    # its retry reached a restarted HV after the recovered abort had finished (the HV's exit path
    # took that refusal to the guest, which knew the token: a duplicate of the resume it had). The
    # guest's own return is checked below: one resume, with H_PARAMETER
    assert answer.rc in (H.H_PARAMETER, H.H_UNSUPPORTED) and not answer.resumed  # the HV resumed it, not the UV
    for _ in range(BOUND_S * 100):  # the journal's last write follows the resume by one step
        if m.hv.state.vms[g.lpid].abort is None:
            break
        await asyncio.sleep(0.01)
    assert [(r.r3, r.nip) for r in vcpu.resumes] == [(H.H_PARAMETER, NIP)]
    vm = m.hv.state.vms[g.lpid]
    assert vm.state == VmState.VM_NORMAL and vm.abort is None
    assert await g.memory() == g.pages
    status = await m.uv_call("UvStatus", upb.UvStatusRequest(), g.caller)
    assert not [s for s in status.svms if s.lpid == g.lpid]
    assert m.uv.state.pool.in_use == 0


async def test_abort_without_a_crash(stage):
    async with stage() as m:
        g = await create_guest(m)
        await finished(m, g, g.esm())
        assert m.hv.metrics.abort_seconds.labels("resumed")._sum.get() > 0


CRASH_POINTS = ["hv.abort.page_out:1", "hv.abort.page_out:17", "hv.abort.page_out:48",
                "hv.abort.before_terminate", "hv.abort.before_resume", "hv.esm.page_in:1", "hv.esm.page_in:30"]


@pytest.mark.parametrize("point", CRASH_POINTS)
@pytest.mark.parametrize("transfer", ["stream", "unary"])
async def test_an_hv_crash_at_any_step_ends_as_no_crash(stage, point, transfer):
    async with stage(transfer=transfer) as m:
        g = await create_guest(m)
        with m.crash_at(point):
            esm = g.esm()
            await asyncio.wait_for(m.crashed.wait(), BOUND_S)
        assert m.crashes == [point.split(":")[0]]
        hv = await m.restart_hv()
        assert hv.metrics.vms_recovered._value.get() == 1
        assert hv.metrics.aborts_resumed._value.get() == (0 if point.startswith("hv.esm") else 1)
        await finished(m, g, esm)
        if point.startswith("hv.abort"):  # the UV's H_SVM_INIT_ABORT was in flight when the HV died
            assert m.uv.metrics.hcall_retries.labels("H_SVM_INIT_ABORT")._value.get() >= 1


async def test_a_crash_during_recovery_too(stage):
    """Killed at the terminate step, restarted, killed again at the resume step of the recovered
    abort: the second restart still finishes it, with one resume."""
    async with stage() as m:
        g = await create_guest(m)
        with m.crash_at("hv.abort.before_terminate"):
            esm = g.esm()
            await asyncio.wait_for(m.crashed.wait(), BOUND_S)
        with m.crash_at("hv.abort.before_resume"):
            await m.restart_hv()
            await asyncio.wait_for(m.crashed.wait(), BOUND_S)
        await m.restart_hv()
        await finished(m, g, esm)
        assert len(m.crashes) == 2


async def test_the_journal_says_where_a_crash_stopped(stage):
    """What a kill leaves on disk is the phase the abort had reached: page-out before the
    terminate point (secure_guest still set), terminate after it (secure_guest 0 recorded with
    it), resume after UV_SVM_TERMINATE."""
    from services.hypervisor.core.state import HvState

    expected = {"hv.abort.page_out:5": ("page-out", True), "hv.abort.before_terminate": ("terminate", False),
                "hv.abort.before_resume": ("resume", False)}
    for point, (phase, secure) in expected.items():
        async with stage() as m:
            g = await create_guest(m, name=f"g{len(phase)}")
            with m.crash_at(point):
                esm = g.esm()
                await asyncio.wait_for(m.crashed.wait(), BOUND_S)
            on_disk = HvState(m.hv_config.data_dir)
            vm = {v.lpid: v for v in on_disk.load()}[g.lpid]
            assert (vm.abort["phase"], vm.secure_guest != 0) == (phase, secure), point
            for v in on_disk.vms.values():
                for slot in v.slots.values():
                    slot.close()
            await m.restart_hv()
            await finished(m, g, esm)
        import shutil
        shutil.rmtree(m.hv_config.data_dir)


async def test_a_lost_abort_answer(stage):
    """The UV's H_SVM_INIT_ABORT acted on, its answer lost: the HV answers only once the SVM is
    terminated, so the UV, about to ask again, finds its SVM gone (terminated-by-hv) and stops;
    the guest is still resumed exactly once, by the HV."""
    async with stage() as m:
        g = await create_guest(m)
        m.uv_to_hv.lose = lambda name, n: name == "H_SVM_INIT_ABORT" and n == 1
        await finished(m, g, g.esm())
        assert m.uv_to_hv.counts["H_SVM_INIT_ABORT"] == 1
        assert m.uv.metrics.abort_seconds.labels("terminated-by-hv")._sum.get() > 0


# (transfer, the answer or stream item at whose arrival the HV crashes): between two frames of
# the bulk page-out and page-in (8 pages a frame: 6 frames for 48 pages), or between a unary
# UV_PAGE_OUT's answer and its write
ARRIVALS = [("stream", "UvPageOutStream", 1), ("stream", "UvPageOutStream", 4), ("stream", "UvPageInStream", 2),
            ("unary", "UV_PAGE_OUT", 1), ("unary", "UV_PAGE_OUT", 30), ("stream", "UV_SVM_TERMINATE", 1)]


@pytest.mark.parametrize("transfer,name,nth", ARRIVALS)
async def test_an_hv_crash_as_an_answer_arrives(stage, transfer, name, nth):
    """The port crashes the HV on cue, as the n-th answer (or stream frame) of a ucall reaches
    it, before it acts on it: the run path of the bulk page-out included (a failpoint would take
    the pages one by one)."""
    async with stage(transfer=transfer) as m:
        g = await create_guest(m)
        m.hv_to_uv.crash = lambda call, n: call == name and n == nth
        esm = g.esm()
        await asyncio.wait_for(m.crashed.wait(), BOUND_S)
        m.hv_to_uv.crash = None
        await m.restart_hv()
        await finished(m, g, esm)
