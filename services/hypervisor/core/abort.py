"""The HV's side of H_SVM_INIT_ABORT as a journalled task that a restarted HV finishes.

Merged design (default), phases recorded in the VM's journal (``vm.abort``):

  page-out    every GFN_SECURE_IN page is taken back with UV_PAGE_OUT and written to the HV's
              page before its GFN is marked normal. A ucall that fails in transport is asked
              again (the UV keeps an aborting SVM's pages until UV_SVM_TERMINATE, so asking twice
              is harmless); a refusal is logged and the page lost: the guest reads zeros there (a
              pefsim choice; the kernel leaves the GFN device-backed and a later touch SIGBUSes
              the VMM: docs/conformance.md, "A page-out refused during the abort").
  terminate   secure_guest = 0 is recorded together with this phase; then UV_SVM_TERMINATE
              (asked again until the UV answers).
  resume      the guest's vCPU is resumed with H_PARAMETER at SRR0 (VcpuResume, carrying the
              abort's token, so a resume repeated after a restart is recognised by the guest).
  (done)      the journal is cleared.

v10 design (``--abort-return uv``): page-out, then the memslots are unregistered, secure_guest =
INIT_ABORT, cleared again on the hcall's own exit path (check_svm_abort), and H_SUCCESS returns to
the UV; the HV makes no UV_SVM_TERMINATE (the UV terminates the SVM itself).

The UV's H_SVM_INIT_ABORT is answered once the SVM is terminated (phase ``resume`` recorded),
not after the resume: the resume goes to an endpoint the guest named and may take up to
resume_retry_s, and the UV's call (which holds one of that guest's call slots at the HV) must
not wait on it. The journal still owes the guest its one resume.

A repeated H_SVM_INIT_ABORT while the task runs (the UV retrying after a lost answer) joins it.
A kill at any point leaves a journal; ``recover`` restarts the task from its phase.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from pefsim import clock, faults, tracing
from pefsim.backoff import Backoff
from pefsim.abi import AbortReturn, GfnState, H, Role, SecureGuest, U, rc_name
from pefsim.v1 import common_pb2, guest_pb2, hypervisor_pb2 as pb
from services.hypervisor.core import bulk, uv
from services.hypervisor.ports import UvReset, UvUnreachable, VcpuUnreachable
from services.hypervisor.core.pages import take_page

log = logging.getLogger("pefsim.hv.abort")

PAGE_OUT, TERMINATE, RESUME = "page-out", "terminate", "resume"


class AbortCancelled(Exception):
    """The VM went away (destroyed, or failed by a UV reset) while its abort was retrying."""


async def persist(hv, vm, fn, what: str):
    """Run a ucall until it gets an answer; raise AbortCancelled if the VM goes away meanwhile."""
    backoff = Backoff()
    while True:
        if vm.destroyed or vm.dying or vm.failed:
            raise AbortCancelled(vm.lpid)
        try:
            return await fn()
        except UvReset:
            raise AbortCancelled(vm.lpid) from None
        except UvUnreachable:
            log.warning("lpid %d: %s: UV unreachable, asking again in %.2f s", vm.lpid, what, backoff.delay)
            await backoff.wait()


def running(vm) -> asyncio.Future | None:
    """The answer of the abort under way for ``vm`` (a repeated call joins it), or None."""
    if vm.abort_task is not None and not vm.abort_task.done():
        return vm.abort_answer
    return None


def start(hv, vm, req: pb.HSvmInitAbortRequest | None = None, lock_held: bool = False) -> asyncio.Future:
    """Start the abort (journalling it), or join the one already running; returns the future of
    the answer to H_SVM_INIT_ABORT. ``lock_held``: the caller holds vm.lock, checked the VM's
    state under it, and hands it to the abort's page-out phase (which releases it)."""
    joined = running(vm)
    if joined is not None:
        if lock_held:
            vm.lock.release()
        return joined
    if vm.abort is None:
        hv.state.set_abort(vm, {"token": req.token, "srr0": req.srr0, "trace_ns": req.trace.abort_issued_unix_ns,
                                "phase": PAGE_OUT, "traceparent": tracing.current_traceparent() or ""})
    vm.abort_answer = answer = asyncio.get_running_loop().create_future()
    # the task's calls (page-outs, UV_SVM_TERMINATE, the resume) join the trace of the
    # H_SVM_INIT_ABORT that journalled it, also when a restarted HV recovers it
    with tracing.resumed(vm.abort.get("traceparent")) if tracing.CURRENT.get() is None else contextlib.nullcontext():
        vm.abort_task = asyncio.ensure_future(run(hv, vm, _Handed(vm.lock, lock_held)))

    def unanswered(task: asyncio.Future) -> None:
        failure = None if task.cancelled() else task.exception()
        if not answer.done():  # the task failed before answering: so does the call
            answer.set_exception(failure or RuntimeError(f"lpid {vm.lpid}: abort task ended without an answer"))
            answer.add_done_callback(lambda f: f.exception())  # retrieved even when nobody waits
        elif failure is not None:  # after its answer (the resume, the journal's last write)
            log.error("lpid %d: abort failed after answering the UV: %r", vm.lpid, failure)
    vm.abort_task.add_done_callback(unanswered)
    return answer


