"""Every HV row of the conformance table (tests/conformance/rows.py), run against the HV core in
process and against real HV processes (tests/conformance/world.py).

The test is the UV: it makes the hcalls as role "uv" and serves the UV's side (every ucall the HV
makes) and the guest's vCPU (VcpuResume) from this process. A fresh VM is made per row and put
in the row's state (INIT_START for VM_TRANSIENT, INIT_DONE for VM_SECURE; VM_ABORTING is never
seen by a call: calltable.UNREACHABLE).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from pefsim.abi import PAGE_SIZE, AbortReturn, GfnState, H, PageInFlag, U, gpa_of
from tests.conformance.rows import HV_ROWS, Row
from pefsim.dataplane import MAX_DATA_PAGES
from pefsim.v1 import common_pb2, hypervisor_pb2 as hpb, ultravisor_pb2 as upb
from services.hypervisor.calltable import CALLS
from tests.conformance.peers import ScriptedUv, ScriptedVcpu, make_call

NPAGES = 16
CALL = {c.name: c for c in CALLS}
def content(gfn: int) -> bytes:
    return bytes([gfn + 1]) * PAGE_SIZE


@dataclass
class HvCtx:
    lpid: int
    data_dir: object
    uv: ScriptedUv
    vcpu: ScriptedVcpu
    npages: int = NPAGES
    cipher: bytes = b""
    info: hpb.VmInfo | None = None
    states: bytes = b""
    ram: bytes = b""
    extra: dict = field(default_factory=dict)

    def gpa(self, gfn: int) -> int:
        return gpa_of(gfn)

    content = staticmethod(content)

    # observations (after observe())
    def vm_state(self) -> str:
        return self.info.state if self.info else "VM_ABSENT"

    def secure_guest(self) -> int:
        return self.info.secure_guest

    def gfn_count(self, state: str) -> int:
        return self.info.gfns_by_state[state]

    def gfn_state(self, gfn: int) -> str:
        return GfnState(self.states[gfn]).name

    def hv_page(self, gfn: int) -> bytes:
        return self.ram[gfn * PAGE_SIZE:(gfn + 1) * PAGE_SIZE]

    def hv_page_zero(self, gfn: int) -> bool:
        return self.hv_page(gfn) == bytes(PAGE_SIZE)

    # what the scripted UV saw
    def uv_got(self, gfn: int) -> bytes:
        return [r.data for r in self.uv.calls("UV_PAGE_IN", self.lpid) if r.dest_gpa == gpa_of(gfn)][-1]

    def uv_sent(self, gfn: int) -> bytes:
        return self.uv.sent[(self.lpid, gfn)]

    def terminated(self) -> bool:
        return bool(self.uv.calls("UV_SVM_TERMINATE", self.lpid))

    def registered(self) -> int:
        return len(self.uv.calls("UV_REGISTER_MEM_SLOT", self.lpid))

    def unregistered(self) -> int:
        return len(self.uv.calls("UV_UNREGISTER_MEM_SLOT", self.lpid))

    def invalidated(self) -> int:
        return len(self.uv.calls("UV_PAGE_INVAL", self.lpid))

    def page_outs(self) -> list:
        return self.uv.calls("UV_PAGE_OUT", self.lpid)

    def resumes(self) -> list:
        return [r for r in self.vcpu.resumes if r.lpid == self.lpid]

    def resumed_once(self, nip: int, r3: int = H.H_PARAMETER) -> bool:
        got = self.resumes()
        return len(got) == 1 and got[0].r3 == r3 and got[0].nip == nip and not got[0].msr_s


async def run_row(side, row: Row) -> None:
    v10 = "v10" in row.setup
    setups = set(filter(None, row.setup.split(",")))
    async with side.world("uv" if v10 else "guest") as w:
        stub, uv, vcpu, vcpu_listen = w.stub, w.uv, w.vcpu, w.vcpu_endpoint
        lpid = 99999
        try:
            if row.state != "VM_ABSENT":
                # the guest's VMM makes its VM (an operator's VM would be operators' only)
                made = await stub("guest").CreateVm(hpb.CreateVmRequest(
                    name=f"conf-{row.call}", vcpu_endpoint=vcpu_listen,
                    secure_capable="not-capable" not in setups,
                    memslots=[common_pb2.Memslot(slot_id=0, base_gfn=0, npages=NPAGES)]))
                lpid = made.lpid
                for first in range(0, NPAGES, MAX_DATA_PAGES):
                    stored = await stub("guest").VcpuStore(hpb.VcpuStoreRequest(
                        lpid=lpid, gpa=gpa_of(first),
                        data=b"".join(content(g) for g in range(first, first + MAX_DATA_PAGES))))
                    assert stored.errno == 0
            c = HvCtx(lpid=lpid, data_dir=w.data_dir, uv=uv, vcpu=vcpu)
            if row.state in ("VM_TRANSIENT", "VM_SECURE"):
                assert (await stub("uv").H_SVM_INIT_START(hpb.HSvmInitStartRequest(lpid=lpid))).rc == H.H_SUCCESS
                if "paged-in" in setups or "paged-out" in setups:
                    assert (await stub("uv").H_SVM_PAGE_IN(hpb.HSvmPageInRequest(
                        lpid=lpid, guest_pa=gpa_of(2), order=16))).rc == H.H_SUCCESS
            if row.state == "VM_SECURE":
                assert (await stub("uv").H_SVM_INIT_DONE(hpb.HSvmInitDoneRequest(lpid=lpid))).rc == H.H_SUCCESS
                if "paged-out" in setups:
                    assert (await stub("uv").H_SVM_PAGE_OUT(hpb.HSvmPageOutRequest(
                        lpid=lpid, guest_pa=gpa_of(2), order=16))).rc == H.H_SUCCESS
                    c.cipher = uv.sent[(lpid, 2)]
                if "shared" in setups:
                    assert (await stub("uv").H_SVM_PAGE_IN(hpb.HSvmPageInRequest(
                        lpid=lpid, guest_pa=gpa_of(2), flags=PageInFlag.H_PAGE_IN_SHARED, order=16))).rc == H.H_SUCCESS
            if "running" in setups:
                assert (await stub("operator").RunVm(hpb.RunVmRequest(lpid=lpid))).errno == 0
            if "uv-refuses" in setups:
                uv.answers["UV_PAGE_IN"] = lambda r: upb.UvPageInResponse(rc=U.U_P3)
                uv.answers["UV_PAGE_OUT"] = lambda r: upb.UvPageOutResponse(rc=U.U_P3)
            if "uv-refuses-slot" in setups:
                uv.answers["UV_REGISTER_MEM_SLOT"] = lambda r: upb.UvRegisterMemSlotResponse(rc=U.U_PARAMETER)
            if "uv-refuses-terminate" in setups:
                uv.answers["UV_SVM_TERMINATE"] = lambda r: upb.UvSvmTerminateResponse(rc=U.U_PARAMETER)
            uv.seen.clear()
            vcpu.resumes.clear()
            vcpu.resumed.clear()

            resp = await make_call(stub, CALL[row.call], row, c)
            if row.call == "H_SVM_INIT_ABORT" and resp is not None and resp.returned_to == AbortReturn.ABORT_RETURN_GUEST:
                # the HV answers once the SVM is terminated and resumes the vCPU after: wait for it
                await asyncio.wait_for(vcpu.resumed.wait(), 10)
            if row.then:
                words, test = row.then
                status = await stub("operator").HvStatus(hpb.HvStatusRequest())
                c.info = next((v for v in status.vms if v.lpid == lpid), None)
                vm_dir = c.data_dir / f"vm-{lpid}"
                if (vm_dir / "slot-0.gfn").exists():
                    c.states = (vm_dir / "slot-0.gfn").read_bytes()
                    c.ram = (vm_dir / "slot-0.ram").read_bytes()
                assert test(c, resp), f"{row.call} in {row.state} ({row.case}): not true that {words}"
        finally:
            uv.answers.clear()
            if lpid != 99999:
                await stub("operator").DestroyVm(hpb.DestroyVmRequest(lpid=lpid))


def row_id(row: Row) -> str:
    return f"{row.call}-{row.state.removeprefix('VM_')}-{row.case}".replace(" ", "_")


@pytest.mark.parametrize("row", HV_ROWS, ids=row_id)
def test_hv_row(hv_side, row):
    asyncio.run(run_row(hv_side, row))
