"""Every UV row of the conformance table (tests/conformance/rows.py), run against the UV core in
process and against a real UV process (tests/conformance/world.py).

For each row a fresh SVM is put in the row's state by a scripted HV in this process (mid-ESM
with INIT_START held open for SVM_ACTIVE, a full ESM for SVM_SECURE, H_SVM_INIT_ABORT held open
for SVM_ABORT), the call is made as the row's caller (in process, or over gRPC), and the result compared by name.
"""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pefsim.abi import PAGE_SHIFT, PAGE_SIZE, HV_RA_BASE, H, U, gpa_of
from pefsim.blob import make_blob
from tests.conformance.rows import UV_ROWS, Row
from pefsim.image import GuestImage
from pefsim.v1 import common_pb2, hypervisor_pb2 as hpb, ultravisor_pb2 as upb
from services.ultravisor.calltable import CALLS
from tests.conformance.peers import Guest, make_call

NPAGES = 16
CALL = {c.name: c for c in CALLS}
_lpids = itertools.count(100)


@dataclass
class UvCtx:
    lpid: int
    npages: int = NPAGES
    secure_gfn: int = 10
    pagedout_gfn: int = 11
    shared_gfn: int = 12
    unbacked_gfn: int = 13
    plain: bytes = b""
    pagedout_plain: bytes = b""
    cipher: bytes = b""
    frames: int = 0
    # observed after the call
    status: upb.SvmInfo | None = None
    terminated: bool = False
    loads: dict[int, bytes] = field(default_factory=dict)
    page_in_again_ok: bool = False

    def gpa(self, gfn: int) -> int:
        return gpa_of(gfn)

    def gone(self) -> bool:
        return self.status is None and self.terminated

    def reads_zero(self, gfn: int) -> bool:
        return self.loads.get(gfn) == bytes(PAGE_SIZE)

    def shared_count(self) -> int:
        return self.status.shared_pages if self.status else -1

    shared_page_in_ok: bool = False
    files: list = field(default_factory=list)

    def share_request(self, how: str = "good", slot_id: int = 0) -> upb.UvShareHvMemoryRequest:
        """An offer of a real file standing in for the HV's RAM (this test's ``ram`` bytes), in
        the UV's --hv-memory-dir where the HV keeps it (vm-<lpid>/slot-<id>.ram) or, as ``how``
        says, not quite: "bad nonce", "outside" the directory, a "symlink" there to a file
        outside, the "wrong size", "other lpid"'s file, a path with "dotdot"."""
        import os
        import tempfile

        def write(path, data):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            self.files.append(path)
            return path
        vm_dir = self.hv_dir / f"vm-{self.lpid + 1000 if how == 'other lpid' else self.lpid}"
        size = len(self.ram) - PAGE_SIZE if how == "wrong size" else len(self.ram)
        write(vm_dir / f"slot-{slot_id}.nonce", b"x" * 16 if how == "bad nonce" else b"n" * 16)
        ram = vm_dir / f"slot-{slot_id}.ram"
        if how in ("outside", "symlink"):
            outside = write(Path(tempfile.mkdtemp()) / ram.name, self.ram)
            if how == "symlink":
                ram.unlink(missing_ok=True)
                ram.symlink_to(outside)
                self.files.append(ram)
            else:
                ram = outside
        else:
            write(ram, self.ram[:size])
        self.ram_path = ram
        path = os.fspath(ram)
        if how == "dotdot":
            path = os.path.join(self.hv_dir, vm_dir.name, "..", vm_dir.name, ram.name)
        return upb.UvShareHvMemoryRequest(lpid=self.lpid, slot_id=slot_id, path=path, ra_base=HV_RA_BASE,
                                          size=len(self.ram), nonce_path=os.fspath(vm_dir / f"slot-{slot_id}.nonce"),
                                          nonce=b"n" * 16)

    ram: bytes = b""
    hv_dir: Path | None = None  # the UV's --hv-memory-dir


def esm_request(c: UvCtx, image: GuestImage) -> upb.UvEsmRequest:
    return upb.UvEsmRequest(vcpu=common_pb2.VcpuContext(lpid=c.lpid, nip=image.kbase + 0x1004),
                            kbase=image.kbase, fdt=image.fdt)


