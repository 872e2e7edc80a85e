"""Scripted peers: a test-process HV that drives a real UV process into any SVM state, and a
test-process UV (and guest vCPU) that a real HV process calls back.

Over gRPC they serve the real services on real sockets; in process (tests/conformance/world.py)
the core under test calls them through its ports. The scripted HV behaves like an honest HV by
default (it keeps the guest's pages, registers the memslot, hands pages over with UV_PAGE_IN)
but can hold any hcall open, or answer it differently, so the UV can be observed mid-ESM
(SVM_ACTIVE) or mid-abort (SVM_ABORT).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc

from pefsim import rpc
from pefsim.abi import PAGE_SHIFT, PAGE_SIZE, AbortReturn, Errno, H, HV_RA_BASE, PageInFlag, Role, U, gfn_of, gpa_of
from pefsim.calltable import message_classes
from pefsim.dataplane import pages_of
from pefsim.image import GuestImage
from pefsim.v1 import guest_pb2, hypervisor_pb2 as hpb
from pefsim.v1 import ultravisor_pb2 as upb, ultravisor_pb2_grpc


def _handlers(service_cls, impl, codecs: dict | None = None) -> grpc.GenericRpcHandler:
    """Generic handlers for every RPC ``impl`` defines (others: UNIMPLEMENTED); ``codecs`` gives
    (request deserializer, response serializer) for the raw-frame RPCs."""
    desc = service_cls
    methods = {}
    for m in desc.methods:
        fn = getattr(impl, m.name, None)
        if fn is None:
            continue
        req_cls, resp_cls = message_classes(m)
        req, resp = (codecs or {}).get(m.name, (req_cls.FromString, resp_cls.SerializeToString))
        make = (grpc.stream_stream_rpc_method_handler if m.client_streaming and m.server_streaming
                else grpc.unary_stream_rpc_method_handler if m.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        methods[m.name] = make(fn, request_deserializer=req, response_serializer=resp)
    return grpc.method_handlers_generic_handler(desc.full_name, methods)


@dataclass
class Guest:
    image: GuestImage
    blob: bytes
    pages: dict[int, bytes] = field(default_factory=dict)  # gfn -> what the HV holds

    def __post_init__(self) -> None:
        self.pages = {g: self.image.page(g, self.blob) for g in range(self.image.npages)}


class ScriptedHv:
    """A HypervisorService in the test process, for one real UV process."""

    pb2 = hpb

    def __init__(self, listen: str | None, uv_addr: str | None, stack=None, uv_peer=None):
        """``listen`` None: no server (the UV core calls this object through a port, and
        ``uv_peer`` is its way back to the UV: tests/conformance/world.py)."""
        self.listen = listen
        self.tls = stack.tls("hv") if stack is not None else None
        self.uv = uv_peer or rpc.Peer(uv_addr, Role.ROLE_HV, ultravisor_pb2_grpc.UltravisorServiceStub, "hv", self.tls,
                                      "uv")
        self.guests: dict[int, Guest] = {}
        self.seen: list[tuple[str, Any]] = []
        self.events: dict[tuple[str, int], asyncio.Event] = {}
        self.gates: dict[tuple[str, int], asyncio.Event] = {}
        self.answers: dict[tuple[str, int], Callable] = {}
        self.server: grpc.aio.Server | None = None

    async def __aenter__(self) -> "ScriptedHv":
        if self.listen is not None:
            self.server, _ = await rpc.start_server(self.listen, [
                _handlers(hpb.DESCRIPTOR.services_by_name["HypervisorService"], self)], tls=self.tls)
        return self

    async def __aexit__(self, *exc) -> None:
        for gate in self.gates.values():
            gate.set()
        if self.server is not None:
            await self.server.stop(grace=0.5)
        await self.uv.close()

    # -- scripting ------------------------------------------------------------------------------

    def hold(self, call: str, lpid: int) -> asyncio.Event:
        """Hold ``call`` for ``lpid`` open until the returned event is set."""
        gate = self.gates[(call, lpid)] = asyncio.Event()
        return gate

    def answer(self, call: str, lpid: int, fn: Callable) -> None:
        """Answer ``call`` for ``lpid`` with ``await fn(request)`` instead of the default."""
        self.answers[(call, lpid)] = fn

    def reached(self, call: str, lpid: int) -> asyncio.Event:
        return self.events.setdefault((call, lpid), asyncio.Event())

    async def _enter(self, call: str, req) -> Callable | None:
        self.seen.append((call, req))
        self.reached(call, req.lpid).set()
        gate = self.gates.get((call, req.lpid))
        if gate is not None:
            await gate.wait()
        return self.answers.get((call, req.lpid))

    # -- hcalls ---------------------------------------------------------------------------------

    async def H_SVM_INIT_START(self, req, context):
        custom = await self._enter("H_SVM_INIT_START", req)
        if custom:
            return await custom(req)
        g = self.guests[req.lpid]
        rc = (await self.uv.stub.UV_REGISTER_MEM_SLOT(upb.UvRegisterMemSlotRequest(
            lpid=req.lpid, start_gpa=0, size=g.image.mem_bytes, flags=0, slotid=0))).rc
        return hpb.HSvmInitStartResponse(rc=H.H_SUCCESS if rc == U.U_SUCCESS else H.H_PARAMETER)

    async def H_SVM_PAGE_IN(self, req, context):
        custom = await self._enter("H_SVM_PAGE_IN", req)
        if custom:
            return await custom(req)
        g = self.guests[req.lpid]
        gfn = gfn_of(req.guest_pa)
        data = b"" if req.flags == PageInFlag.H_PAGE_IN_SHARED else g.pages[gfn]
        rc = (await self.uv.stub.UV_PAGE_IN(upb.UvPageInRequest(
            lpid=req.lpid, src_ra=HV_RA_BASE + req.guest_pa, dest_gpa=req.guest_pa, flags=0,
            order=PAGE_SHIFT, data=data))).rc
        if rc == U.U_SUCCESS and req.flags == PageInFlag.H_PAGE_IN_SHARED:
            g.pages[gfn] = bytes(PAGE_SIZE)
        return hpb.HSvmPageInResponse(rc=H.H_SUCCESS if rc == U.U_SUCCESS else H.H_PARAMETER)

    async def HSvmPageInBulk(self, req, context):
        """The bulk form, done page by page with the ABI's H_SVM_PAGE_IN."""
        rcs = []
        for gpa in req.guest_pa:
            one = await self.H_SVM_PAGE_IN(hpb.HSvmPageInRequest(lpid=req.lpid, guest_pa=gpa, flags=req.flags,
                                                                 order=req.order), context)
            rcs.append(one.rc)
        return hpb.HSvmPageInBulkResponse(rc=next((r for r in rcs if r != H.H_SUCCESS), H.H_SUCCESS), rcs=rcs)

    async def H_SVM_PAGE_OUT(self, req, context):
        custom = await self._enter("H_SVM_PAGE_OUT", req)
        if custom:
            return await custom(req)
        resp = await self.page_out(req.lpid, gfn_of(req.guest_pa))
        return hpb.HSvmPageOutResponse(rc=H.H_SUCCESS if resp.rc == U.U_SUCCESS else H.H_PARAMETER)

    async def H_SVM_INIT_DONE(self, req, context):
        custom = await self._enter("H_SVM_INIT_DONE", req)
        if custom:
            return await custom(req)
        return hpb.HSvmInitDoneResponse(rc=H.H_SUCCESS)

    async def H_SVM_INIT_ABORT(self, req, context):
        custom = await self._enter("H_SVM_INIT_ABORT", req)
        if custom:
            return await custom(req)
        return hpb.HSvmInitAbortResponse(rc=H.H_PARAMETER, returned_to=AbortReturn.ABORT_RETURN_GUEST)

    async def VcpuLoad(self, req, context):
        g = self.guests[req.lpid]
        return hpb.VcpuLoadResponse(errno=Errno.OK, data=b"".join(
            g.pages[gfn_of(req.gpa) + i] for i in range(req.npages)))

    async def VcpuStore(self, req, context):
        g = self.guests[req.lpid]
        for i in range(len(req.data) // PAGE_SIZE):
            g.pages[gfn_of(req.gpa) + i] = req.data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        return hpb.VcpuStoreResponse(errno=Errno.OK)

    # -- what the test does as the HV -----------------------------------------------------------

    async def page_out(self, lpid: int, gfn: int):
        resp = await self.uv.stub.UV_PAGE_OUT(upb.UvPageOutRequest(
            lpid=lpid, dest_ra=HV_RA_BASE + gpa_of(gfn), src_gpa=gpa_of(gfn), flags=0, order=PAGE_SHIFT))
        if resp.rc == U.U_SUCCESS:
            self.guests[lpid].pages[gfn] = resp.data
        return resp


class ScriptedUv:
    """An UltravisorService in the test process, for one real HV process: accepts every ucall
    (or answers as scripted) and keeps the pages the HV hands over."""

    pb2 = upb

    def __init__(self, listen: str, stack=None):
        self.listen = listen
        self.tls = stack.tls("uv") if stack is not None else None
        self.pages: dict[tuple[int, int], bytes] = {}
        self.sent: dict[tuple[int, int], bytes] = {}  # (lpid, gfn) -> what UV_PAGE_OUT handed out
        self.seen: list[tuple[str, Any]] = []
        self.answers: dict[str, Callable] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.events: dict[str, asyncio.Event] = {}
        self.server: grpc.aio.Server | None = None

    def hold(self, call: str) -> asyncio.Event:
        """Hold every ``call`` (UV_PAGE_IN, UV_PAGE_OUT, UV_SVM_TERMINATE) open until the returned
        event is set."""
        gate = self.gates[call] = asyncio.Event()
        return gate

    def reached(self, call: str) -> asyncio.Event:
        return self.events.setdefault(call, asyncio.Event())

    async def _gate(self, call: str) -> None:
        self.reached(call).set()
        gate = self.gates.get(call)
        if gate is not None:
            await gate.wait()

    async def __aenter__(self) -> "ScriptedUv":
        from pefsim.dataplane import decoder

        if self.listen is None:
            return self
        self.server, _ = await rpc.start_server(self.listen, [
            _handlers(upb.DESCRIPTOR.services_by_name["UltravisorService"], self,
                      {"UvPageInStream": (decoder(upb.PageInBatch), upb.PageBatchResult.SerializeToString),
                       "UvPageOutStream": (upb.PageOutRequest.FromString, bytes)})], tls=self.tls)
        return self

    async def __aexit__(self, *exc) -> None:
        for gate in self.gates.values():
            gate.set()
        if self.server is not None:
            await self.server.stop(grace=0.5)

    def _answer(self, call: str, req):
        self.seen.append((call, req))
        return self.answers.get(call)

    async def UV_REGISTER_MEM_SLOT(self, req, context):
        fn = self._answer("UV_REGISTER_MEM_SLOT", req)
        return fn(req) if fn else upb.UvRegisterMemSlotResponse(rc=U.U_SUCCESS)

    async def UV_UNREGISTER_MEM_SLOT(self, req, context):
        fn = self._answer("UV_UNREGISTER_MEM_SLOT", req)
        return fn(req) if fn else upb.UvUnregisterMemSlotResponse(rc=U.U_SUCCESS)

    async def UV_PAGE_IN(self, req, context):
        await self._gate("UV_PAGE_IN")
        fn = self._answer("UV_PAGE_IN", req)
        if fn:
            return fn(req)
        self.pages[(req.lpid, gfn_of(req.dest_gpa))] = req.data
        return upb.UvPageInResponse(rc=U.U_SUCCESS)

    async def UvPageInStream(self, frames, context):
        """The bulk page-in, kept like UV_PAGE_IN's pages (this UV shares no memory)."""
        async for frame in frames:
            hdr, payload, rcs = frame.header, frame.payload, []
            for n, (ra, gpa, _, order) in enumerate(pages_of(hdr.pages)):
                self.seen.append(("UV_PAGE_IN", upb.UvPageInRequest(
                    lpid=hdr.lpid, src_ra=ra, dest_gpa=gpa, order=order,
                    data=bytes(payload[n * PAGE_SIZE:(n + 1) * PAGE_SIZE]))))
                fn = self.answers.get("UV_PAGE_IN")
                if fn:
                    rcs.append(fn(self.seen[-1][1]).rc)
                else:
                    self.pages[(hdr.lpid, gfn_of(gpa))] = bytes(payload[n * PAGE_SIZE:(n + 1) * PAGE_SIZE])
                    rcs.append(U.U_SUCCESS)
            yield upb.PageBatchResult(rc=rcs)

    async def UvPageOutStream(self, req, context):
        """The bulk page-out: each page as UV_PAGE_OUT would give it back."""
        from pefsim.dataplane import encode

        size = req.batch_pages or 32
        pages = list(pages_of(req.pages))
        for first in range(0, len(pages), size):
            rcs, parts = [], []
            for ra, gpa, _, order in pages[first:first + size]:
                one = await self.UV_PAGE_OUT(upb.UvPageOutRequest(lpid=req.lpid, dest_ra=ra, src_gpa=gpa,
                                                                  order=order), context)
                rcs.append(one.rc)
                if one.rc == U.U_SUCCESS:
                    parts.append(one.data)
            yield encode(upb.PageOutBatch(first=first, rc=rcs), parts)

    async def UvShareHvMemory(self, req, context):
        self.seen.append(("UvShareHvMemory", req))
        return upb.UvShareHvMemoryResponse(rc=U.U_P2, detail="the scripted UV shares no memory")

    async def UV_PAGE_OUT(self, req, context):
        await self._gate("UV_PAGE_OUT")
        fn = self._answer("UV_PAGE_OUT", req)
        if fn:
            return fn(req)
        data = self.pages.pop((req.lpid, gfn_of(req.src_gpa)), bytes(PAGE_SIZE))
        self.sent[(req.lpid, gfn_of(req.src_gpa))] = data
        return upb.UvPageOutResponse(rc=U.U_SUCCESS, data=data)

    async def UV_PAGE_INVAL(self, req, context):
        fn = self._answer("UV_PAGE_INVAL", req)
        return fn(req) if fn else upb.UvPageInvalResponse(rc=U.U_SUCCESS)

    async def UV_SVM_TERMINATE(self, req, context):
        await self._gate("UV_SVM_TERMINATE")
        fn = self._answer("UV_SVM_TERMINATE", req)
        return fn(req) if fn else upb.UvSvmTerminateResponse(rc=U.U_SUCCESS)

    def calls(self, name: str, lpid: int | None = None) -> list:
        return [r for c, r in self.seen if c == name and (lpid is None or r.lpid == lpid)]


class ScriptedVcpu:
    """A GuestService in the test process: records every VcpuResume and accepts the first."""

    pb2 = guest_pb2

    def __init__(self, listen: str, stack=None):
        self.listen = listen
        # the VM's owner's certificate: the HV reaches a VM's vCPU only through it
        self.tls = stack.tls(IDENTITIES[Role.ROLE_GUEST]) if stack is not None else None
        self.resumes: list[guest_pb2.VcpuResumeRequest] = []
        self.resumed = asyncio.Event()  # set at each resume (the HV resumes after answering the abort)
        self.server: grpc.aio.Server | None = None

    async def __aenter__(self) -> "ScriptedVcpu":
        if self.listen is not None:
            self.server, _ = await rpc.start_server(self.listen, [
                _handlers(guest_pb2.DESCRIPTOR.services_by_name["GuestService"], self)], tls=self.tls)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.server is not None:
            await self.server.stop(grace=0.5)

    async def VcpuResume(self, req, context):
        self.resumes.append(req)
        self.resumed.set()
        return guest_pb2.VcpuResumeResponse(rc=H.H_SUCCESS)


IDENTITIES = {Role.ROLE_UV: "uv", Role.ROLE_HV: "hv", Role.ROLE_GUEST: "guest:conformance",
              Role.ROLE_OPERATOR: "operator"}


def caller(addr: str, role: int, stub_cls, stack=None, server_role: str = "") -> rpc.Peer:
    """A client making calls as ``role`` (with the stack's certificate for it, under mTLS)."""
    identity = IDENTITIES[role]
    tls = stack.tls(identity) if stack is not None else None
    return rpc.Peer(addr, role, stub_cls, identity.partition(":")[2] or identity, tls, server_role)


ROLES = {"uv": Role.ROLE_UV, "hv": Role.ROLE_HV, "guest": Role.ROLE_GUEST, "operator": Role.ROLE_OPERATOR}


def default_caller(call) -> str:
    """The role that legitimately makes ``call`` (the first of its callers, in ROLES order)."""
    for name, role in ROLES.items():
        if role in call.callers:
            return name
    raise AssertionError(call.name)


async def make_call(stub_for: Callable, call, row, ctx):
    """Make a conformance row's call as its caller; assert the result's name; return the response
    (None when the answer was a gRPC status)."""
    from pefsim.calltable import result_name

    who = row.caller or default_caller(call)
    # the UV's hcalls name the guest whose vCPU made them, as the real UV's do: here the VM's owner
    kw = {"metadata": ((rpc.ON_BEHALF_HEADER, IDENTITIES[Role.ROLE_GUEST].split(":", 1)[1]),)} if who == "uv" else {}
    try:
        pending = getattr(stub_for(who), row.call)(row.request(ctx), **kw)
        if hasattr(pending, "read"):  # server streaming: the first message carries the result
            resp = await pending.read()
            pending.cancel()
        else:
            resp = await pending
        got = result_name(call, getattr(resp, call.result))
    except grpc.aio.AioRpcError as exc:
        resp, got = None, exc.code().name
    assert got == row.expect, f"{row.call} in {row.state} ({row.case}): got {got}, want {row.expect}"
    return resp

