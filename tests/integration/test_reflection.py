"""gRPC server reflection on every service (grpcurl lists and describes them with the certificates
`pefsim up` prints): real processes, mTLS, the standard reflection protocol."""
from __future__ import annotations

from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pefsim import rpc
from pefsim.abi import Role
from tests.conftest import unique


async def _reflect(addr: str, tls, server_role: str) -> tuple[set[str], bytes]:
    peer = rpc.Peer(addr, Role.ROLE_OPERATOR, reflection_pb2_grpc.ServerReflectionStub, "operator", tls, server_role)
    try:
        asks = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="pefsim.v1.HSvmInitAbortRequest")]
        answers = [a async for a in peer.stub.ServerReflectionInfo(iter(asks))]
    finally:
        await peer.close()
    names = {s.name for s in answers[0].list_services_response.service}
    return names, b"".join(answers[1].file_descriptor_response.file_descriptor_proto)


def test_every_service_lists_itself_health_and_reflection(stack, run):
    name = unique("refl")
    guest = stack.add_guest(name, 1 << 20, None, svm=False)
    tls = stack.tls("operator")
    for addr, role, service in ((stack.uv_addr, "uv", "pefsim.v1.UltravisorService"),
                                (stack.hv_addr, "hv", "pefsim.v1.HypervisorService"),
                                (guest, "guest", "pefsim.v1.GuestService")):
        names, files = run(_reflect(addr, tls, role))
        assert names == {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}, names
        assert b"HSvmInitAbortRequest" in files, role
