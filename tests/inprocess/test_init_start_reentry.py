"""H_SVM_INIT_START made again (rows "again during ESM" and "after INIT_DONE") against pefsim's
own UV, not only the scripted one: the kernel re-registers every memslot and the firmware
replaces a slot registered again (memslot_overlap skips the same id), so the hcall succeeds, and
the assignment secure_guest = INIT_START clears INIT_DONE. What follows is the kernel's own
"Error" case: the UV's pages of the replaced slot are gone."""
from __future__ import annotations

from pefsim.abi import H, Role, SecureGuest, VmState
from pefsim.calltable import Caller
from pefsim.v1 import hypervisor_pb2 as hpb
from tests.inprocess.conftest import secure_guest


async def test_init_start_again_after_init_done(stage):
    async with stage() as m:
        g = await secure_guest(m)
        assert m.hv.state.vms[g.lpid].state == VmState.VM_SECURE
        held = m.uv.state.svms[g.lpid].frames
        assert held > 0
        again = await m.hv_call("H_SVM_INIT_START", hpb.HSvmInitStartRequest(lpid=g.lpid),
                                Caller(Role.ROLE_UV, "uv", g.name))
        assert again.rc == H.H_SUCCESS  # the UV accepted slot 0 registered again
        assert m.hv.state.vms[g.lpid].secure_guest == SecureGuest.KVMPPC_SECURE_INIT_START
        assert m.uv.state.svms[g.lpid].frames == 0  # replaced: the old slot's pages freed
