"""The HV core's ports over gRPC: the only place the HV touches a stub of the UV or a guest.

GrpcUv: ucalls with the VM owner's name in ``pefsim-on-behalf-of``, waiting for the UV to be
reachable up to the call's timeout; the bulk page streams; every answer's boot id (trailing
metadata) handed to on_boot. A transport failure is UvUnreachable carrying the gRPC code.
GrpcVcpus: one channel per VM to its vCPU's endpoint, reached only through the certificate of
the guest that owns the VM.
"""
from __future__ import annotations

import logging

import grpc

from pefsim import rpc, tracing, tls as tlsmod
from pefsim.abi import Role
from pefsim.dataplane import decoder
from pefsim.v1 import guest_pb2_grpc, ultravisor_pb2 as upb, ultravisor_pb2_grpc
from services.hypervisor.ports import OnBoot, UvUnreachable, VcpuUnreachable

log = logging.getLogger("pefsim.hv.grpc")
SERVICE = "/pefsim.v1.UltravisorService"


def _on_behalf(owner: str) -> tuple[tuple[str, str], ...]:
    """The guest a ucall serves, and the trace it is part of (a stream carries its traceparent
    here: an mTLS channel has no stream interceptor, which would cost every message)."""
    return tracing.outgoing_metadata(((rpc.ON_BEHALF_HEADER, owner),))


async def _boot_id(call) -> str:
    return dict(await call.trailing_metadata() or ()).get(rpc.BOOT_ID_TRAILER, "")


class GrpcUv:
    """ports.UvPort over a channel to the UV (the HV's certificate; the UV's must name ``uv``)."""

    def __init__(self, target: str, tls, on_boot: OnBoot):
        self.peer = rpc.Peer(target, Role.ROLE_HV, ultravisor_pb2_grpc.UltravisorServiceStub, "hv", tls, "uv",
                             options=rpc.WIDE_RECEIVE_OPTIONS)
        self.on_boot = on_boot

    async def ucall(self, name: str, request, *, on_behalf: str, timeout: float):
        try:
            pending = getattr(self.peer.stub, name)(request, timeout=timeout, wait_for_ready=True,
                                                    metadata=_on_behalf(on_behalf))
            resp = await pending
            boot_id = await _boot_id(pending)
        except grpc.aio.AioRpcError as exc:
            raise rpc.unreachable(UvUnreachable, name, exc) from None
        self.on_boot(boot_id)
        return resp

    async def page_in_stream(self, frames, *, on_behalf: str, timeout: float):
        call = self.peer.channel.stream_stream(f"{SERVICE}/UvPageInStream", request_serializer=bytes,
                                               response_deserializer=upb.PageBatchResult.FromString)
        async for result in self._relay("UvPageInStream", call(frames, timeout=timeout, wait_for_ready=True,
                                                               metadata=_on_behalf(on_behalf))):
            yield result

    async def page_out_stream(self, request, *, on_behalf: str, timeout: float):
        call = self.peer.channel.unary_stream(f"{SERVICE}/UvPageOutStream",
                                              request_serializer=upb.PageOutRequest.SerializeToString,
                                              response_deserializer=decoder(upb.PageOutBatch))
        async for frame in self._relay("UvPageOutStream", call(request, timeout=timeout, wait_for_ready=True,
                                                               metadata=_on_behalf(on_behalf))):
            yield frame

    async def _relay(self, name: str, stream):
        """A stream's messages, then its boot id to on_boot; a transport failure UvUnreachable."""
        try:
            async for message in stream:
                yield message
            boot_id = await _boot_id(stream)
        except grpc.aio.AioRpcError as exc:
            log.error("%s: UV unreachable (%s)", name, exc.code().name)
            raise rpc.unreachable(UvUnreachable, name, exc) from None
        finally:
            stream.cancel()  # a no-op once it ended; else the consumer stopped early
        self.on_boot(boot_id)

    async def status(self):
        try:
            return await self.peer.stub.UvStatus(upb.UvStatusRequest(), timeout=2)
        except grpc.aio.AioRpcError as exc:
            raise rpc.unreachable(UvUnreachable, "UvStatus", exc) from None

    async def close(self) -> None:
        await self.peer.close()


class GrpcVcpus:
    """ports.VcpuPort: a channel per VM to its vCPU, reached only through the certificate of the
    guest that owns the VM (tls.server_name): an endpoint naming another guest's service fails
    the handshake, so a resume or machine check never lands on a vCPU that is not the VM's. An
    operator's VM takes any guest certificate (the operator named the endpoint)."""

    def __init__(self, tls):
        self.tls = tls
        self.peers: dict[int, rpc.Peer] = {}

    def _peer(self, vm) -> rpc.Peer:
        peer = self.peers.get(vm.lpid)
        if peer is None:
            server = tlsmod.server_name(f"guest:{vm.owner}") if vm.owner else "guest"
            peer = self.peers[vm.lpid] = rpc.Peer(vm.vcpu_endpoint, Role.ROLE_HV, guest_pb2_grpc.GuestServiceStub,
                                                  "hv", self.tls, server)
        return peer

    async def resume(self, vm, request, *, timeout: float):
        try:
            return await self._peer(vm).stub.VcpuResume(request, timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise rpc.unreachable(VcpuUnreachable, "VcpuResume", exc) from None

    async def machine_check(self, vm, request, *, timeout: float) -> None:
        try:
            await self._peer(vm).stub.MachineCheck(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc.unreachable(VcpuUnreachable, "MachineCheck", exc) from None

    async def forget(self, lpid: int) -> None:
        peer = self.peers.pop(lpid, None)
        if peer is not None:
            await peer.close()

    async def close(self) -> None:
        for lpid in list(self.peers):
            await self.forget(lpid)
