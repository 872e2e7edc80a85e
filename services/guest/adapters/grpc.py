"""The guest core's ports over gRPC: the only place the guest touches a stub of the HV or UV
(with its guest:<name> certificate under mTLS)."""
from __future__ import annotations

import grpc

from pefsim import rpc
from pefsim.abi import Role
from pefsim.v1 import hypervisor_pb2_grpc, ultravisor_pb2_grpc
from services.guest.ports import Unreachable


class GrpcCalls:
    """ports.Calls onto one service (``hv`` or ``uv``) as the guest ``identity``."""

    STUBS = {"hv": hypervisor_pb2_grpc.HypervisorServiceStub, "uv": ultravisor_pb2_grpc.UltravisorServiceStub}

    def __init__(self, service: str, target: str, identity: str, tls):
        self.peer = rpc.Peer(target, Role.ROLE_GUEST, self.STUBS[service], identity, tls, service)

    async def call(self, name: str, request, *, timeout: float | None = None, wait: bool = False):
        try:
            return await getattr(self.peer.stub, name)(request, timeout=timeout, wait_for_ready=wait)
        except grpc.aio.AioRpcError as exc:
            raise rpc.unreachable(Unreachable, name, exc) from None

    async def stream(self, name: str, request):
        try:
            async for item in getattr(self.peer.stub, name)(request):
                yield item
        except grpc.aio.AioRpcError as exc:
            raise rpc.unreachable(Unreachable, name, exc) from None

    async def close(self) -> None:
        await self.peer.close()