class Side:
    """The UV under test (a world of tests/conformance/world.py) and its callers, for one row."""

    def __init__(self, world):
        self.world, self.hv = world, world.hv
        self.teardown: list = []

    def stub(self, who: str):
        return self.world.stub(who)

    async def close(self) -> None:
        for step in reversed(self.teardown):
            await step()

    async def setup(self, row: Row) -> UvCtx:
        c = UvCtx(lpid=next(_lpids), hv_dir=self.world.hv_memory_dir)
        if row.state == "SVM_ABSENT":
            return c
        image = GuestImage.of_size(f"conf{c.lpid}", NPAGES * PAGE_SIZE)
        bad = row.state == "SVM_ABORT"
        blob = make_blob(image, self.world.signing_key(),
                         override={"kernel": "0" * 128} if bad else None)
        self.hv.guests[c.lpid] = Guest(image, blob)
        c.plain = image.page(c.secure_gfn)
        c.pagedout_plain = image.page(c.pagedout_gfn)
        c.ram = bytes(NPAGES * PAGE_SIZE)
        self.teardown.append(lambda: self.stub("hv").UV_SVM_TERMINATE(upb.UvSvmTerminateRequest(lpid=c.lpid)))
        if row.state == "SVM_ACTIVE":
            registered, release = asyncio.Event(), asyncio.Event()

            async def init_start(req):
                rc = (await self.hv.uv.stub.UV_REGISTER_MEM_SLOT(upb.UvRegisterMemSlotRequest(
                    lpid=req.lpid, start_gpa=0, size=image.mem_bytes, flags=0, slotid=0))).rc
                assert rc == U.U_SUCCESS
                registered.set()
                await release.wait()
                return hpb.HSvmInitStartResponse(rc=H.H_PARAMETER)

            self.hv.answer("H_SVM_INIT_START", c.lpid, init_start)
            esm = asyncio.ensure_future(self.stub("guest").UV_ESM(esm_request(c, image)))
            await asyncio.wait_for(registered.wait(), 10)

            async def finish():
                release.set()
                await asyncio.wait_for(esm, 10)
            self.teardown.append(finish)
        elif row.state == "SVM_SECURE":
            resp = await self.stub("guest").UV_ESM(esm_request(c, image))
            assert (resp.rc, resp.msr_s) == (U.U_SUCCESS, True), resp
            out = await self.hv.page_out(c.lpid, c.pagedout_gfn)
            assert out.rc == U.U_SUCCESS
            c.cipher = out.data
            share = await self.stub("guest").UV_SHARE_PAGE(upb.UvSharePageRequest(
                vcpu=common_pb2.VcpuContext(lpid=c.lpid, msr_s=True), gfn=c.shared_gfn, npages=1))
            assert share.rc == U.U_SUCCESS
            if row.setup == "invalidated":
                inval = await self.stub("hv").UV_PAGE_INVAL(upb.UvPageInvalRequest(
                    lpid=c.lpid, guest_pa=gpa_of(c.shared_gfn), order=PAGE_SHIFT))
                assert inval.rc == U.U_SUCCESS
            c.frames = (await self.svm_info(c.lpid)).secure_pages
        elif row.state == "SVM_ABORT":
            gate = self.hv.hold("H_SVM_INIT_ABORT", c.lpid)
            esm = asyncio.ensure_future(self.stub("guest").UV_ESM(esm_request(c, image)))
            await asyncio.wait_for(self.hv.reached("H_SVM_INIT_ABORT", c.lpid).wait(), 10)
            if row.setup == "paged-out-once":
                first = await self.stub("hv").UV_PAGE_OUT(upb.UvPageOutRequest(
                    lpid=c.lpid, dest_ra=HV_RA_BASE, src_gpa=gpa_of(c.secure_gfn), order=PAGE_SHIFT))
                assert first.rc == U.U_SUCCESS and first.data == c.plain

            async def finish():
                gate.set()
                await asyncio.wait_for(esm, 10)
            self.teardown.append(finish)
        return c

    async def svm_info(self, lpid: int):
        status = await self.stub("operator").UvStatus(upb.UvStatusRequest())
        return next((s for s in status.svms if s.lpid == lpid), None)

    async def observe(self, c: UvCtx) -> None:
        status = await self.stub("operator").UvStatus(upb.UvStatusRequest())
        c.status = next((s for s in status.svms if s.lpid == c.lpid), None)
        c.terminated = c.lpid in status.terminated_lpids
        if c.status is not None and c.status.state == "SVM_SECURE":
            for gfn in (c.secure_gfn, c.shared_gfn, c.pagedout_gfn):
                load = await self.stub("guest").SvmLoad(upb.SvmLoadRequest(
                    vcpu=common_pb2.VcpuContext(lpid=c.lpid, msr_s=True), gpa=gpa_of(gfn), npages=1))
                if load.rc == U.U_SUCCESS:
                    c.loads[gfn] = load.data