class _Handed:
    """vm.lock for the abort task: acquired by it, or handed over already held by the
    H_SVM_INIT_ABORT handler (which checked the state under it). Released exactly once: at the end
    of the page-out phase, or when the task ends without reaching it."""

    def __init__(self, lock: asyncio.Lock, held: bool):
        self.lock, self.held = lock, held

    async def __aenter__(self):
        if not self.held:
            await self.lock.acquire()
        self.held = True

    async def __aexit__(self, *exc):
        self.release()

    def release(self) -> None:
        if self.held:
            self.held = False
            self.lock.release()


def refused_to_guest(hv, vm, req: pb.HSvmInitAbortRequest) -> None:
    """An H_SVM_INIT_ABORT refused with H_UNSUPPORTED for a VM already normal goes to the guest
    (svm.h_svm_init_abort_exit): journalled at the resume phase with that result, so it is
    delivered once, by this HV or a restarted one, under the request's token."""
    hv.state.set_abort(vm, {"token": req.token, "srr0": req.srr0, "trace_ns": req.trace.abort_issued_unix_ns,
                            "phase": RESUME, "r3": H.H_UNSUPPORTED, "traceparent": tracing.current_traceparent() or ""})
    start(hv, vm)


def _answer(vm, response: pb.HSvmInitAbortResponse) -> pb.HSvmInitAbortResponse:
    if vm.abort_answer is not None and not vm.abort_answer.done():
        vm.abort_answer.set_result(response)
    return response


async def run(hv, vm, lock: _Handed) -> pb.HSvmInitAbortResponse:
    t0 = clock.monotonic()
    v10 = hv.cfg.abort_return == AbortReturn.ABORT_RETURN_UV
    recovered = 0
    try:
        if faults.mutant("hv-abort-hangs"):
            lock.release()
            await asyncio.Event().wait()
        phases = hv.metrics.abort_phase_seconds
        if vm.abort["phase"] != PAGE_OUT:
            lock.release()  # a recovered journal past its page-out
        else:
            async with lock:
                with phases.labels(PAGE_OUT).time():
                    recovered = await page_out_all(hv, vm)
                if v10:
                    for slot_id in sorted(vm.slots):
                        await uv.unregister_slot(hv, vm, slot_id)
                    # v10 sets INIT_ABORT, and the abort hcall's own exit path clears it before its
                    # last UV_RETURN (book3s_hv_rmhandlers.S check_svm_abort): no other call ever
                    # sees it, so the VM is normal when the UV gets H_SUCCESS
                    hv.state.set_secure_guest(vm, SecureGuest.SECURE_GUEST_NONE, abort=None)
                    hv.metrics.abort_seconds.labels("returned-to-uv").observe(clock.monotonic() - t0)
                    return _answer(vm, pb.HSvmInitAbortResponse(
                        rc=H.H_SUCCESS, returned_to=AbortReturn.ABORT_RETURN_UV, pages_recovered=recovered))
                hv.state.set_secure_guest(vm, SecureGuest.SECURE_GUEST_NONE,
                                          abort=dict(vm.abort, phase=TERMINATE))
        if vm.abort["phase"] == TERMINATE:
            faults.reach("hv.abort.before_terminate", vm.name)
            with phases.labels(TERMINATE).time():
                await persist(hv, vm, lambda: uv.terminate(hv, vm, "abort", unreachable_raises=True),
                              "UV_SVM_TERMINATE")
            hv.state.set_abort(vm, dict(vm.abort, phase=RESUME))
        answer = _answer(vm, pb.HSvmInitAbortResponse(rc=vm.abort.get("r3", H.H_PARAMETER),
                                                      returned_to=AbortReturn.ABORT_RETURN_GUEST,
                                                      pages_recovered=recovered))
        faults.reach("hv.abort.before_resume", vm.name)
        journal = vm.abort
        with phases.labels(RESUME).time():
            outcome = await resume_vcpu(hv, vm, journal)
        hv.state.set_abort(vm, None)
    except AbortCancelled:
        hv.metrics.abort_seconds.labels("cancelled").observe(clock.monotonic() - t0)
        log.warning("lpid %d: abort cancelled (VM %s)", vm.lpid, vm.failed or "destroyed")
        return _answer(vm, pb.HSvmInitAbortResponse(rc=H.H_HARDWARE, returned_to=AbortReturn.ABORT_RETURN_GUEST))
    finally:
        lock.release()  # if the page-out phase was never reached (or the task was cancelled in it)
    hv.metrics.abort_seconds.labels(outcome).observe(clock.monotonic() - t0)
    log.info("lpid %d: aborted, %d pages given back, guest %s", vm.lpid, recovered, outcome)
    return answer


