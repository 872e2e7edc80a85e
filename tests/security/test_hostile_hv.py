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

import pytest

from pefsim.abi import HV_RA_BASE, PAGE_SHIFT, PAGE_SIZE, H, U, gpa_of
from pefsim.blob import make_blob
from pefsim.dataplane import HvMemory, NotHvMemory
from pefsim.demo import Operator
from pefsim.image import GuestImage
from pefsim.stack import free_port
from pefsim.v1 import common_pb2, hypervisor_pb2 as hpb, ultravisor_pb2 as upb
from tests.conformance.peers import Guest, ScriptedHv
from tests.conftest import unique
from tests.security.test_hostile import UV_STUB, as_, secure_guest

NPAGES = 16
SIZE = NPAGES * PAGE_SIZE
NONCE = b"n" * 16
_lpids = itertools.count(7000)


@pytest.fixture(scope="module")
def scripted(stack):
    """(stack, address of a second UV process of the stack, where its scripted HV must listen)."""
    hv_listen = f"127.0.0.1:{free_port()}"
    return stack, stack.start_service("uv", peer=hv_listen, name="uv-scripted"), hv_listen


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
    esm = asyncio.ensure_future(guest.stub.UV_ESM(upb.UvEsmRequest(
        vcpu=common_pb2.VcpuContext(lpid=lpid, nip=image.kbase + 0x1004), kbase=image.kbase, fdt=image.fdt)))
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
        op = Operator.of(stack)
        try:
            await secure_guest(stack, op, "shm")
        finally:
            await op.close()
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
