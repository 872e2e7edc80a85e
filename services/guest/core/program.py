"""The guest's boot program and its vCPU.

The guest process is the VM's VMM (it creates the VM and its memslot at the HV, as QEMU would)
and its single vCPU (it loads the image into memory, then enters secure mode with UV_ESM and
checks its memory whichever way it comes back).

A vCPU that made `sc 2` waits in VCPU_IN_UCALL until exactly one resume arrives: the UV_ESM
response when the UV returns to it (success, a synchronous failure, or an abort with the v10
design), or the HV's VcpuResume (HRFID after H_SVM_INIT_ABORT, merged design).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

from pefsim import clock, entropy
from pefsim.backoff import Backoff
from pefsim.dataplane import MAX_DATA_PAGES
from pefsim import faults
from pefsim.abi import PAGE_SHIFT, PAGE_SIZE, Errno, H, Role, SvmState, U, VcpuState, gpa_of, rc_name
from pefsim.image import GuestImage
from pefsim.v1 import common_pb2, guest_pb2 as pb, hypervisor_pb2 as hpb, ultravisor_pb2 as upb
from services.guest.ports import Calls, Unreachable

log = logging.getLogger("pefsim.guest")

BATCH_PAGES = 16  # pages per VcpuLoad/SvmLoad (1 MiB messages: small transient buffers)
# Calls a guest keeps in flight while it loads its image and checks its memory: the next request
# is made (its pages generated) while the HV or the UV serves the last ones. One at a time, a
# 512 KiB VcpuStore took ~6 ms of which the guest's page making was ~1.6 ms and the HV's ~2.3.
IN_FLIGHT = 4
RETRY_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
UCALL_OFFSET = 0x1000  # where in the kernel image prom_init's `sc 2` sits


@dataclass
class Resume:
    r3: int
    msr_s: bool
    nip: int
    by: int
    abort_issued_ns: int = 0
    token: int = 0  # an abort's token: the same resume delivered again is recognised
    machine_check: str = ""  # set when the machine failed under the vCPU instead
    at_ns: int = field(default_factory=clock.wall_ns)


class GuestFailure(Exception):
    """The boot program could not continue (an errno or a transport failure), with why."""


async def in_flight(calls: Iterable[Callable[[], Awaitable[None]]], window: int = IN_FLIGHT) -> None:
    """Await each of ``calls`` (made one at a time, in order) with at most ``window`` running at
    once. The first failure cancels the others and is raised."""
    pending: set[asyncio.Future] = set()
    calls = iter(calls)
    try:
        while True:
            for call in calls:  # fill the window (a for that stops when it is full)
                pending.add(asyncio.ensure_future(call()))
                if len(pending) >= window:
                    break
            if not pending:
                return
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


BY = {Role.ROLE_HV: "the HV (HRFID at the address after `sc 2`)", Role.ROLE_UV: "the UV (its return from `sc 2`)"}


def resumer(by: int) -> str:
    """Who resumed a vCPU, in words for its timeline."""
    return BY.get(by, Role(by).name)


@dataclass
class GuestConfig:
    name: str
    mem_bytes: int
    hv: str
    uv: str
    blob: bytes = b""
    svm: bool = True  # `svm=on` on the kernel command line: enter secure mode
    secure_capable: bool = True  # QEMU's pef-guest object: KVM_CAP_PPC_SECURE_GUEST enabled
    measured_only: bool = False  # the UV pages in only the measured regions (ESM_COPY_MEASURED):
    # once secure, every other page reads as zeros (the INIT_DONE sweep does not copy)
    resume_timeout_s: float = 120.0
    # after a UV_ESM that did not switch to secure mode: "os-term" (Linux's setup_secure_guest calls
    # prom_rtas_os_term: the VMM stops the VM, its memory stays with the HV until it is destroyed)
    # or "continue" (carry on as a normal VM)
    on_esm_failure: str = "os-term"
    hv_wait_s: float = 60.0  # how long the guest waits for an unreachable HV to come back
    tls: object = None  # pefsim.tls.Tls for guest:<name> (mTLS) or None (insecure)


class GuestProgram:
    """The VM's VMM and vCPU: ``hv`` and ``uv`` are its ports (services/guest/ports.py)."""

    def __init__(self, cfg: GuestConfig, endpoint: str, hv: Calls, uv: Calls, metrics=None):
        from services.guest.core.metrics import GuestMetrics

        self.cfg = cfg
        self.metrics = metrics or GuestMetrics()
        self.endpoint = endpoint
        self.image = GuestImage.of_size(cfg.name, cfg.mem_bytes)
        self.hv, self.uv = hv, uv
        self.vcpu_state = VcpuState.VCPU_STOPPED
        self.lpid = 0
        self._resume: asyncio.Future | None = None
        self.written: dict[int, bytes] = {}  # pages changed after boot: gfn -> content
        self.report = pb.GuestReport(name=cfg.name, outcome="created", abort_latency_s=-1.0,
                                     on_esm_failure=cfg.on_esm_failure)
        self.booting: asyncio.Task | None = None
        self.session: asyncio.Task | None = None
        self.taken_token = 0
        self.uv_boot = ""  # the UV's boot id when this vCPU made its `sc 2`

    # -- timeline -------------------------------------------------------------------------------

    def event(self, what: str) -> None:
        self.report.timeline.add(unix_ns=clock.wall_ns(), what=what)
        log.info("%s: %s", self.cfg.name, what)

    @property
    def sc2_nip(self) -> int:
        """The address after the `sc 2` of UV_ESM: where a failed UV_ESM returns."""
        return self.image.kbase + UCALL_OFFSET + 4

    def vcpu_context(self) -> common_pb2.VcpuContext:
        return common_pb2.VcpuContext(lpid=self.lpid, msr_s=self.vcpu_state == VcpuState.VCPU_SECURE,
                                      nip=self.sc2_nip)

    def expected(self, gfn: int) -> bytes:
        page = self.written.get(gfn)
        return page if page is not None else self.image.page(gfn, self.cfg.blob)

    # -- the vCPU's resume ----------------------------------------------------------------------

    def resume(self, res: Resume) -> tuple[int, bool]:
        """Deliver a resume to the vCPU: (H_SUCCESS, False) if it was waiting after `sc 2`;
        (H_SUCCESS, True) for a repeat of the resume it took (same abort token: acknowledged,
        nothing changes); (H_STATE, False) otherwise."""
        if self.vcpu_state == VcpuState.VCPU_IN_UCALL and self._resume is not None and not self._resume.done():
            self.vcpu_state = VcpuState.VCPU_SECURE if res.msr_s else VcpuState.VCPU_RUNNING
            self.report.resumes += 1
            self.taken_token = res.token
            self._resume.set_result(res)
            return H.H_SUCCESS, False
        if res.token and res.token == self.taken_token:
            self.report.duplicate_resumes += 1
            self.event(f"resume repeated by {resumer(res.by)} (token already taken): acknowledged")
            return H.H_SUCCESS, True
        self.report.refused_resumes += 1
        self.event(f"unexpected resume r3={rc_name(res.r3)} by {resumer(res.by)} (not waiting)")
        return H.H_STATE, False

    def machine_check(self, reason: str) -> None:
        """The machine failed under the guest: stop (a waiting vCPU stops waiting)."""
        self.event(f"machine check: {reason}")
        waiting = self._resume is not None and not self._resume.done()
        self.vcpu_state = VcpuState.VCPU_STOPPED
        if waiting:
            self._resume.set_result(Resume(r3=H.H_HARDWARE, msr_s=False, nip=0, by=Role.ROLE_HV,
                                           machine_check=reason))
        else:
            self.report.outcome, self.report.detail = "failed", f"machine check: {reason}"
            self.report.memory_intact = False

    # -- boot -----------------------------------------------------------------------------------

    async def boot(self) -> pb.GuestReport:
        try:
            await self._boot()
        except GuestFailure as exc:
            self.report.outcome, self.report.detail = "failed", str(exc)
            self.event(f"boot failed: {exc}")
        return self.report

    async def _hv(self, name: str, request):
        """A call to the HV; while the HV cannot be reached (restarting, frozen) the guest waits
        and asks again, for up to hv_wait_s."""
        backoff = Backoff(cap=1.0, within=self.cfg.hv_wait_s)
        while True:
            try:
                resp = await self.hv.call(name, request, timeout=10, wait=True)
                break
            except Unreachable as exc:
                if exc.code not in RETRY_CODES or backoff.expired:
                    raise GuestFailure(f"{name}: HV unreachable ({exc.code})") from None
                await backoff.wait()
        errno = getattr(resp, "errno", Errno.OK)
        if errno != Errno.OK:
            raise GuestFailure(f"{name}: {Errno(errno).name}")
        return resp

    async def _boot(self) -> None:
        self.report.outcome = "booting"
        npages = self.image.npages
        resp = await self._hv("CreateVm", hpb.CreateVmRequest(
            name=self.cfg.name, memslots=[common_pb2.Memslot(slot_id=0, base_gfn=0, npages=npages)],
            vcpu_endpoint=self.endpoint, secure_capable=self.cfg.secure_capable,
            request_id=entropy.token_hex(8)))  # asked again after a lost answer: the same VM back
        self.lpid = self.report.lpid = resp.lpid
        self.event(f"VM created: lpid {self.lpid}, {npages} pages of 64 KiB")
        self.session = asyncio.ensure_future(self.hold_session())
        await self._hv("RunVm", hpb.RunVmRequest(lpid=self.lpid))
        self.vcpu_state = VcpuState.VCPU_RUNNING
        # made a request at a time (the most one may carry) as the last ones are sent, never all
        # at once: the guest keeps no copy of its memory (verify() makes each page again), which
        # at 8 GiB would not fit
        await in_flight(lambda first=first: self._load_image(first, min(MAX_DATA_PAGES, npages - first))
                        for first in range(0, npages, MAX_DATA_PAGES))
        self.event("image loaded: kernel, initrd, FDT, ESM blob, data")
        if not self.cfg.svm:
            self.report.outcome = "normal"
            await self.verify()
            return
        faults.reach("guest.before_esm", self.cfg.name)
        t_sc2 = clock.wall_ns()
        res = await self.enter_secure_mode()
        if res.machine_check:
            self.report.outcome, self.report.detail = "failed", f"machine check: {res.machine_check}"
            return
        self.report.esm_rc, self.report.msr_s, self.report.resumed_by = res.r3, res.msr_s, res.by
        if res.abort_issued_ns:
            self.report.abort_latency_s = (res.at_ns - res.abort_issued_ns) / 1e9
            self.metrics.abort_e2e_seconds.labels(Role(res.by).name.removeprefix("ROLE_").lower()
                                                  ).observe(self.report.abort_latency_s)
        if res.msr_s and res.r3 == U.U_SUCCESS:
            self.report.outcome = "secure"
            if self.cfg.measured_only:
                self._forget_unmeasured()
            self.event(f"resumed in secure mode at 0x{res.nip:x}")
        else:
            self.report.outcome = "aborted" if res.r3 == H.H_PARAMETER else "failed"
            where = "" if res.nip == self.sc2_nip else f" at WRONG address 0x{res.nip:x}"
            # a ucall's result in R3 is a U_* code; the HV's HRFID after an abort carries H_PARAMETER
            family = H if res.by == Role.ROLE_HV else U
            self.event(f"UV_ESM failed: {rc_name(res.r3, family)}, resumed by {resumer(res.by)} "
                       f"as a normal VM{where}")
            if res.nip != self.sc2_nip:
                self.report.detail = f"resumed at 0x{res.nip:x}, expected 0x{self.sc2_nip:x}"
        self.metrics.esm_seconds.labels(self.report.outcome).observe((res.at_ns - t_sc2) / 1e9)
        if self.report.outcome != "secure" and self.cfg.on_esm_failure == "os-term":
            await self.os_term("Switch to secure mode failed.")
        await self.verify()

    async def _load_image(self, first: int, count: int) -> None:
        await self._hv("VcpuStore", hpb.VcpuStoreRequest(lpid=self.lpid, gpa=gpa_of(first), data=b"".join(
            self.image.page(gfn, self.cfg.blob) for gfn in range(first, first + count))))

    async def os_term(self, message: str) -> None:
        """prom_init's prom_rtas_os_term: the guest calls RTAS ibm,os-term and its VMM (this
        program's other half) stops the VM; the VM and its memory stay with the HV until someone
        destroys it, and from now on its memory is read as the host reads it."""
        self.event(f"ibm,os-term: {message!r}: the VMM stops the VM (its memory stays with the HV)")
        self.vcpu_state = VcpuState.VCPU_STOPPED
        self.report.os_term = True
        await self._hv("StopVm", hpb.StopVmRequest(lpid=self.lpid))

    def _forget_unmeasured(self) -> None:
        """With ESM_COPY_MEASURED only the FDT, blob, kernel and initrd pages were copied."""
        img = self.image
        keep = set(range(1, img.data_start >> PAGE_SHIFT))  # kernel, initrd, FDT, blob
        for gfn in range(img.npages):
            if gfn not in keep:
                self.written.setdefault(gfn, bytes(PAGE_SIZE))

    async def enter_secure_mode(self) -> Resume:
        """`sc 2` UV_ESM(kbase, fdt), then wait for the one resume."""
        loop = asyncio.get_running_loop()
        self.uv_boot = (await self._uv_view())[0]
        self._resume = loop.create_future()
        self.vcpu_state = VcpuState.VCPU_IN_UCALL
        self.event("sc 2: UV_ESM")
        ucall = asyncio.ensure_future(self._uv_esm())
        try:
            return await asyncio.wait_for(asyncio.shield(self._resume), self.cfg.resume_timeout_s)
        except asyncio.TimeoutError:
            raise GuestFailure(f"vCPU not resumed within {self.cfg.resume_timeout_s} s") from None
        finally:
            if ucall.done() and not ucall.cancelled() and ucall.exception():
                log.error("UV_ESM task failed: %r", ucall.exception())

    async def _uv_esm(self) -> None:
        """The ultracall. It waits for the UV to be reachable before it is sent (wait_for_ready:
        a `sc 2` does not fail because a connection is not up yet; a call never sent would leave
        this vCPU waiting for a resume nobody owes it). Once sent, a transport failure is
        ambiguous (the UV may be running the ESM), so the vCPU waits for its resume."""
        try:
            resp = await self.uv.call("UV_ESM", upb.UvEsmRequest(
                vcpu=self.vcpu_context(), kbase=self.image.kbase, fdt=self.image.fdt), wait=True)
        except Unreachable as exc:
            self.event(f"UV_ESM: UV unreachable ({exc.code}: {exc.detail}); waiting for a resume")
            await self._watch_for_a_uv_reset()
            return
        if resp.failure:
            self.report.esm_failure = resp.failure
            self.event(f"the UV says why the ESM failed: {resp.failure}")
        if resp.resumed:
            self.resume(Resume(r3=resp.rc, msr_s=resp.msr_s, nip=resp.nip, by=Role.ROLE_UV,
                               abort_issued_ns=resp.trace.abort_issued_unix_ns, token=resp.token))
        else:
            self.event(f"UV_ESM context ended without returning ({rc_name(resp.rc, H)}): "
                       "control went to the HV")

    async def _uv_view(self) -> tuple[str, str]:
        """The boot id of the UV answering now and the state of this guest's SVM in it ("", "" if
        no UV answers; state "" if it holds no SVM for this lpid)."""
        try:
            status = await self.uv.call("UvStatus", upb.UvStatusRequest(), timeout=5)
        except Unreachable:
            return "", ""
        return status.boot_id, next((s.state for s in status.svms if s.lpid == self.lpid), "")

    async def _watch_for_a_uv_reset(self) -> None:
        """After a UV_ESM lost in transport the vCPU waits for its resume: the UV may be running
        the ESM context, and it or the HV resumes the vCPU. Two answers come from the UV itself:

        * The UV that answers now is another boot: the context died with the machine (a UV reset)
          and no resume will come (the HV fails only the VMs it saw enter secure mode, and a
          `sc 2` whose H_SVM_INIT_START never reached it is not one of them). The vCPU stops as
          after a machine check.
        * The SVM is SVM_SECURE: the context returned to the vCPU in secure mode, and that return
          is what got lost (found by pefsim sim: a good guest's lost UV_ESM answer left its vCPU
          waiting until its own timeout). The vCPU takes the return the context made, at kbase
          with MSR[S] = 1 and U_SUCCESS, as the `sc 2` would have.
        """
        backoff = Backoff(cap=1.0)
        while self.uv_boot and self._resume is not None and not self._resume.done():
            now, state = await self._uv_view()
            if now and now != self.uv_boot:
                self.machine_check("uv-reset")
                return
            if state == SvmState.SVM_SECURE.name:
                self.event("UV_ESM's answer was lost; the UV holds this SVM secure: resuming at kbase")
                self.resume(Resume(r3=U.U_SUCCESS, msr_s=True, nip=self.image.kbase, by=Role.ROLE_UV))
                return
            await backoff.wait()

    # -- memory ---------------------------------------------------------------------------------

    async def load(self, first: int, count: int) -> bytes:
        if self.vcpu_state == VcpuState.VCPU_SECURE:
            try:
                resp = await self.uv.call("SvmLoad", upb.SvmLoadRequest(
                    vcpu=self.vcpu_context(), gpa=gpa_of(first), npages=count))
            except Unreachable as exc:
                raise GuestFailure(f"SvmLoad: UV unreachable ({exc.code})") from None
            if resp.rc != U.U_SUCCESS:
                raise GuestFailure(f"SvmLoad(gfn {first}): {rc_name(resp.rc, U)}")
            return resp.data
        if self.report.os_term:  # the VM is stopped: what the host (the HV) holds of it
            return (await self._hv("HostReadPage", hpb.HostReadPageRequest(
                lpid=self.lpid, gpa=gpa_of(first), npages=count))).data
        resp = await self._hv("VcpuLoad", hpb.VcpuLoadRequest(lpid=self.lpid, gpa=gpa_of(first),
                                                              npages=count))
        return resp.data

    async def store(self, gfn: int, page: bytes) -> None:
        if self.vcpu_state == VcpuState.VCPU_SECURE:
            resp = await self.uv.call("SvmStore", upb.SvmStoreRequest(
                vcpu=self.vcpu_context(), gpa=gpa_of(gfn), data=page))
            if resp.rc != U.U_SUCCESS:
                raise GuestFailure(f"SvmStore(gfn {gfn}): {rc_name(resp.rc, U)}")
        else:
            await self._hv("VcpuStore", hpb.VcpuStoreRequest(lpid=self.lpid, gpa=gpa_of(gfn), data=page))
        self.written[gfn] = page

    async def verify(self) -> pb.GuestReport:
        """Read every page back and compare it with what this guest wrote."""
        bad, npages = [], self.image.npages

        async def check(first: int, count: int) -> None:
            data = await self.load(first, count)
            bad.extend(first + i for i in range(count)
                       if data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] != self.expected(first + i))

        try:
            await in_flight(lambda first=first: check(first, min(BATCH_PAGES, npages - first))
                            for first in range(0, npages, BATCH_PAGES))
        except GuestFailure as exc:
            self.report.memory_intact = False
            self.report.detail = f"verify: {exc}"
            self.event(f"memory check failed: {exc}")
            return self.report
        self.report.memory_intact, self.report.pages_checked = not bad, npages
        mode = "through the UV" if self.vcpu_state == VcpuState.VCPU_SECURE else \
            "through the host (the VM is stopped)" if self.report.os_term else "through the HV"
        if bad:
            self.report.detail = f"{len(bad)} pages differ, first gfn {min(bad)}"
        self.event(f"memory check {mode}: {npages - len(bad)}/{npages} pages intact")
        return self.report

    # -- exercise the SVM's calls ---------------------------------------------------------------

    async def exercise(self) -> pb.ExerciseResponse:
        """Secure stores, share / unshare, and a look at a shared page from the host."""
        steps: list[str] = []
        if self.vcpu_state != VcpuState.VCPU_SECURE:
            return pb.ExerciseResponse(steps=["not secure: nothing to exercise"], ok=False)
        data_gfn = self.image.data_start >> PAGE_SHIFT
        last = self.image.npages - 1
        try:
            await self.store(data_gfn, bytes([0xA5]) * PAGE_SIZE)
            steps.append(f"SvmStore gfn {data_gfn}: U_SUCCESS")
            ctx = self.vcpu_context()
            rc = (await self.uv.call("UV_SHARE_PAGE", upb.UvSharePageRequest(vcpu=ctx, gfn=last, npages=1))).rc
            steps.append(f"UV_SHARE_PAGE gfn {last}: {rc_name(rc, U)}")
            if rc == U.U_SUCCESS:
                self.written[last] = bytes(PAGE_SIZE)  # shared pages start zeroed
                message = b"hello from the SVM through a shared page".ljust(PAGE_SIZE, b"\0")
                await self.store(last, message)
                seen = (await self._hv("HostReadPage", hpb.HostReadPageRequest(
                    lpid=self.lpid, gpa=gpa_of(last)))).data
                steps.append(f"host reads the shared page: {'same bytes' if seen == message else 'DIFFERENT'}")
                rc = (await self.uv.call("UV_UNSHARE_PAGE", upb.UvUnsharePageRequest(
                    vcpu=ctx, gfn=last, npages=1))).rc
                steps.append(f"UV_UNSHARE_PAGE gfn {last}: {rc_name(rc, U)}")
                if rc == U.U_SUCCESS:
                    self.written[last] = bytes(PAGE_SIZE)  # unshare zeroes too
        except (GuestFailure, Unreachable) as exc:
            steps.append(f"failed: {exc}")
            return pb.ExerciseResponse(steps=steps, ok=False)
        ok = all(("U_SUCCESS" in s or "same bytes" in s) for s in steps)
        return pb.ExerciseResponse(steps=steps, ok=ok)

    async def hold_session(self) -> None:
        """Hold the VM's session at the HV (QEMU's VM fd) for as long as the VM lives; after an
        HV restart reconnect, for up to hv_wait_s."""
        backoff = None  # from the first failure after the session was last held
        while True:
            try:
                async for event in self.hv.stream("VmSession", hpb.VmSessionRequest(lpid=self.lpid)):
                    if event.errno != Errno.OK:
                        self.event(f"VM session refused: {Errno(event.errno).name}")
                        return
                    backoff = None
                return  # the HV ended the session: the VM was destroyed
            except Unreachable as exc:
                if exc.code == "CANCELLED":
                    return
                backoff = backoff or Backoff(cap=1.0, within=self.cfg.hv_wait_s)
                if backoff.expired:
                    self.event(f"HV gone for {self.cfg.hv_wait_s} s: giving up the VM session")
                    return
                await backoff.wait()

    async def close(self) -> None:
        if self.session is not None:
            self.session.cancel()
        await self.hv.close()
        await self.uv.close()
