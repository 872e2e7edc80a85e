"""Conformance fixtures: each side (the UV under test, the HV under test) over both transports
(tests/conformance/world.py): ``local``, the core in this process with its peers scripted as its
ports (``make check``); ``grpc``, real service processes with the scripted peers serving gRPC from
the test process (marked ``processes``: ``make test`` and CI run both)."""
from __future__ import annotations

import pytest

from pefsim.ops.stack import LocalStack, StackConfig, free_port
from tests.conftest import assert_clean_exit
from tests.conformance.world import GrpcHvSide, GrpcUvSide, LocalHvSide, LocalUvSide

TRANSPORTS = ["local", pytest.param("grpc", marks=pytest.mark.processes)]


@pytest.fixture(scope="session", params=TRANSPORTS)
def uv_side(request, tmp_path_factory):
    """The UV under test: ``async with uv_side.world() as w`` gives a row its UV (w.stub(who))
    and the scripted HV (w.hv)."""
    if request.param == "local":
        yield LocalUvSide(tmp_path_factory.mktemp("uv-local"))
        return
    stack = LocalStack(StackConfig(run_dir=tmp_path_factory.mktemp("uv-conformance"), pool_pages=256))
    hv_listen = f"127.0.0.1:{free_port()}"
    uv = stack.start_service("uv", peer=hv_listen)
    yield GrpcUvSide(stack, uv, hv_listen)
    assert_clean_exit(stack)


@pytest.fixture(scope="session", params=TRANSPORTS)
def hv_side(request, tmp_path_factory):
    """The HV under test: ``async with hv_side.world(abort_return) as w`` gives a row a merged
    ("guest") or v10 ("uv") HV (w.stub(who)), the scripted UV (w.uv) and vCPU (w.vcpu)."""
    if request.param == "local":
        yield LocalHvSide(tmp_path_factory.mktemp("hv-local"))
        return
    stack = LocalStack(StackConfig(run_dir=tmp_path_factory.mktemp("hv-conformance")))
    uv_listen = f"127.0.0.1:{free_port()}"
    hvs = {"guest": stack.start_service("hv", peer=uv_listen, name="hv", abort_return="guest"),
           "uv": stack.start_service("hv", peer=uv_listen, name="hv-v10", abort_return="uv")}
    yield GrpcHvSide(stack, hvs, uv_listen, f"127.0.0.1:{free_port()}")
    assert_clean_exit(stack)
