"""Where a conformance row runs: the service under test and its scripted peers, over one of two
transports with the same test code.

* ``local`` (the default, ``make check``): the UV or HV core in the test's event loop, built per
  row on a fresh state; the scripted peers plugged in as its ports; the row's calls made through
  its call table as the row's caller (LocalStub), every message through its wire encoding.
* ``grpc`` (``make test``, CI; marked ``processes``): a real service process per session, the
  scripted peers serving gRPC from the test process, the calls made over mTLS with each role's
  certificate.

Either way a test gets ``world.stub(who)`` (the service's stub as caller ``who``: uv, hv, guest,
operator), the scripted peers, and the same answers: a PEF result in the response, or a gRPC
status (an ``AioRpcError``) where the call is not the caller's at all.
"""
from __future__ import annotations

import asyncio
import contextlib
import tempfile
import urllib.request
from pathlib import Path

import grpc

from pefsim import rpc
from pefsim.blob import new_signing_key
from pefsim.calltable import Caller, Denied, NoResult
from pefsim.dataplane import decoder
from pefsim.v1 import hypervisor_pb2 as hpb, hypervisor_pb2_grpc, ultravisor_pb2 as upb, ultravisor_pb2_grpc
from services.hypervisor.core.hypervisor import HvConfig, Hypervisor
from services.local import HV_METHODS, UV_METHODS
from services.ultravisor.core.ultravisor import Ultravisor, UvConfig
from tests.conformance.peers import IDENTITIES, ROLES, ScriptedHv, ScriptedUv, ScriptedVcpu, caller


def _copy(message):
    return type(message).FromString(message.SerializeToString())