async def page_out_all(hv, vm) -> int:
    """Every secure page back to the HV with its content (drop_pages with skip_page_out false),
    in bulk streams (or one UV_PAGE_OUT a page with --transfer unary). A page the UV refuses is
    logged and lost: its GFN goes normal with a zero page (a pefsim choice: in the kernel it stays
    device-backed and a later touch SIGBUSes the VMM). Called with vm.lock held; returns the pages
    given back."""
    got = [0]
    for slot in vm.slots.values():
        if slot.count(GfnState.GFN_NORMAL) + slot.count(GfnState.GFN_SECURE_IN) == slot.npages:
            continue  # nothing but normal and secure pages: the usual case
        for idx in range(slot.npages):
            if slot.state(idx) not in (GfnState.GFN_NORMAL, GfnState.GFN_SECURE_IN):
                hv.state.mark_normal(slot, idx, scrub=False)

    def secure_runs():
        return [(slot, idx, n, 0) for slot in sorted(vm.slots.values(), key=lambda s: s.base_gfn)
                for idx, n in slot.runs_in(GfnState.GFN_SECURE_IN)]

    def give_back(slot, idx, data) -> None:
        faults.reach("hv.abort.page_out", vm.name)
        hv.state.mark_normal(slot, idx, data=data, scrub=data is None)
        got[0] += data is not None

    by_page = faults.armed("hv.abort.page_out")  # a failpoint counts pages: take them one by one

    async def streamed():
        async for batch, rcs, data in bulk.page_out(hv, vm, secure_runs()):
            done = 0
            for slot, idx, n, _ in batch:
                pages, results = data[done:done + n], rcs[done:done + n]
                done += n
                if not by_page and results.count(U.U_SUCCESS) == n and None not in pages:
                    hv.state.mark_normal_run(slot, idx, pages)
                    hv.metrics.moved("out", n)
                    got[0] += n
                    continue
                for i, (rc, page) in enumerate(zip(results, pages)):
                    if rc != U.U_SUCCESS or page is None:
                        log.error("lpid %d: page-out of 0x%x during abort -> %s; page lost", vm.lpid,
                                  slot.gpa(idx + i), rc_name(rc, U))
                        page = None
                    else:
                        hv.metrics.moved("out")
                    give_back(slot, idx + i, page)

    async def one_by_one():
        for slot, first, n, _ in secure_runs():
            for idx in range(first, first + n):
                give_back(slot, idx, await take_page(hv, vm, slot, idx))

    await persist(hv, vm, streamed if hv.cfg.transfer == "stream" else one_by_one, "abort page-out")
    return got[0]


async def resume_vcpu(hv, vm, journal: dict) -> str:
    """HRFID into the guest: deliver the journal's result (H_PARAMETER, or the H_UNSUPPORTED of
    an abort refused for a VM already normal) to the vCPU waiting after its `sc 2`, asking again
    while the guest cannot be reached (for up to resume_retry_s)."""
    backoff = Backoff(within=hv.cfg.resume_retry_s)
    request = guest_pb2.VcpuResumeRequest(
        lpid=vm.lpid, r3=journal.get("r3", H.H_PARAMETER), msr_s=False, nip=journal["srr0"], resumed_by=Role.ROLE_HV,
        trace=common_pb2.Trace(abort_issued_unix_ns=journal["trace_ns"]), token=journal["token"])
    while True:
        if vm.destroyed or vm.dying:
            raise AbortCancelled(vm.lpid)
        try:
            resp = await hv.vcpus.resume(vm, request, timeout=5)
            break
        except VcpuUnreachable as exc:
            if backoff.expired:
                log.error("lpid %d: guest vCPU unreachable (%s); giving up the resume", vm.lpid, exc.code)
                return "guest-unreachable"
            await backoff.wait()
    if faults.mutant("hv-double-resume"):
        request.token += 1
        await hv.vcpus.resume(vm, request, timeout=5)
    if resp.rc != H.H_SUCCESS:
        return "not-waiting"
    return "duplicate" if resp.duplicate else "resumed"


def recover(hv) -> int:
    """Restart the abort of every VM whose journal says one was under way; returns how many."""
    n = 0
    for vm in hv.state.vms.values():
        if vm.abort is not None:
            log.warning("lpid %d: resuming an interrupted abort at phase %s", vm.lpid, vm.abort["phase"])
            start(hv, vm)
            hv.metrics.aborts_resumed.inc()
            n += 1
    return n
