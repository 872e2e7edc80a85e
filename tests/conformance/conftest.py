"""Conformance fixtures: a real UV process whose HV is scripted in the test process, and real HV
processes (merged and v10) whose UV and guest vCPU are scripted in the test process."""
from __future__ import annotations

import pytest

from pefsim.stack import LocalStack, StackConfig, free_port
from tests.conftest import assert_clean_exit


@pytest.fixture(scope="session")
def uv_side(tmp_path_factory):
    """(stack, uv address, the address the scripted HV must listen on)."""
    stack = LocalStack(StackConfig(run_dir=tmp_path_factory.mktemp("uv-conformance"), pool_pages=256))
    hv_listen = f"127.0.0.1:{free_port()}"
    uv = stack.start_service("uv", peer=hv_listen)
    yield stack, uv, hv_listen
    assert_clean_exit(stack)


@pytest.fixture(scope="session")
def hv_side(tmp_path_factory):
    """(stack, {"guest": merged HV address, "uv": v10 HV address}, scripted UV address,
    scripted vCPU address)."""
    stack = LocalStack(StackConfig(run_dir=tmp_path_factory.mktemp("hv-conformance")))
    uv_listen = f"127.0.0.1:{free_port()}"
    hvs = {"guest": stack.start_service("hv", peer=uv_listen, name="hv", abort_return="guest"),
           "uv": stack.start_service("hv", peer=uv_listen, name="hv-v10", abort_return="uv")}
    yield stack, hvs, uv_listen, f"127.0.0.1:{free_port()}"
    assert_clean_exit(stack)