def _status(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _StreamCall:
    """A server-streaming call made in process: ``read()`` its next message, ``cancel()``."""

    def __init__(self, items):
        self.items = items

    async def read(self):
        try:
            return await self.items.__anext__()
        except (Denied, NoResult) as exc:
            raise _status(grpc.StatusCode.PERMISSION_DENIED if isinstance(exc, Denied)
                          else grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None

    def cancel(self) -> None:
        asyncio.ensure_future(self.items.aclose())


class LocalStub:
    """A service's call table as a gRPC stub would present it, for one caller identity: each
    method takes the request (and ``metadata``: the on-behalf header, believed from uv and hv as
    over gRPC) and answers what the gRPC adapter would, Denied as PERMISSION_DENIED."""

    def __init__(self, table, methods: dict, role: int):
        self.table, self.methods, self.role = table, methods, role
        identity = IDENTITIES[role]
        self.name = identity.partition(":")[2] or identity

    def _caller(self, metadata) -> Caller:
        md = dict(metadata or ())
        on_behalf = md.get(rpc.ON_BEHALF_HEADER, "") if self.role in (ROLES["uv"], ROLES["hv"]) else ""
        return Caller(self.role, self.name, on_behalf)

    def __getattr__(self, name: str):
        call = self.table.calls[name]
        _, resp_cls = self.methods[name]

        def invoke(request, timeout=None, metadata=None, **_):
            caller = self._caller(metadata)
            if name in STREAMING:
                return _StreamCall(self.table.stream(call, resp_cls, _copy(request), caller))
            return asyncio.ensure_future(self._unary(call, resp_cls, request, caller))
        return invoke

    async def _unary(self, call, resp_cls, request, caller):
        try:
            return _copy(await self.table.run(call, resp_cls, _copy(request), caller))
        except Denied as exc:
            raise _status(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None


STREAMING = {"UvPageOutStream", "VmSession"}


class LocalPeer:
    """What rpc.Peer gives (``stub``, ``close``), onto a LocalStub."""

    def __init__(self, stub: LocalStub):
        self.stub = stub

    async def close(self) -> None:
        pass


class ScriptedUvPort:
    """The HV core's UvPort onto a ScriptedUv in this process."""

    def __init__(self, uv: ScriptedUv, on_boot):
        self.uv, self.on_boot = uv, on_boot

    async def ucall(self, name, request, *, on_behalf, timeout):
        return _copy(await getattr(self.uv, name)(_copy(request), None))

    async def page_in_stream(self, frames, *, on_behalf, timeout):
        parse = decoder(upb.PageInBatch)

        async def decoded():
            async for frame in frames:
                yield parse(bytes(frame))
        async for result in self.uv.UvPageInStream(decoded(), None):
            yield _copy(result)

    async def page_out_stream(self, request, *, on_behalf, timeout):
        parse = decoder(upb.PageOutBatch)
        async for raw in self.uv.UvPageOutStream(_copy(request), None):
            yield parse(bytes(raw))

    async def status(self):
        return upb.UvStatusResponse()

    async def close(self) -> None:
        pass


class ScriptedVcpuPort:
    """The HV core's VcpuPort onto a ScriptedVcpu in this process."""

    def __init__(self, vcpu: ScriptedVcpu):
        self.vcpu = vcpu

    async def resume(self, vm, request, *, timeout):
        return _copy(await self.vcpu.VcpuResume(_copy(request), None))

    async def machine_check(self, vm, request, *, timeout):
        pass

    async def forget(self, lpid):
        pass

    async def close(self) -> None:
        pass


class ScriptedHvPort:
    """The UV core's HvPort onto a ScriptedHv in this process."""

    def __init__(self, hv: ScriptedHv):
        self.hv = hv

    async def hcall(self, name, request, *, on_behalf, timeout):
        return _copy(await getattr(self.hv, name)(_copy(request), None))

    async def close(self) -> None:
        pass


# -- the two sides -------------------------------------------------------------------------------


class HvWorld:
    """One row's HV (merged or v10), its scripted UV and vCPU, and stubs to it per role;
    ``in_flight(call)`` reads the HV's pefsim_calls_in_flight gauge for a call."""

    def __init__(self, stub_for, uv: ScriptedUv, vcpu: ScriptedVcpu, data_dir: Path, vcpu_endpoint: str,
                 in_flight):
        self.stub_for, self.uv, self.vcpu, self.data_dir, self.vcpu_endpoint = stub_for, uv, vcpu, data_dir, vcpu_endpoint
        self.in_flight = in_flight

    def stub(self, who: str):
        return self.stub_for(who)


def _scraped_in_flight(stack, service: str, call: str) -> float:
    url = f"http://{stack.metrics_targets()[service]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f'pefsim_calls_in_flight{{call="{call}"}}'):
                return float(line.split()[-1])
    return 0.0


class LocalHvSide:
    transport = "local"

    def __init__(self, root: Path):
        self.root = root

    @contextlib.asynccontextmanager
    async def world(self, abort_return: str = "guest"):
        from pefsim.abi import AbortReturn

        data_dir = Path(tempfile.mkdtemp(dir=self.root))
        hv = Hypervisor(HvConfig(data_dir=data_dir, shared_memory=False,
                                 abort_return=AbortReturn[f"ABORT_RETURN_{abort_return.upper()}"]))
        uv, vcpu = ScriptedUv(None), ScriptedVcpu(None)
        hv.attach(ScriptedUvPort(uv, hv.uv_answered), ScriptedVcpuPort(vcpu))
        hv.recover()
        stubs = {who: LocalStub(hv.table, HV_METHODS, role) for who, role in ROLES.items()}
        async def in_flight(call: str) -> float:
            return hv.metrics.calls_running.labels(call)._value.get()
        try:
            yield HvWorld(stubs.__getitem__, uv, vcpu, data_dir, "127.0.0.1:1", in_flight)
        finally:
            for gate in uv.gates.values():
                gate.set()
            hv.stopping = True
            await hv.close()


class GrpcHvSide:
    transport = "grpc"

    def __init__(self, stack, hvs: dict, uv_listen: str, vcpu_listen: str):
        self.stack, self.hvs, self.uv_listen, self.vcpu_listen = stack, hvs, uv_listen, vcpu_listen

    @contextlib.asynccontextmanager
    async def world(self, abort_return: str = "guest"):
        name = "hv-v10" if abort_return == "uv" else "hv"
        peers = {who: caller(self.hvs[abort_return], role, hypervisor_pb2_grpc.HypervisorServiceStub, self.stack, "hv")
                 for who, role in ROLES.items()}
        try:
            async with ScriptedUv(self.uv_listen, self.stack) as uv, ScriptedVcpu(self.vcpu_listen, self.stack) as vcpu:
                yield HvWorld(lambda who: peers[who].stub, uv, vcpu, self.stack.run_dir / f"{name}-data",
                              self.vcpu_listen,
                              lambda call: asyncio.to_thread(_scraped_in_flight, self.stack, name, call))
        finally:
            for p in peers.values():
                await p.close()


class UvWorld:
    def __init__(self, stub_for, hv: ScriptedHv, signing_key, hv_memory_dir: Path):
        self.stub_for, self.hv, self.signing_key, self.hv_memory_dir = stub_for, hv, signing_key, hv_memory_dir

    def stub(self, who: str):
        return self.stub_for(who)


class LocalUvSide:
    transport = "local"

    def __init__(self, root: Path):
        self.root = root
        self.key = new_signing_key()
        self.hv_memory_dir = root / "hv-memory"
        self.hv_memory_dir.mkdir(parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def world(self):
        uv = Ultravisor(UvConfig(pool_pages=256, lazy_pool=True, hv_memory_dir=str(self.hv_memory_dir)))
        uv.trusted = self.key.public_key()
        stubs = {who: LocalStub(uv.table, UV_METHODS, role) for who, role in ROLES.items()}
        hv = ScriptedHv(None, None, uv_peer=LocalPeer(stubs["hv"]))
        uv.attach(ScriptedHvPort(hv))
        try:
            yield UvWorld(stubs.__getitem__, hv, lambda: self.key, self.hv_memory_dir)
        finally:
            for gate in hv.gates.values():
                gate.set()
            await uv.close()


class GrpcUvSide:
    transport = "grpc"

    def __init__(self, stack, uv_addr: str, hv_listen: str):
        self.stack, self.uv_addr, self.hv_listen = stack, uv_addr, hv_listen

    @contextlib.asynccontextmanager
    async def world(self):
        peers = {who: caller(self.uv_addr, role, ultravisor_pb2_grpc.UltravisorServiceStub, self.stack, "uv")
                 for who, role in ROLES.items()}
        try:
            async with ScriptedHv(self.hv_listen, self.uv_addr, self.stack) as hv:
                yield UvWorld(lambda who: peers[who].stub, hv, self.stack.signing_key, self.stack.hv_memory_dir)
        finally:
            for p in peers.values():
                await p.close()


__all__ = ["GrpcHvSide", "GrpcUvSide", "HvWorld", "LocalHvSide", "LocalUvSide", "UvWorld", "hpb"]
