"""The UV core's HV port over gRPC: the only place the UV touches a stub of the HV. Each hcall
names the guest it serves in ``pefsim-on-behalf-of`` and waits for the HV to be reachable up to
its timeout; a transport failure is HvUnreachable carrying the gRPC code."""
from __future__ import annotations

import grpc

from pefsim import rpc
from pefsim.abi import Role
from pefsim.v1 import hypervisor_pb2_grpc
from services.ultravisor.ports import HvUnreachable


class GrpcHv:
    """ports.HvPort over a channel to the HV (the UV's certificate; the HV's must name ``hv``)."""

    def __init__(self, target: str, tls):
        self.peer = rpc.Peer(target, Role.ROLE_UV, hypervisor_pb2_grpc.HypervisorServiceStub, "uv", tls, "hv")

    async def hcall(self, name: str, request, *, on_behalf: str, timeout: float):
        try:
            return await getattr(self.peer.stub, name)(request, timeout=timeout, wait_for_ready=True,
                                                       metadata=((rpc.ON_BEHALF_HEADER, on_behalf),))
        except grpc.aio.AioRpcError as exc:
            raise rpc.unreachable(HvUnreachable, name, exc) from None

    async def close(self) -> None:
        await self.peer.close()
