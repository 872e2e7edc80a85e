"""A machine reset under a secure guest, in process: the UV core (its secure memory, its SVMs)
is replaced by a new one with a new boot id. The HV learns it from the boot id of the next answer
it gets, fails every VM that depended on the UV (machine check to its vCPU, counted by reason),
and a normal VM is left alone."""
from __future__ import annotations

import asyncio

from pefsim.abi import Errno, VmState
from pefsim.v1 import hypervisor_pb2 as hpb
from tests.inprocess.conftest import create_guest, secure_guest


async def test_a_uv_reset_fails_the_secure_vms_only(stage):
    async with stage() as m:
        s = await secure_guest(m)
        normal = await create_guest(m, name="n1", npages=8)
        assert m.hv.state.vms[s.lpid].state == VmState.VM_SECURE
        await m.reset_uv()
        # the host touches a secure page: UV_PAGE_OUT goes to the new UV, whose answer names a new boot
        touched = await m.hv_call("HostReadPage", hpb.HostReadPageRequest(lpid=s.lpid, gpa=s.image.data_start),
                                  s.caller)
        assert touched.errno == Errno.EFAULT
        vcpu = m.vcpus.of(s.lpid)
        for _ in range(500):  # the reset is handled by its own task: a bounded wait for its end
            if vcpu.machine_checks:
                break
            await asyncio.sleep(0.01)
        assert vcpu.machine_checks == ["uv-reset"]
        vm = m.hv.state.vms[s.lpid]
        assert vm.failed == "uv-reset" and vm.secure_guest == 0
        assert m.hv.metrics.uv_resets._value.get() == 1
        assert m.hv.metrics.vms_failed.labels("uv-reset")._value.get() == 1
        assert not m.vcpus.of(normal.lpid).machine_checks
        assert await normal.memory() == normal.pages  # a normal VM never depended on the UV