async def run_row(uv_side, row: Row) -> None:
    async with uv_side.world() as w:
        side = Side(w)
        try:
            c = await side.setup(row)
            resp = await make_call(side.stub, CALL[row.call], row, c)
            if row.then:
                words, test = row.then
                if "shared_page_in_ok" in test.__code__.co_names:
                    # a paged-out page's ciphertext, written at its real address in the shared file
                    with open(c.ram_path, "r+b") as fh:
                        fh.seek(c.pagedout_gfn * PAGE_SIZE)
                        fh.write(c.cipher)
                    again = await side.stub("hv").UV_PAGE_IN(upb.UvPageInRequest(
                        lpid=c.lpid, src_ra=HV_RA_BASE + gpa_of(c.pagedout_gfn), dest_gpa=gpa_of(c.pagedout_gfn),
                        order=PAGE_SHIFT))
                    c.shared_page_in_ok = again.rc == U.U_SUCCESS
                if "page_in_again_ok" in test.__code__.co_names:
                    again = await side.stub("hv").UV_PAGE_IN(upb.UvPageInRequest(
                        lpid=c.lpid, src_ra=HV_RA_BASE, dest_gpa=gpa_of(c.pagedout_gfn), order=PAGE_SHIFT,
                        data=c.cipher))
                    c.page_in_again_ok = again.rc == U.U_SUCCESS
                await side.observe(c)
                assert test(c, resp), f"{row.call} in {row.state} ({row.case}): not true that {words}"
        finally:
            await side.close()
            import os

            for path in c.files if "c" in dir() else []:
                os.unlink(path)


def row_id(row: Row) -> str:
    return f"{row.call}-{row.state.removeprefix('SVM_')}-{row.case}".replace(" ", "_")


@pytest.mark.parametrize("row", UV_ROWS, ids=row_id)
def test_uv_row(uv_side, row):
    asyncio.run(run_row(uv_side, row))


@pytest.mark.parametrize("lies", ["every page", "a kernel page", "a data page"])
def test_a_page_in_without_its_uv_page_in_reads_as_zeros(uv_side, lies):
    """H_SVM_PAGE_IN answered H_SUCCESS without the UV_PAGE_IN: legal for a GFN the HV never
    backed (kvmppc_svm_page_in: ``if (spage)``), so the UV takes the page as zeros. What an HV that
    lies this way can do, and no more: a page the guest wrote reads as zeros. In a measured region
    (the kernel here; or everything, FDT included) the ESM then aborts with H_SVM_INIT_ABORT and
    UV_ESM is answered; an unmeasured data page just reads as zeros in the secure guest."""
    async def scenario():
        async with uv_side.world() as w:
            side, hv = Side(w), w.hv
            c = UvCtx(lpid=next(_lpids))
            image = GuestImage.of_size(f"liar{c.lpid}", NPAGES * PAGE_SIZE)
            hv.guests[c.lpid] = Guest(image, make_blob(image, w.signing_key()))
            lied = {"every page": None, "a kernel page": 1, "a data page": NPAGES - 1}[lies]
            assert lies != "a data page" or lied >= image.data_start // PAGE_SIZE
            honest = type(hv).H_SVM_PAGE_IN

            async def page_in(req):
                if lied is None or req.guest_pa == gpa_of(lied):
                    return hpb.HSvmPageInResponse(rc=H.H_SUCCESS)  # and no UV_PAGE_IN
                del hv.answers[("H_SVM_PAGE_IN", c.lpid)]
                try:
                    return await honest(hv, req, None)
                finally:
                    hv.answer("H_SVM_PAGE_IN", c.lpid, page_in)
            hv.answer("H_SVM_PAGE_IN", c.lpid, page_in)
            try:
                resp = await asyncio.wait_for(side.stub("guest").UV_ESM(esm_request(c, image)), 30)
                if lies == "a data page":
                    assert (resp.rc, resp.msr_s) == (U.U_SUCCESS, True)
                    load = await side.stub("guest").SvmLoad(upb.SvmLoadRequest(
                        vcpu=common_pb2.VcpuContext(lpid=c.lpid, msr_s=True), gpa=gpa_of(lied), npages=1))
                    assert load.data == bytes(PAGE_SIZE) != image.page(lied)
                else:
                    assert hv.reached("H_SVM_INIT_ABORT", c.lpid).is_set()
                    assert not resp.msr_s
                    info = await side.svm_info(c.lpid)
                    assert info is not None and info.state == "SVM_ABORT"
            finally:
                await side.stub("hv").UV_SVM_TERMINATE(upb.UvSvmTerminateRequest(lpid=c.lpid))
                await side.close()
    asyncio.run(scenario())


