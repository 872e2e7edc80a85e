"""The chaos nemesis: puts the plan's fault in place and heals it (Jepsen's nemesis), by fault
family: a process killed or paused (kill-hv, kill-uv, kill-guest, pause-hv, through the backend),
the HV's own failpoints (it kills or stops itself at an exact step), and the network between HV
and UV (net-*, through the fault proxy). What it did is a :class:`FaultRecord`."""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import grpc

from pefsim.chaos.client import RunCtx, lpid_of, poll, svm_state, vm_of
from pefsim.image import GuestImage
from pefsim.v1 import hypervisor_pb2 as hpb


@dataclass
class FaultRecord:
    injected: bool = False
    t_inject: float = 0.0
    t_heal: float = 0.0
    detail: str = ""


async def trigger(ctx: RunCtx, victim_boot: asyncio.Future) -> bool:
    """Wait for the moment the plan names; False if the victim finished first."""
    await poll(lambda: lpid_of(ctx, "victim"), 30)
    during = ctx.plan.during
    if during == "abort":
        async def cond():
            return victim_boot.done() or await svm_state(ctx, "victim") == "SVM_ABORT"
    elif during == "esm":
        async def cond():
            vm = await vm_of(ctx, "victim")
            return victim_boot.done() or (vm is not None and vm.state == "VM_TRANSIENT")
    else:
        async def cond():
            return victim_boot.done()
    await poll(cond, ctx.cfg.final_bound_s)
    if during == "secure":
        return True
    await asyncio.sleep(ctx.plan.delay_s)
    return not victim_boot.done()


async def touch_secure_victim(ctx: RunCtx, victim_boot: asyncio.Future) -> None:
    """Once the victim is secure, the host touches its first data page: the HV pages it out (and
    its armed failpoint kills it once the UV has answered)."""
    rep = await asyncio.shield(victim_boot)
    if rep.outcome != "secure":
        return
    gpa = GuestImage.of_size(ctx.names["victim"], ctx.cfg.mem_bytes).data_start
    try:
        await ctx.op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=rep.lpid, gpa=gpa), timeout=10)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:  # anything but the HV dying under the call
            raise


async def nemesis(ctx: RunCtx, victim_boot: asyncio.Future) -> FaultRecord:
    fault, backend, rec = ctx.plan.fault, ctx.backend, FaultRecord()
    if ctx.plan.failpoint.endswith("=stop"):
        return await at_breakpoint(ctx, victim_boot, fault, rec)
    if ctx.plan.failpoint:
        # the armed HV kills itself at the failpoint: wait for it (or for the run to end without)
        async def hv_died_or_run_over():
            return not backend.alive("hv") or victim_boot.done()

        async def hv_died():
            return not backend.alive("hv")
        if ctx.plan.failpoint.startswith("hv.secure.page_out"):
            await touch_secure_victim(ctx, victim_boot)
            died = await poll(hv_died, 10, 0.002)
        else:
            died = await poll(hv_died_or_run_over, ctx.cfg.final_bound_s, 0.002)
        if died and not backend.alive("hv"):
            with fault_window(ctx, fault, rec):
                rec.detail = f"HV killed itself at {ctx.plan.failpoint}"
                await asyncio.to_thread(backend.restart, "hv")  # disarmed
        else:
            await asyncio.to_thread(backend.restart, "hv")  # disarmed
            rec.t_heal = time.time()
        return rec
    if not await trigger(ctx, victim_boot):
        rec.detail, rec.t_heal = "the victim finished before the fault point", time.time()
        return rec
    with fault_window(ctx, fault, rec):
        await inject(ctx, fault, rec)
    return rec


@contextlib.contextmanager
def fault_window(ctx: RunCtx, fault: str, rec: FaultRecord):
    """The block is the fault's time in effect: recorded as injected (counted, shown active)
    when it starts, healed when it ends."""
    rec.injected, rec.t_inject = True, time.time()
    ctx.metrics.faults.labels(fault).inc()
    ctx.metrics.active.labels(fault).set(1)
    try:
        yield
    finally:
        ctx.metrics.active.labels(fault).set(0)
        rec.t_heal = time.time()


async def at_breakpoint(ctx: RunCtx, victim_boot: asyncio.Future, fault: str, rec: FaultRecord) -> FaultRecord:
    """The HV stops itself at the plan's breakpoint; the fault is put in place while it is
    stopped, the HV is let go, and the fault runs its course."""
    backend = ctx.backend

    async def hv_stopped_or_run_over():
        return backend.stopped("hv") or victim_boot.done()
    await poll(hv_stopped_or_run_over, ctx.cfg.final_bound_s, 0.002)
    if not backend.stopped("hv"):
        rec.detail, rec.t_heal = "the victim finished before the breakpoint", time.time()
        return rec
    with fault_window(ctx, fault, rec):
        try:
            await inject(ctx, fault, rec, release=lambda: backend.cont("hv"))
        finally:
            backend.cont("hv")  # whatever happened, the HV is not left stopped
    rec.detail += f" (the HV stopped at {ctx.plan.failpoint.removesuffix('=stop')})"
    return rec


async def inject(ctx: RunCtx, fault: str, rec: FaultRecord, release=lambda: None) -> None:
    """Put the fault in place, call ``release`` (it lets a stopped HV go on: see at_breakpoint),
    and heal it."""
    backend = ctx.backend
    if fault in ("kill-hv", "kill-uv"):
        svc = fault.removeprefix("kill-")
        backend.kill(svc)
        release()
        await asyncio.to_thread(backend.restart, svc)
        rec.detail = f"kill -9 {svc} ({ctx.plan.during}), restarted"
    elif fault == "pause-hv":
        backend.pause("hv")
        await asyncio.sleep(ctx.cfg.pause_s)
        backend.cont("hv")
        rec.detail = f"SIGSTOP hv for {ctx.cfg.pause_s} s"
    elif fault == "kill-guest":
        backend.kill_guest(ctx.names["victim"])
        release()
        rec.detail = "kill -9 the victim guest mid-ESM"
    elif fault.startswith("net-"):
        kind = fault.removeprefix("net-")
        backend.net_fault(kind, ctx.plan.value)
        release()
        await asyncio.sleep(ctx.cfg.fault_s)
        backend.net_heal()
        rec.detail = f"HV<->UV {kind} {ctx.plan.value or ''} for {ctx.cfg.fault_s} s"
