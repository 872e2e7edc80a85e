"""The Hypervisor process: build_server() and main().

    python -m services.hypervisor --listen 127.0.0.1:7102 --uv 127.0.0.1:7101 --data-dir /tmp/hv

At start the HV rebuilds every VM from its data directory and finishes any journalled abort. Two
background tasks run beside the server: the UV monitor (a UV whose boot id changed was reset: its
secure memory is gone, so every VM that depended on it is failed) and the session watchdog
(after a restart, a VM whose VMM does not come back within the grace period is destroyed).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from pefsim import faults, rpc, tls
from pefsim.abi import AbortReturn, Role, SecureGuest, VmState
from pefsim.image import page_digest
from pefsim.v1 import guest_pb2, guest_pb2_grpc, hypervisor_pb2, ultravisor_pb2 as upb, ultravisor_pb2_grpc
from services.hypervisor import abort, calltable
from services.hypervisor.errors import UvReset, UvUnreachable
from services.hypervisor.hcalls.page import settle_pageouts
from services.hypervisor.metrics import HvMetrics
from services.hypervisor.state import HvState, Vm

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
    """The HV's state, its peers (the UV, each guest's vCPU) and configuration."""

    def __init__(self, cfg: HvConfig):
        self.cfg = cfg
        self.state = HvState(cfg.data_dir)
        self.uv = rpc.Peer(cfg.uv, Role.ROLE_HV, ultravisor_pb2_grpc.UltravisorServiceStub, "hv", cfg.tls, "uv")
        self.vcpus: dict[int, rpc.Peer] = {}
        self.metrics = HvMetrics(self.state)
        self.history = rpc.History(cfg.history, "hv")
        self.stopping = False
        self.tasks: list[asyncio.Task] = []
        self.dispatcher = rpc.Dispatcher(
            service=self, service_descriptor=hypervisor_pb2.DESCRIPTOR.services_by_name["HypervisorService"],
            pb2=hypervisor_pb2, calls=calltable.CALLS, state_table=calltable.STATE_TABLE,
            state_of=calltable.state_of, observer=self.metrics, history=self.history,
            owner_of=calltable.owner_of, absent_state=VmState.VM_ABSENT)

    # -- start-up: recovery and background tasks -----------------------------------------------

    def recover(self) -> None:
        vms = self.state.load()
        for q in self.state.quarantined:
            self.metrics.vms_quarantined.labels(q.reason).inc()
        deadline = time.monotonic() + self.cfg.session_grace_s
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
                status = await self.uv.stub.UvStatus(upb.UvStatusRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                status = None
            if status is not None:
                self.check_uv_boot(status.boot_id)
            await asyncio.sleep(self.cfg.uv_probe_s)

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
            await self.vcpu(vm).stub.MachineCheck(
                guest_pb2.MachineCheckRequest(lpid=vm.lpid, reason=reason), timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.warning("lpid %d: machine check (%s) not delivered: %s", vm.lpid, reason, exc.code().name)

    async def watchdog(self) -> None:
        """Destroy VMs whose VMM did not come back after a restart, and a guest's VMs whose VMM
        never opened a session at all within unattached_grace_s of their creation (a VM nobody
        holds is never destroyed by a session's end: it would pin its owner's quota and disk)."""
        from services.hypervisor.control.vm import destroy

        while True:
            now = time.monotonic()
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
            await asyncio.sleep(0.5)

    # -- peers -------------------------------------------------------------------------------------

    async def ucall(self, name: str, request):
        """Make an ultracall; raises UvUnreachable on a transport failure. Each ucall is recorded
        in the history (``dir: out``), page data by its SHA-256 only (what the HV received, for
        the checker that no plaintext of a secure VM ever reaches the HV)."""
        try:
            pending = getattr(self.uv.stub, name)(request, timeout=self.cfg.ucall_timeout_s,
                                                  wait_for_ready=True, metadata=self.on_behalf(request.lpid))
            resp = await pending
            boot_id = dict(await pending.trailing_metadata() or ()).get(rpc.BOOT_ID_TRAILER, "")
        except grpc.aio.AioRpcError as exc:
            log.error("%s: UV unreachable (%s)", name, exc.code().name)
            self.history.record(call=name, dir="out", lpid=request.lpid, error=exc.code().name)
            raise UvUnreachable(name) from None
        if self.check_uv_boot(boot_id):
            self.history.record(call=name, dir="out", lpid=request.lpid, error="uv-reset")
            raise UvReset(name)
        extra = {}
        if name == "UV_PAGE_OUT":
            extra = {"gpa": request.src_gpa, "data_sha": page_digest(resp.data)}
        self.history.record(call=name, dir="out", lpid=request.lpid, rc=resp.rc, **extra)
        return resp

    def on_behalf(self, lpid: int) -> tuple[tuple[str, str], ...]:
        """Metadata naming the guest a ucall serves (the VM's owner): the UV counts the HV's calls
        and streams for each guest apart (rpc.Admission), so one guest's VMs paging in at once
        cannot use up the HV's share at the UV for every other guest."""
        vm = self.state.vms.get(lpid)
        return ((rpc.ON_BEHALF_HEADER, vm.owner if vm is not None else ""),)

    async def check_answer_boot(self, call) -> None:
        """A streamed answer's boot id (trailing metadata), as ucall checks a unary one's."""
        boot_id = dict(await call.trailing_metadata() or ()).get(rpc.BOOT_ID_TRAILER, "")
        if self.check_uv_boot(boot_id):
            raise UvReset("stream")

    def vcpu(self, vm: Vm) -> rpc.Peer:
        """The VM's vCPU, reached only through the certificate of the guest that owns the VM
        (tls.server_name): an endpoint naming another guest's service fails the handshake, so a
        resume or machine check never lands on a vCPU that is not the VM's. An operator's VM
        takes any guest certificate (the operator named the endpoint)."""
        peer = self.vcpus.get(vm.lpid)
        if peer is None:
            server = tls.server_name(f"guest:{vm.owner}") if vm.owner else "guest"
            peer = self.vcpus[vm.lpid] = rpc.Peer(vm.vcpu_endpoint, Role.ROLE_HV, guest_pb2_grpc.GuestServiceStub,
                                                  "hv", self.cfg.tls, server)
        return peer

    async def forget_vcpu(self, lpid: int) -> None:
        peer = self.vcpus.pop(lpid, None)
        if peer is not None:
            await peer.close()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.uv.close()
        for lpid in list(self.vcpus):
            await self.forget_vcpu(lpid)
        self.history.close()


class DataDirBusy(SystemExit):
    """Another HV holds this data directory."""


def lock_data_dir(data_dir: Path) -> int:
    """Hold ``data_dir/hv.lock`` (flock) for the process's life: two HVs on one data directory
    would each rebuild, journal and scrub the same VMs' files under the other. The lock goes with
    the process, kill -9 included. Returns the descriptor (kept open); a held lock exits with a
    one-line message naming the holder."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "hv.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DataDirBusy(f"pefsim-hv: {data_dir} is in use by an HV (pid {holder}); "
                          "give each HV its own --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def build_server(cfg: HvConfig) -> tuple[grpc.aio.Server, int, Hypervisor]:
    lock_data_dir(Path(cfg.data_dir))  # held until the process ends
    hv = Hypervisor(cfg)
    hv.recover()
    server, port = await rpc.start_server(cfg.listen, [hv.dispatcher.generic_handler()], "pefsim.v1.HypervisorService",
                                          cfg.tls)
    hv.start_background()
    return server, port, hv


def parse_args(argv=None) -> HvConfig:
    ap = argparse.ArgumentParser(prog="pefsim-hv", description="pefsim Hypervisor service")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve gRPC on")
    ap.add_argument("--uv", required=True, help="host:port of the Ultravisor service")
    ap.add_argument("--data-dir", type=Path, required=True,
                    help="directory for guest RAM and VM state (file-backed; survives restarts)")
    ap.add_argument("--abort-return", choices=["guest", "uv"], default="guest",
                    help="H_SVM_INIT_ABORT returns to the guest (merged kernel, default) or to "
                         "the UV (the v10 proposal)")
    ap.add_argument("--session-grace", type=float, default=10.0,
                    help="after a restart, seconds a VMM has to reconnect before its VM is destroyed")
    ap.add_argument("--max-vms-per-owner", type=int, default=16,
                    help="VMs one guest identity may hold (operators share one quota); beyond: ENOMEM")
    ap.add_argument("--max-pages-per-owner", type=int, default=1 << 20,
                    help="guest memory one owner may hold, in 64 KiB pages (default 64 GiB); beyond: ENOMEM")
    ap.add_argument("--unattached-grace", type=float, default=30.0,
                    help="seconds a guest's VM may live without its VMM ever opening a session")
    ap.add_argument("--resume-retry", type=float, default=60.0,
                    help="seconds an abort keeps trying to resume an unreachable guest")
    ap.add_argument("--transfer", choices=["stream", "unary"], default="stream",
                    help="abort page-out as bulk streams (default) or one UV_PAGE_OUT per page")
    ap.add_argument("--shared-memory", choices=["auto", "off"], default="auto",
                    help="offer the UV this HV's RAM files (default: auto, used when it can open them)")
    faults.add_argument(ap)
    tls.add_args(ap)
    ap.add_argument("--history", help="append a JSON line per served call to this file")
    ap.add_argument("--metrics-listen", help="host:port for /metrics (port 0 picks one)")
    ap.add_argument("--ready-file", help="write {pid, port, metrics_port} here once serving")
    a = ap.parse_args(argv)
    faults.configure(a.failpoint)
    return HvConfig(listen=a.listen, uv=a.uv, data_dir=a.data_dir,
                    abort_return=AbortReturn[f"ABORT_RETURN_{a.abort_return.upper()}"],
                    history=a.history, metrics_listen=a.metrics_listen, ready_file=a.ready_file,
                    session_grace_s=a.session_grace, resume_retry_s=a.resume_retry,
                    transfer=a.transfer, shared_memory=a.shared_memory == "auto",
                    max_vms_per_owner=a.max_vms_per_owner, max_pages_per_owner=a.max_pages_per_owner,
                    unattached_grace_s=a.unattached_grace,
                    tls=tls.from_args(ap, a, "hv"))


async def serve(cfg: HvConfig) -> None:
    server, port, hv = await build_server(cfg)
    metrics_port = hv.metrics.serve(cfg.metrics_listen)
    log.info("hypervisor serving on %s (port %d), uv %s, data %s, abort returns to %s",
             cfg.listen, port, cfg.uv, cfg.data_dir, AbortReturn(cfg.abort_return).name)
    rpc.write_ready_file(cfg.ready_file, port=port, metrics_port=metrics_port, boot_id=hv.state.boot_id)

    def before_stop() -> None:
        hv.stopping = True  # sessions ending now are the HV's, not their VMMs': keep the VMs

    await rpc.serve_until_signalled(server, hv.close, before_stop=before_stop)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hv %(levelname)s %(message)s")
    cfg = parse_args(argv)
    rpc.run(lambda: serve(cfg))
