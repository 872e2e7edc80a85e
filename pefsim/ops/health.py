"""A gRPC health probe for container healthchecks (no extra binary in the image).

    python -m pefsim.ops.health [--tls-dir DIR --as IDENTITY --server ROLE] HOST:PORT [SERVICE]
                                                    # exit 0 if SERVING, 1 otherwise
"""
from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def status(target: str, service: str = "", timeout: float = 3.0, tls=None, server_role: str = "") -> str:
    """The health status's name (SERVING, NOT_SERVING, ...) or the gRPC error's code name."""
    if tls is None:
        channel = grpc.insecure_channel(target)
    else:
        options = [("grpc.ssl_target_name_override", server_role)] if server_role else []
        channel = grpc.secure_channel(target, tls.channel_credentials(), options=options)
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def check(target: str, service: str = "", timeout: float = 3.0, tls=None, server_role: str = "") -> bool:
    return status(target, service, timeout, tls, server_role) == "SERVING"


def main(argv=None) -> int:
    import argparse
    from pathlib import Path

    from pefsim.tls import Tls

    ap = argparse.ArgumentParser(prog="pefsim.ops.health", description="gRPC health probe")
    ap.add_argument("target")
    ap.add_argument("service", nargs="?", default="")
    ap.add_argument("--tls-dir", type=Path, help="mTLS: the directory of the identity's certificate")
    ap.add_argument("--as", dest="identity", default="operator", help="identity to present (default operator)")
    ap.add_argument("--server", default="", help="role the server's certificate must name (uv, hv, guest)")
    a = ap.parse_args(argv)
    tls = Tls(a.tls_dir, a.identity) if a.tls_dir else None
    result = status(a.target, a.service, tls=tls, server_role=a.server)
    if result != "SERVING":
        print(f"{a.target}: {result}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
