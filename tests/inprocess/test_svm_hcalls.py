"""A secure guest's own H_SVM_* hcalls, through the UV that reflects them (core/reflect.py), against
the real HV core: what an SVM can do to itself with H_SVM_PAGE_OUT, H_SVM_INIT_DONE and
H_SVM_INIT_ABORT under the open Ultravisor's behaviour (reflect them all) and under the filter the
kernel's MSR[S] check assumes (the UV answers H_FUNCTION)."""
from __future__ import annotations

import asyncio

import pytest

from pefsim.abi import PAGE_SHIFT, PAGE_SIZE, GfnState, H, Hcall, Role, SvmState, VmState
from pefsim.blob import make_blob
from pefsim.calltable import Caller
from pefsim.image import GuestImage
from pefsim.v1 import ultravisor_pb2 as upb

MEM = 32 * PAGE_SIZE


@pytest.mark.parametrize("policy", ["firmware", "filter"])
async def test_what_an_svm_can_do_to_itself_with_its_h_svm_calls(stage, policy):
    async with stage() as m:
        m.uv.cfg.svm_hcalls = policy
        g = m.add_guest("svm", MEM, make_blob(GuestImage.of_size("svm", MEM), m.signing_key))
        assert (await asyncio.wait_for(g.boot(), 30)).outcome == "secure"
        me, gpa = Caller(Role.ROLE_GUEST, "svm"), g.image.data_start

        async def hcall(opcode: int, *args: int):
            return await m.uv_call("SvmHcall", upb.SvmHcallRequest(vcpu=g.vcpu_context(), opcode=opcode,
                                                                   args=list(args)), me)
        got = [await hcall(Hcall.H_SVM_PAGE_OUT, gpa, 0, PAGE_SHIFT), await hcall(Hcall.H_SVM_INIT_DONE),
               await hcall(Hcall.H_SVM_INIT_ABORT)]
        vm = m.hv.state.vms[g.lpid]
        slot, idx = vm.locate(gpa)
        if policy == "firmware":  # every one reaches the HV, which answers as for the UV
            assert [(r.rc, r.reflected) for r in got] == [(H.H_SUCCESS, True), (H.H_SUCCESS, True),
                                                          (H.H_STATE, True)]
            assert slot.state(idx) == GfnState.GFN_SECURE_OUT  # its own page, out to the HV encrypted
            assert bytes(slot.page(idx)) != g.expected(gpa >> PAGE_SHIFT)
        else:  # the UV keeps them from the HV
            assert [(r.rc, r.reflected) for r in got] == [(H.H_FUNCTION, False)] * 3
            assert slot.state(idx) == GfnState.GFN_SECURE_IN
        # either way the SVM hurt nobody, itself included: still secure, its memory intact (a
        # paged-out page faults back in, decrypted)
        assert vm.state == VmState.VM_SECURE and m.uv.state.svms[g.lpid].state == SvmState.SVM_SECURE
        assert (await g.verify()).memory_intact
