"""The chaos client: what the harness does as the operator and the guests' owner (Jepsen's
client): start and boot guests, watch the VM and SVM states, wait for every guest to be final,
read memory back and let the host touch a secure page, destroy the run's VMs. Every call is a
real RPC to the stack under test (pefsim.ops.demo.Operator)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from google.protobuf import json_format

from pefsim.abi import PAGE_SIZE, Errno
from pefsim.blob import make_blob
from pefsim.chaos.generator import ChaosConfig, Plan
from pefsim.image import GuestImage, page_digest
from pefsim.ops.demo import Operator
from pefsim.v1 import guest_pb2, hypervisor_pb2 as hpb, ultravisor_pb2 as upb

if TYPE_CHECKING:
    from pefsim.chaos.nemesis import FaultRecord


@dataclass
class RunCtx:
    cfg: ChaosConfig
    backend: object
    run: int
    plan: Plan
    op: Operator
    names: dict = field(default_factory=dict)  # role -> guest name
    lpids: dict = field(default_factory=dict)  # role -> lpid
    metrics: object = None


async def poll(cond, timeout: float, every: float = 0.005):
    """Wait until ``await cond()`` is truthy; returns it, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = await cond()
        except grpc.aio.AioRpcError:
            value = None
        if value:
            return value
        await asyncio.sleep(every)
    return None


async def svm_state(ctx: RunCtx, role: str) -> str:
    lpid = ctx.lpids.get(role)
    status = await ctx.op.uv.stub.UvStatus(upb.UvStatusRequest(), timeout=2)
    return next((s.state for s in status.svms if s.lpid == lpid), "")


async def vm_of(ctx: RunCtx, role: str):
    status = await ctx.op.hv.stub.HvStatus(hpb.HvStatusRequest(), timeout=2)
    return next((v for v in status.vms if v.lpid == ctx.lpids.get(role)), None)


async def lpid_of(ctx: RunCtx, role: str) -> int:
    rep = (await ctx.op.guest(ctx.names[role]).GuestStatus(guest_pb2.GuestStatusRequest(), timeout=2)).report
    if rep.lpid:
        ctx.lpids[role] = rep.lpid
    return rep.lpid


def guest_name(run: int, role: str) -> str:
    return f"r{run}-{role}"


def victim_name(run: int) -> str:
    return guest_name(run, "victim")


async def start_guest(ctx: RunCtx, role: str, blob_ok: bool = True, extra: tuple[str, ...] = ()) -> dict:
    name = guest_name(ctx.run, role)
    image = GuestImage.of_size(name, ctx.cfg.mem_bytes)
    blob = make_blob(image, ctx.backend.signing_key(), override=None if blob_ok else {"kernel": "0" * 128})
    addr = await asyncio.to_thread(ctx.backend.add_guest, name, ctx.cfg.mem_bytes, blob, extra)
    ctx.op.guest(name, addr)
    ctx.names[role] = name
    return {"name": name, "mem_bytes": ctx.cfg.mem_bytes, "blob_hex": blob.hex(), "role": role}


async def boot(ctx: RunCtx, role: str):
    return (await ctx.op.guest(ctx.names[role]).Boot(guest_pb2.BootRequest())).report


async def settle(ctx: RunCtx, victim_boot: asyncio.Future, fault: FaultRecord) -> float | None:
    """Wait (bounded) until every guest of the run is in a final state; returns when."""
    try:
        await asyncio.wait_for(asyncio.shield(victim_boot), ctx.cfg.final_bound_s)
    except asyncio.TimeoutError:
        return None
    except grpc.aio.AioRpcError:
        if ctx.plan.fault != "kill-guest":
            return None
        # the VMM is gone: final once the HV destroyed its VM and the UV forgot its SVM
        async def gone():
            return await vm_of(ctx, "victim") is None and await svm_state(ctx, "victim") == ""
        if not await poll(gone, ctx.cfg.final_bound_s, 0.05):
            return None
        return time.time()
    return time.time() if await poll(lambda: settled(ctx), ctx.cfg.final_bound_s, 0.05) else None


