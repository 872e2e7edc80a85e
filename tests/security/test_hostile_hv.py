"""A hostile hypervisor against the UV's shared memory, failed share calls, and what UvStatus
tells whom: real processes under mTLS (red-team report, issue 13).

The shared-memory cases run a second UV process of the stack (same --hv-memory-dir as the stack's
UV, i.e. the real HV's data directory) whose HV is scripted in the test (tests/conformance/peers.py)
and holds an SVM in SVM_ACTIVE, where UV_PAGE_IN copies plaintext in and UV_PAGE_OUT writes in
place: the calls an HV would use to read or overwrite a file the UV opened for it.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal

import pytest

from pefsim.abi import HV_RA_BASE, PAGE_SHIFT, PAGE_SIZE, H, PageInFlag, U, gfn_of, gpa_of
from pefsim.blob import make_blob
from pefsim.dataplane import HvMemory, NotHvMemory
from pefsim.image import GuestImage
from pefsim.ops.stack import free_port
from pefsim.v1 import common_pb2, hypervisor_pb2 as hpb, ultravisor_pb2 as upb
from tests.conformance.peers import Guest, ScriptedHv
from tests.conftest import unique
from tests.helpers import MEM, operating
from tests.security.test_hostile import UV_STUB, as_, secure_guest, svm_info

NPAGES = 16
SIZE = NPAGES * PAGE_SIZE
NONCE = b"n" * 16
_lpids = itertools.count(7000)


@pytest.fixture(scope="module")
def scripted(stack):
    """(stack, address of a second UV process of the stack, where its scripted HV must listen)."""
    hv_listen = f"127.0.0.1:{free_port()}"
    return stack, stack.start_service("uv", peer=hv_listen, name="uv-scripted"), hv_listen


def esm_request(lpid: int, image: GuestImage) -> upb.UvEsmRequest:
    return upb.UvEsmRequest(vcpu=common_pb2.VcpuContext(lpid=lpid, nip=image.kbase + 0x1004), kbase=image.kbase,
                            fdt=image.fdt)


@contextlib.asynccontextmanager
async def secure_svm(stack, uv_addr: str, hv: ScriptedHv):
    """An SVM the scripted HV took through ESM honestly (SVM_SECURE, NPAGES pages); yields its
    lpid and its guest's client (the guest's own certificate); terminated afterwards."""
    lpid = next(_lpids)
    image = GuestImage.of_size(f"hostile{lpid}", SIZE)
    hv.guests[lpid] = Guest(image, make_blob(image, stack.signing_key()))
    guest = as_(stack, f"guest:hostile{lpid}", uv_addr, UV_STUB, "uv")
    try:
        resp = await guest.stub.UV_ESM(esm_request(lpid, image))
        assert (resp.rc, resp.msr_s) == (U.U_SUCCESS, True)
        yield lpid, guest
    finally:
        await hv.uv.stub.UV_SVM_TERMINATE(upb.UvSvmTerminateRequest(lpid=lpid))
        await guest.close()


@contextlib.asynccontextmanager
async def active_svm(stack, uv_addr: str, hv: ScriptedHv):
    """An SVM held in SVM_ACTIVE by the scripted HV (INIT_START open, slot 0 registered: NPAGES
    pages, all unbacked); yields its lpid; terminated afterwards."""
    lpid = next(_lpids)
    image = GuestImage.of_size(f"hostile{lpid}", SIZE)
    hv.guests[lpid] = Guest(image, make_blob(image, stack.signing_key()))
    registered, release = asyncio.Event(), asyncio.Event()

    async def init_start(req):
        rc = (await hv.uv.stub.UV_REGISTER_MEM_SLOT(upb.UvRegisterMemSlotRequest(
            lpid=req.lpid, start_gpa=0, size=SIZE, flags=0, slotid=0))).rc
        assert rc == U.U_SUCCESS
        registered.set()
        await release.wait()
        return hpb.HSvmInitStartResponse(rc=H.H_PARAMETER)
    hv.answer("H_SVM_INIT_START", lpid, init_start)
    guest = as_(stack, f"guest:hostile{lpid}", uv_addr, UV_STUB, "uv")
    esm = asyncio.ensure_future(guest.stub.UV_ESM(esm_request(lpid, image)))
    try:
        await asyncio.wait_for(registered.wait(), 10)
        yield lpid
    finally:
        await hv.uv.stub.UV_SVM_TERMINATE(upb.UvSvmTerminateRequest(lpid=lpid))
        release.set()
        await asyncio.wait_for(esm, 10)
        await guest.close()


def offer(lpid: int, path, nonce_path) -> upb.UvShareHvMemoryRequest:
    return upb.UvShareHvMemoryRequest(lpid=lpid, slot_id=0, path=os.fspath(path), ra_base=HV_RA_BASE, size=SIZE,
                                      nonce_path=os.fspath(nonce_path), nonce=NONCE)


ATTACKS = ["outside", "symlink", "dotdot", "hard link", "other lpid", "wrong size"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_uv_opens_only_the_hvs_own_ram_files(scripted, run, attack):
    """An HV (certificate and all) offers, as its RAM for slot 0, with a matching nonce file where
    its own would be: a UV-side file outside the directory, a symlink in the directory to it, a
    path with .. out of the directory, a hard link to it, another lpid's RAM file, a file of the
    wrong size. Each is refused (U_P2), and the file is neither read (a page-in without data
    finds no page at src_ra) nor written (a page-out comes back in the answer, the file is
    unchanged)."""
    stack, uv_addr, hv_listen = scripted

    async def scenario():
        async with ScriptedHv(hv_listen, uv_addr, stack) as hv, active_svm(stack, uv_addr, hv) as lpid:
            vm = stack.hv_memory_dir / f"vm-{lpid}"
            vm.mkdir(parents=True)
            (vm / "slot-0.nonce").write_bytes(NONCE)
            target = stack.run_dir / unique("uv-side-file")  # the UV's own, say its call history
            path = vm / "slot-0.ram"
            if attack == "outside":
                path = target
            elif attack == "symlink":
                path.symlink_to(target)
            elif attack == "dotdot":
                path = f"{vm}/../../{target.name}"
            elif attack == "hard link":
                target.write_bytes(b"")
                os.link(target, path)
            elif attack == "other lpid":
                other = stack.hv_memory_dir / f"vm-{lpid + 100_000}"
                other.mkdir(parents=True)
                (other / "slot-0.nonce").write_bytes(NONCE)
                target = path = other / "slot-0.ram"
            elif attack == "wrong size":
                target = path
            content = os.urandom(SIZE + PAGE_SIZE if attack == "wrong size" else SIZE)
            target.write_bytes(content)

            resp = await hv.uv.stub.UvShareHvMemory(offer(lpid, path, vm / "slot-0.nonce"))
            assert resp.rc == U.U_P2, resp.detail
            pulled = await hv.uv.stub.UV_PAGE_IN(upb.UvPageInRequest(
                lpid=lpid, src_ra=HV_RA_BASE, dest_gpa=0, order=PAGE_SHIFT))
            assert pulled.rc == U.U_P2  # no data and no shared file: no page at src_ra
            given = await hv.uv.stub.UV_PAGE_IN(upb.UvPageInRequest(
                lpid=lpid, src_ra=HV_RA_BASE + PAGE_SIZE, dest_gpa=gpa_of(1), order=PAGE_SHIFT,
                data=b"\xa5" * PAGE_SIZE))
            assert given.rc == U.U_SUCCESS
            out = await hv.uv.stub.UV_PAGE_OUT(upb.UvPageOutRequest(
                lpid=lpid, dest_ra=HV_RA_BASE + PAGE_SIZE, src_gpa=gpa_of(1), order=PAGE_SHIFT))
            assert (out.rc, out.in_place, len(out.data)) == (U.U_SUCCESS, False, PAGE_SIZE)
            assert target.read_bytes() == content
    run(scenario())


def test_the_hvs_own_ram_file_is_shared(scripted, run):
    """The control: the same offer of vm-<lpid>/slot-0.ram, right size, in the directory, is
    taken: a page-in without data reads it, a page-out is written into it in place."""
    stack, uv_addr, hv_listen = scripted

    async def scenario():
        async with ScriptedHv(hv_listen, uv_addr, stack) as hv, active_svm(stack, uv_addr, hv) as lpid:
            vm = stack.hv_memory_dir / f"vm-{lpid}"
            vm.mkdir(parents=True)
            (vm / "slot-0.nonce").write_bytes(NONCE)
            ram = vm / "slot-0.ram"
            ram.write_bytes(os.urandom(SIZE))
            assert (await hv.uv.stub.UvShareHvMemory(offer(lpid, ram, vm / "slot-0.nonce"))).rc == U.U_SUCCESS
            pulled = await hv.uv.stub.UV_PAGE_IN(upb.UvPageInRequest(
                lpid=lpid, src_ra=HV_RA_BASE, dest_gpa=0, order=PAGE_SHIFT))
            assert pulled.rc == U.U_SUCCESS
            before = ram.read_bytes()[:PAGE_SIZE]
            out = await hv.uv.stub.UV_PAGE_OUT(upb.UvPageOutRequest(
                lpid=lpid, dest_ra=HV_RA_BASE, src_gpa=0, order=PAGE_SHIFT))
            assert (out.rc, out.in_place) == (U.U_SUCCESS, True)
            assert ram.read_bytes()[:PAGE_SIZE] != before  # the ciphertext, written in place
    run(scenario())


def test_the_real_hv_still_shares_its_memory(stack, run):
    """The stack's HV offers its RAM files as before and the UV takes them: no fallback to the
    stream in the HV's log."""
    async def scenario():
        async with operating(stack) as op:
            await secure_guest(stack, op, "shm")
    run(scenario())
    assert "no shared memory with the UV" not in stack.procs["hv"].log_path.read_text()