def test_a_share_whose_paged_out_page_never_comes_back_is_u_p2(uv_side):
    """UV_SHARE_PAGE of a paged-out page the HV never pages back in (H_SVM_PAGE_IN answered
    H_SUCCESS without its UV_PAGE_IN, every try): the firmware gives up with U_P2
    (svm_host.c:1044-1046), and the page stays paged out, its ciphertext still the HV's."""
    async def scenario():
        async with uv_side.world() as w:
            side = Side(w)
            try:
                c = await side.setup(Row("UV", "UV_SHARE_PAGE", "SVM_SECURE", "", "", "", lambda c: None))

                async def page_in_nothing(req):
                    return hpb.HSvmPageInResponse(rc=H.H_SUCCESS)
                w.hv.answer("H_SVM_PAGE_IN", c.lpid, page_in_nothing)
                resp = await side.stub("guest").UV_SHARE_PAGE(upb.UvSharePageRequest(
                    vcpu=common_pb2.VcpuContext(lpid=c.lpid, msr_s=True), gfn=c.pagedout_gfn, npages=1))
                assert resp.rc == U.U_P2
                tries = [r for call, r in w.hv.seen if call == "H_SVM_PAGE_IN" and r.lpid == c.lpid]
                assert len(tries) >= 2  # asked again before giving up
                info = await side.svm_info(c.lpid)
                assert info.shared_pages == 1  # only the setup's shared page
            finally:
                await side.close()
    asyncio.run(scenario())


def test_a_page_the_svm_shares_reads_zeros_whatever_the_hv_left_in_it(uv_side):
    """ultravisor.rst: UV_SHARE_PAGE zeroes the pages before returning (the firmware memsets
    them). The scripted HV here maps its page as the kernel does, without zeroing it: the SVM
    still reads zeros, not the host's stale data."""
    async def scenario():
        async with uv_side.world() as w:
            side = Side(w)
            try:
                c = await side.setup(Row("UV", "UV_SHARE_PAGE", "SVM_SECURE", "", "", "", lambda c: None))
                g = w.hv.guests[c.lpid]

                async def share_without_zeroing(req):  # the kernel's kvmppc_share_page: no memset
                    rc = (await w.hv.uv.stub.UV_PAGE_IN(upb.UvPageInRequest(
                        lpid=req.lpid, src_ra=HV_RA_BASE + req.guest_pa, dest_gpa=req.guest_pa, flags=0,
                        order=PAGE_SHIFT, data=b""))).rc
                    return hpb.HSvmPageInResponse(rc=H.H_SUCCESS if rc == U.U_SUCCESS else H.H_PARAMETER)
                w.hv.answer("H_SVM_PAGE_IN", c.lpid, share_without_zeroing)
                gfn = c.secure_gfn
                assert g.pages[gfn] != bytes(PAGE_SIZE)  # stale host data in the HV's page
                vcpu = common_pb2.VcpuContext(lpid=c.lpid, msr_s=True)
                assert (await side.stub("guest").UV_SHARE_PAGE(upb.UvSharePageRequest(
                    vcpu=vcpu, gfn=gfn, npages=1))).rc == U.U_SUCCESS
                load = await side.stub("guest").SvmLoad(upb.SvmLoadRequest(vcpu=vcpu, gpa=gpa_of(gfn), npages=1))
                assert load.rc == U.U_SUCCESS and load.data == bytes(PAGE_SIZE)
            finally:
                await side.close()
    asyncio.run(scenario())