async def settled(ctx: RunCtx) -> bool:
    """No abort still under way, no VM left depending on a UV that was reset, and every guest
    told what happened to it."""
    status = await ctx.op.hv.stub.HvStatus(hpb.HvStatusRequest(), timeout=2)
    mine = {v.lpid: v for v in status.vms if v.lpid in ctx.lpids.values()}
    if any(v.aborting for v in mine.values()):
        return False
    uv = await ctx.op.uv.stub.UvStatus(upb.UvStatusRequest(), timeout=2)
    svms = {s.lpid for s in uv.svms}
    for role, name in ctx.names.items():
        vm = mine.get(ctx.lpids.get(role))
        if vm is not None and vm.state in ("VM_TRANSIENT", "VM_SECURE") and vm.lpid not in svms:
            return False  # the UV lost it (reset) and the HV has not failed the VM yet
        rep = (await ctx.op.guest(name).GuestStatus(guest_pb2.GuestStatusRequest(), timeout=2)).report
        if rep.outcome in ("created", "booting") or (vm is not None and vm.failed and rep.outcome != "failed"):
            return False
    return True


async def inspect(ctx: RunCtx, record: dict) -> None:
    """Read memory back, touch a secure page from the host, collect reports and status."""
    for role, g in record["guests"].items():
        if role == "victim" and ctx.plan.fault == "kill-guest":
            g["outcome"] = "killed" if await vm_of(ctx, "victim") is None else "not-destroyed"
            continue
        stub = ctx.op.guest(g["name"])
        try:
            rep = (await stub.GuestStatus(guest_pb2.GuestStatusRequest(), timeout=10)).report
            if rep.outcome in ("secure", "aborted", "normal"):
                rep = (await stub.Verify(guest_pb2.VerifyRequest(), timeout=60)).report
            if rep.outcome == "secure":
                record["host_touches"].append(await host_touch(ctx, g, rep.lpid))
        except grpc.aio.AioRpcError as exc:
            g["outcome"] = f"unreachable ({exc.code().name})"
            continue
        g["report"] = json_format.MessageToDict(rep)
        g["report"]["lpid"] = rep.lpid
        g["outcome"] = rep.outcome if rep.outcome != "booting" else "not-final"
    record["uv_status"] = json_format.MessageToDict(await ctx.op.uv.stub.UvStatus(upb.UvStatusRequest()))
    record["hv_status"] = json_format.MessageToDict(await ctx.op.hv.stub.HvStatus(hpb.HvStatusRequest()))


async def host_touch(ctx: RunCtx, g: dict, lpid: int) -> dict:
    """The host reads a data page of a secure guest: it must get ciphertext."""
    image = GuestImage.of_size(g["name"], g["mem_bytes"])
    gpa = image.data_start
    resp = await ctx.op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=lpid, gpa=gpa))
    plain = image.page(gpa // PAGE_SIZE, bytes.fromhex(g["blob_hex"]))
    return {"guest": g["name"], "errno": Errno(resp.errno).name, "data_sha": page_digest(resp.data),
            "plaintext": resp.errno == Errno.OK and resp.data == plain}


async def teardown(ctx: RunCtx, record: dict) -> None:
    for role in ctx.names:
        if role not in ctx.lpids:
            await poll(lambda: lpid_of(ctx, role), 5, 0.05)
    for role, lpid in ctx.lpids.items():
        try:
            await ctx.op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=lpid), timeout=30)
        except grpc.aio.AioRpcError:
            pass
    status = await poll(lambda: ctx.op.uv.stub.UvStatus(upb.UvStatusRequest(), timeout=2), 30)
    record["uv_after"] = json_format.MessageToDict(status, always_print_fields_with_no_presence=True)
