"""The Hypervisor core: its state, its ports to the UV and the vCPUs, its call table, and what
runs beside the calls.

At start the HV rebuilds every VM from its data directory and finishes any journalled abort
(``recover``). Two background tasks run beside the calls: the UV monitor (a UV whose boot id
changed was reset: its secure memory is gone, so every VM that depended on it is failed) and the
session watchdog (after a restart, a VM whose VMM does not come back within the grace period is
destroyed).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from pefsim import clock
from pefsim.abi import AbortReturn, SecureGuest, VmState
from pefsim.calltable import CallTable
from pefsim.history import History
from pefsim.image import page_digest
from pefsim.v1 import guest_pb2
from services.hypervisor import calltable
from services.hypervisor.core import abort
from services.hypervisor.core.metrics import HvMetrics
from services.hypervisor.core.pages import settle_pageouts
from services.hypervisor.core.state import HvState
from services.hypervisor.ports import UvPort, UvReset, UvUnreachable, VcpuPort, VcpuUnreachable

log = logging.getLogger("pefsim.hv")


@dataclass
class HvConfig:
    listen: str = "127.0.0.1:0"
    uv: str = ""
    data_dir: Path = Path("hv-data")
    abort_return: int = AbortReturn.ABORT_RETURN_GUEST
    history: str | None = None
    metrics_listen: str | None = None
    ready_file: str | None = None
    ucall_timeout_s: float = 30.0  # a ucall that takes longer failed in transport
    resume_retry_s: float = 60.0  # how long an abort keeps trying to resume an unreachable guest
    session_grace_s: float = 10.0  # after a restart, how long a VMM has to come back
    uv_probe_s: float = 1.0  # how often the UV's boot id is checked
    transfer: str = "stream"  # page data to/from the UV: "stream" (bulk) or "unary" (one ucall a page)
    shared_memory: bool = True  # offer the UV the RAM files (pages then travel by real address)
    tls: object = None  # pefsim.tls.Tls (mTLS) or None (insecure)
    max_vms_per_owner: int = 16  # VMs one guest identity (or the operators together) may hold
    max_pages_per_owner: int = 1 << 20  # guest memory one owner may hold, in 64 KiB pages (64 GiB)
    unattached_grace_s: float = 30.0  # a guest's VM whose VMM never opened a session is reaped then


class Hypervisor:
    """The HV's state, configuration and call table, and its ports to its peers (``attach``):
    ``uv`` (ports.UvPort) and ``vcpus`` (ports.VcpuPort)."""

    uv: UvPort | None = None  # until attach
    vcpus: VcpuPort | None = None

    def __init__(self, cfg: HvConfig):
        self.cfg = cfg
        self.state = HvState(cfg.data_dir)
        self.metrics = HvMetrics(self.state)
        self.history = History(cfg.history, "hv")
        self.stopping = False
        self.tasks: list[asyncio.Task] = []
        self.table = CallTable(service=self, calls=calltable.CALLS, state_table=calltable.STATE_TABLE,
                               state_of=calltable.state_of, observer=self.metrics, history=self.history,
                               owner_of=calltable.owner_of, absent_state=VmState.VM_ABSENT)

    def attach(self, uv: UvPort, vcpus: VcpuPort) -> "Hypervisor":
        """Give the core its ports (an adapter's; the UV port reports answers to uv_answered)."""
        self.uv, self.vcpus = uv, vcpus
        return self

    # -- start-up: recovery and background tasks -----------------------------------------------

    def recover(self) -> None:
        vms = self.state.load()
        for q in self.state.quarantined:
            self.metrics.vms_quarantined.labels(q.reason).inc()
        deadline = clock.monotonic() + self.cfg.session_grace_s
        for vm in vms:
            if vm.had_session:
                vm.session_deadline = deadline
        if vms:
            self.metrics.vms_recovered.inc(len(vms))
            log.warning("recovered %d VMs from %s; %d interrupted aborts to finish", len(vms),
                        self.cfg.data_dir, abort.recover(self))
            for vm in vms:
                if vm.pageouts_pending:
                    self.tasks.append(asyncio.ensure_future(settle_pageouts(self, vm)))

    def start_background(self) -> None:
        self.tasks += [asyncio.ensure_future(self.uv_monitor()), asyncio.ensure_future(self.watchdog())]

    async def uv_monitor(self) -> None:
        """Notice a UV restart (a machine reset): fail every VM whose state lived in it."""
        while True:
            try:
                status = await self.uv.status()
            except UvUnreachable:
                status = None
            if status is not None:
                self.check_uv_boot(status.boot_id)
            await clock.sleep(self.cfg.uv_probe_s)

    def check_uv_boot(self, boot_id: str) -> bool:
        """Compare a UV answer's boot id with the one this HV's VMs depend on; on a change start
        failing them (as its own task: callers may hold a VM's lock) and return True."""
        if not boot_id:
            return False
        known = self.state.known_uv_boot_id()
        if known == boot_id:
            return False
        self.state.remember_uv_boot_id(boot_id)
        if not known:
            return False
        self.tasks.append(asyncio.ensure_future(self.uv_reset(known, boot_id)))
        return True

    async def uv_reset(self, old: str, new: str) -> None:
        log.error("the UV was reset (boot id %s -> %s): its secure memory is gone", old, new)
        self.metrics.uv_resets.inc()
        for vm in list(self.state.vms.values()):
            if vm.secure_guest == 0 and vm.abort is None:
                continue  # a normal VM never depended on the UV: it keeps running
            vm.failed = "uv-reset"  # stops an abort's retries
            async with vm.lock:
                self.state.drop_secure(vm.slots.values())
                self.state.set_secure_guest(vm, SecureGuest.SECURE_GUEST_NONE, abort=None)
            await self.machine_check(vm, "uv-reset")

    async def machine_check(self, vm, reason: str) -> None:
        """Tell the guest its VM failed (``vm.failed`` says why; counted by reason). A guest that
        cannot be reached learns it from its next call."""
        vm.failed = reason
        self.state.save(vm)
        self.metrics.vms_failed.labels(reason).inc()
        try:
            await self.vcpus.machine_check(vm, guest_pb2.MachineCheckRequest(lpid=vm.lpid, reason=reason), timeout=5)
        except VcpuUnreachable as exc:
            log.warning("lpid %d: machine check (%s) not delivered: %s", vm.lpid, reason, exc.code)

    async def watchdog(self) -> None:
        """Destroy VMs whose VMM did not come back after a restart, and a guest's VMs whose VMM
        never opened a session at all within unattached_grace_s of their creation (a VM nobody
        holds is never destroyed by a session's end: it would pin its owner's quota and disk)."""
        from services.hypervisor.core.vms import destroy  # vms imports this module's neighbours

        while True:
            now = clock.monotonic()
            for vm in list(self.state.vms.values()):
                if (vm.owner and not vm.had_session and vm.sessions == 0 and vm.abort is None
                        and now - vm.created_at > self.cfg.unattached_grace_s):
                    log.warning("lpid %d: %s's VMM never opened a session in %.0f s: destroyed", vm.lpid,
                                vm.owner, self.cfg.unattached_grace_s)
                    await destroy(self, vm, "never-attached")
                elif vm.session_deadline and vm.sessions == 0 and now > vm.session_deadline:
                    log.warning("lpid %d: its VMM did not come back within %.0f s", vm.lpid,
                                self.cfg.session_grace_s)
                    await destroy(self, vm, "vmm-gone")
                elif vm.sessions:
                    vm.session_deadline = 0.0
            await clock.sleep(0.5)

    # -- peers -------------------------------------------------------------------------------------

    async def ucall(self, name: str, request):
        """Make an ultracall through the UV port; raises UvUnreachable on a transport failure
        (UvReset when a restarted UV answered). Each ucall is recorded in the history (``dir:
        out``), page data by its SHA-256 only (what the HV received, for the checker that no
        plaintext of a secure VM ever reaches the HV)."""
        try:
            resp = await self.uv.ucall(name, request, on_behalf=self.on_behalf(request.lpid),
                                       timeout=self.cfg.ucall_timeout_s)
        except UvReset:
            self.history.record(call=name, dir="out", lpid=request.lpid, error="uv-reset")
            raise
        except UvUnreachable as exc:
            log.error("%s: UV unreachable (%s)", name, exc)
            self.history.record(call=name, dir="out", lpid=request.lpid, error=exc.code)
            raise
        extra = {}
        if name == "UV_PAGE_OUT":
            extra = {"gpa": request.src_gpa, "data_sha": page_digest(resp.data)}
        self.history.record(call=name, dir="out", lpid=request.lpid, rc=resp.rc, **extra)
        return resp

    def on_behalf(self, lpid: int) -> str:
        """The guest a ucall serves (the VM's owner; "" for an operator's VM): the UV counts the
        HV's calls and streams for each guest apart (rpc.Admission), so one guest's VMs paging in
        at once cannot use up the HV's share at the UV for every other guest."""
        vm = self.state.vms.get(lpid)
        return vm.owner if vm is not None else ""

    def uv_answered(self, boot_id: str) -> None:
        """The UV port's on_boot: an answer's boot id; UvReset if a restarted UV gave it."""
        if self.check_uv_boot(boot_id):
            raise UvReset("answer", "uv-reset")

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for port in (self.uv, self.vcpus):
            if port is not None:
                await port.close()
        self.history.close()