def test_a_uv_without_the_directory_shares_nothing(tmp_path):
    """No --hv-memory-dir: even a file of the right shape and size is refused (the HV then
    moves pages in the stream)."""
    vm = tmp_path / "vm-5"
    vm.mkdir()
    (vm / "slot-0.ram").write_bytes(bytes(SIZE))
    (vm / "slot-0.nonce").write_bytes(NONCE)
    with pytest.raises(NotHvMemory):
        HvMemory(None).offer(5, 0, os.fspath(vm / "slot-0.ram"), SIZE, os.fspath(vm / "slot-0.nonce"), NONCE,
                             HV_RA_BASE)
    HvMemory(os.fspath(tmp_path)).offer(5, 0, os.fspath(vm / "slot-0.ram"), SIZE, os.fspath(vm / "slot-0.nonce"),
                                        NONCE, HV_RA_BASE)


# -- a failed share leaves the page as it was ------------------------------------------------------

PATTERN = bytes(range(256)) * (PAGE_SIZE // 256)


def vcpu_of(lpid: int) -> common_pb2.VcpuContext:
    return common_pb2.VcpuContext(lpid=lpid, msr_s=True)


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_share_the_hv_never_answers_leaves_the_page_as_it_was(stack_factory, run, how):
    """A secure guest writes a pattern, the HV is stopped (SIGSTOP) or killed, the guest's
    UV_SHARE_PAGE of that page fails (U_P2, after the UV's hcall deadline); the HV comes back and
    the page still reads the pattern, secure, nothing shared (it used to read zeros)."""
    patient = stack_factory(uv_args=("--hcall-timeout", "2"))

    async def scenario():
        async with operating(patient) as op:
            rep = await secure_guest(patient, op, "sharer")
            guest = as_(patient, f"guest:{rep.name}", patient.uv_addr, UV_STUB, "uv")
            vcpu, gfn = vcpu_of(rep.lpid), GuestImage.of_size(rep.name, MEM).npages - 1
            stored = await guest.stub.SvmStore(upb.SvmStoreRequest(vcpu=vcpu, gpa=gpa_of(gfn), data=PATTERN))
            assert stored.rc == U.U_SUCCESS
            before = await svm_info(op, rep.lpid)
            hv = patient.procs["hv"]
            if how == "stopped":
                hv.signal(signal.SIGSTOP)
            else:
                hv.kill()
            try:
                share = await guest.stub.UV_SHARE_PAGE(upb.UvSharePageRequest(vcpu=vcpu, gfn=gfn, npages=1),
                                                       timeout=30)
            finally:
                if how == "stopped":
                    hv.signal(signal.SIGCONT)
                else:
                    await asyncio.to_thread(patient.restart, "hv")
            assert share.rc == U.U_P2
            load = await guest.stub.SvmLoad(upb.SvmLoadRequest(vcpu=vcpu, gpa=gpa_of(gfn), npages=1))
            assert (load.rc, load.data == PATTERN) == (U.U_SUCCESS, True)
            after = await svm_info(op, rep.lpid)
            assert (after.state, after.secure_pages, after.shared_pages) == \
                (before.state, before.secure_pages, before.shared_pages)
            await guest.close()
    run(scenario())


def scripted_page_in(hv: ScriptedHv, lpid: int, refuse):
    """An H_SVM_PAGE_IN answer for the scripted HV: honest (UV_PAGE_IN, then the answer), except
    that ``refuse(gfn, shared)`` may make it answer H_PARAMETER, before ("before") or after
    ("after") making the UV_PAGE_IN."""
    async def page_in(req):
        gfn, shared = gfn_of(req.guest_pa), req.flags == PageInFlag.H_PAGE_IN_SHARED
        refused = refuse(gfn, shared)
        if refused == "before":
            return hpb.HSvmPageInResponse(rc=H.H_PARAMETER)
        rc = (await hv.uv.stub.UV_PAGE_IN(upb.UvPageInRequest(
            lpid=lpid, src_ra=HV_RA_BASE + req.guest_pa, dest_gpa=req.guest_pa, order=PAGE_SHIFT,
            data=b"" if shared else hv.guests[lpid].pages[gfn]))).rc
        ok = rc == U.U_SUCCESS and refused != "after"
        return hpb.HSvmPageInResponse(rc=H.H_SUCCESS if ok else H.H_PARAMETER)
    return page_in


@pytest.mark.parametrize("undo", ["unshared", "refused"])
def test_a_share_failing_on_its_second_page_puts_both_back(scripted, run, undo):
    """UV_SHARE_PAGE of two pages: the HV shares the first, maps the second (its UV_PAGE_IN) and
    then answers H_PARAMETER. Both pages read their patterns again, secure (a load does not go
    to the HV), nothing shared; also when the HV refuses to unshare them as well."""
    stack, uv_addr, hv_listen = scripted

    async def scenario():
        async with ScriptedHv(hv_listen, uv_addr, stack) as hv, secure_svm(stack, uv_addr, hv) as (lpid, guest):
            vcpu = vcpu_of(lpid)
            data = PATTERN + PATTERN[::-1]
            assert (await guest.stub.SvmStore(upb.SvmStoreRequest(vcpu=vcpu, gpa=gpa_of(10), data=data))).rc \
                == U.U_SUCCESS
            status = await hv.uv.stub.UvStatus(upb.UvStatusRequest())
            before = next(s for s in status.svms if s.lpid == lpid)
            hv.answer("H_SVM_PAGE_IN", lpid, scripted_page_in(hv, lpid, lambda gfn, shared: (
                "after" if shared and gfn == 11 else "before" if not shared and undo == "refused" else None)))
            share = await guest.stub.UV_SHARE_PAGE(upb.UvSharePageRequest(vcpu=vcpu, gfn=10, npages=2))
            assert share.rc == U.U_P2
            load = await guest.stub.SvmLoad(upb.SvmLoadRequest(vcpu=vcpu, gpa=gpa_of(10), npages=2))
            assert (load.rc, load.data == data) == (U.U_SUCCESS, True)  # a shared page would be the HV's
            status = await hv.uv.stub.UvStatus(upb.UvStatusRequest())
            after = next(s for s in status.svms if s.lpid == lpid)
            assert (after.secure_pages, after.shared_pages) == (before.secure_pages, before.shared_pages)
    run(scenario())


def test_an_unshare_that_fails_leaves_the_page_shared_as_it_was(scripted, run):
    """A shared page the HV invalidated (SHARED_INV); the HV refuses its unshare: UV_UNSHARE_PAGE
    is U_P2 and the page is still invalidated (the next load refaults it from the HV with
    H_SVM_PAGE_IN(H_PAGE_IN_SHARED)), not marked SHARED as if the HV had it mapped."""
    stack, uv_addr, hv_listen = scripted

    async def scenario():
        async with ScriptedHv(hv_listen, uv_addr, stack) as hv, secure_svm(stack, uv_addr, hv) as (lpid, guest):
            vcpu = vcpu_of(lpid)
            assert (await guest.stub.UV_SHARE_PAGE(upb.UvSharePageRequest(vcpu=vcpu, gfn=12, npages=1))).rc \
                == U.U_SUCCESS
            assert (await hv.uv.stub.UV_PAGE_INVAL(upb.UvPageInvalRequest(
                lpid=lpid, guest_pa=gpa_of(12), order=PAGE_SHIFT))).rc == U.U_SUCCESS
            hv.answer("H_SVM_PAGE_IN", lpid, scripted_page_in(hv, lpid, lambda gfn, shared: None if shared else "before"))
            unshare = await guest.stub.UV_UNSHARE_PAGE(upb.UvUnsharePageRequest(vcpu=vcpu, gfn=12, npages=1))
            assert unshare.rc == U.U_P2
            seen = len(hv.seen)
            load = await guest.stub.SvmLoad(upb.SvmLoadRequest(vcpu=vcpu, gpa=gpa_of(12), npages=1))
            assert load.rc == U.U_SUCCESS
            assert [(c, r.flags) for c, r in hv.seen[seen:] if c == "H_SVM_PAGE_IN"] == \
                [("H_SVM_PAGE_IN", PageInFlag.H_PAGE_IN_SHARED)]
    run(scenario())


# -- UvStatus: each caller sees what it may -------------------------------------------------------

def test_a_guest_sees_only_its_own_svms_in_uv_status(stack, run):
    """Guest B's UvStatus lists B's SVM and not A's, nor another guest's terminated lpid, nor the pool;
    the operator's and the HV's list both."""
    async def scenario():
        async with operating(stack) as op:
            a = await secure_guest(stack, op, "a")
            b = await secure_guest(stack, op, "b")
            gone = await secure_guest(stack, op, "gone")  # another guest's SVM, terminated
            await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=gone.lpid))
            uv_b = as_(stack, f"guest:{b.name}", stack.uv_addr, UV_STUB, "uv")
            hv = as_(stack, "hv", stack.uv_addr, UV_STUB, "uv")
            seen_by_b = await uv_b.stub.UvStatus(upb.UvStatusRequest())
            assert [s.lpid for s in seen_by_b.svms] == [b.lpid]
            assert list(seen_by_b.terminated_lpids) == []
            assert (seen_by_b.pool_pages_total, seen_by_b.pool_pages_in_use) == (0, 0)
            for everything in (await op.uv.stub.UvStatus(upb.UvStatusRequest()),
                               await hv.stub.UvStatus(upb.UvStatusRequest())):
                assert {a.lpid, b.lpid} <= {s.lpid for s in everything.svms}
                assert gone.lpid in everything.terminated_lpids and everything.pool_pages_total > 0
            await uv_b.close()
            await hv.close()
    run(scenario())
