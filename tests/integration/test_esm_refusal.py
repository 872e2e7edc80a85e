"""A UV_ESM the UV's checks refuse (U_P2 for kbase 0, U_P3 for fdt 0, U_RETRY for an lpid that
already has an SVM, ...) is the vCPU's return from `sc 2`: R3 carries the result at once, the vCPU
resumes after its `sc 2` (resumed = true). It used to come back with resumed = false, which by the
proto means "the HV will resume the vCPU": nobody ever did, and the guest waited for its timeout."""
from __future__ import annotations

from pefsim.abi import U
from pefsim.v1 import common_pb2, ultravisor_pb2 as upb
from tests.conftest import unique
from tests.security.test_hostile import UV_STUB, as_


def test_a_refused_uv_esm_returns_to_the_caller_at_once(stack, run):
    async def scenario():
        uv = as_(stack, f"guest:{unique('refused')}", stack.uv_addr, UV_STUB, "uv")
        try:
            vcpu = common_pb2.VcpuContext(lpid=777_777, nip=0x11004)
            for kbase, fdt, rc in ((0, 0x20000, U.U_P2), (0x10000, 0, U.U_P3)):
                resp = await uv.stub.UV_ESM(upb.UvEsmRequest(vcpu=vcpu, kbase=kbase, fdt=fdt), timeout=10)
                assert (resp.rc, resp.resumed, resp.msr_s, resp.nip) == (rc, True, False, 0x11004)
        finally:
            await uv.close()
    run(scenario())
