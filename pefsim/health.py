"""A gRPC health probe for container healthchecks (no extra binary in the image).

    python -m pefsim.health HOST:PORT [SERVICE]     # exit 0 if SERVING, 1 otherwise
"""
from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def status(target: str, service: str = "", timeout: float = 3.0) -> str:
    """The health status's name (SERVING, NOT_SERVING, ...) or the gRPC error's code name."""
    with grpc.insecure_channel(target) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def check(target: str, service: str = "", timeout: float = 3.0) -> bool:
    return status(target, service, timeout) == "SERVING"


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    result = status(args[0], args[1] if len(args) > 1 else "")
    if result != "SERVING":
        print(f"{args[0]}: {result}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
