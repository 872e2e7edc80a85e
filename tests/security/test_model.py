"""A model-based test (hypothesis RuleBasedStateMachine) of the real UV process.

Random sequences of ucalls, legal and illegal, by the HV and by guests, against a UV driven by a
scripted HV; after every step the UV's answer must equal the one the model predicts from the call
table, and the UV's accounting must balance (every frame owned once, reservations per SVM, no
SVM or page left after UV_SVM_TERMINATE).
"""
from __future__ import annotations

import asyncio
import itertools
import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, invariant, rule,
                                 run_state_machine_as_test)

from pefsim.abi import HV_RA_BASE, PAGE_SHIFT, PAGE_SIZE, SvmState, U
from pefsim.calltable import ALLOW, STATE
from services.ultravisor import calltable
from pefsim.blob import make_blob
from pefsim.image import GuestImage
from pefsim.ops.stack import LocalStack, StackConfig, free_port
from pefsim.v1 import common_pb2, ultravisor_pb2 as upb, ultravisor_pb2_grpc
from tests.conformance.peers import Guest, ScriptedHv, caller
from tests.conftest import assert_clean_exit

NPAGES = 16
_lpids = itertools.count(5000)
CALLS = {c.name: c for c in calltable.CALLS}


def refused(call: str, state) -> int | None:
    """What the call table answers before any handler runs in ``state`` (None: the handler's)."""
    cell = calltable.STATE_TABLE[call][state]
    return None if cell is ALLOW else int(cell)


def order_check(call: str) -> int:
    return int(next(c.rc for c in CALLS[call].checks if c is not STATE and c.arg == "order"))


class Harness:
    """The UV process, a scripted HV and the callers, on one event loop in a thread."""

    def __init__(self, root):
        self.stack = LocalStack(StackConfig(run_dir=root, pool_pages=512))
        self.hv_listen = f"127.0.0.1:{free_port()}"
        self.uv_addr = self.stack.start_service("uv", peer=self.hv_listen)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self._start())

    async def _start(self):
        from pefsim.abi import Role

        self.hv = ScriptedHv(self.hv_listen, self.uv_addr, self.stack)
        await self.hv.__aenter__()
        stub = ultravisor_pb2_grpc.UltravisorServiceStub
        self.as_hv = caller(self.uv_addr, Role.ROLE_HV, stub, self.stack, "uv")
        self.as_guest = caller(self.uv_addr, Role.ROLE_GUEST, stub, self.stack, "uv")
        self.as_op = caller(self.uv_addr, Role.ROLE_OPERATOR, stub, self.stack, "uv")

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def call(self, make):
        """Make a gRPC call on the harness's loop (its channels belong to it)."""
        async def go():
            return await make()
        return self.run(go())

    def close(self):
        async def stop():
            for p in (self.as_hv, self.as_guest, self.as_op):
                await p.close()
            await self.hv.__aexit__(None, None, None)
        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        assert_clean_exit(self.stack)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("model"))
    yield h
    h.close()


class UvModel(RuleBasedStateMachine):
    """The model: per lpid, each page's state (secure / out / shared) and its last ciphertext."""

    svms = Bundle("svms")
    h: Harness = None

    def __init__(self):
        super().__init__()
        self.model: dict[int, dict] = {}

    def teardown(self):
        """Each example leaves the UV as it found it."""
        for lpid in list(self.model):
            self.h.call(lambda: self.h.as_hv.stub.UV_SVM_TERMINATE(upb.UvSvmTerminateRequest(lpid=lpid)))

    def gpa(self, gfn):
        return gfn << PAGE_SHIFT

    @rule(target=svms)
    def secure_svm(self):
        lpid = next(_lpids)
        image = GuestImage.of_size(f"model{lpid}", NPAGES * PAGE_SIZE)
        blob = make_blob(image, self.h.stack.signing_key())
        self.h.hv.guests[lpid] = Guest(image, blob)
        resp = self.h.call(lambda: self.h.as_guest.stub.UV_ESM(upb.UvEsmRequest(
            vcpu=common_pb2.VcpuContext(lpid=lpid, nip=0x11004), kbase=image.kbase, fdt=image.fdt)))
        assert (resp.rc, resp.msr_s) == (U.U_SUCCESS, True)
        self.model[lpid] = {"pages": {g: "secure" for g in range(NPAGES)}, "cipher": {}, "image": image}
        return lpid

    @rule(lpid=svms, gfn=st.integers(0, NPAGES + 3))
    def page_out(self, lpid, gfn):
        svm = self.model.get(lpid)
        if svm is None:
            expected = refused("UV_PAGE_OUT", SvmState.SVM_ABSENT)
        elif gfn >= NPAGES:
            expected = U.U_P3
        else:
            expected = U.U_SUCCESS if svm["pages"][gfn] == "secure" else U.U_PARAMETER
        resp = self.h.call(lambda: self.h.as_hv.stub.UV_PAGE_OUT(upb.UvPageOutRequest(
            lpid=lpid, dest_ra=HV_RA_BASE, src_gpa=self.gpa(gfn), order=PAGE_SHIFT)))
        assert resp.rc == expected
        if resp.rc == U.U_SUCCESS:
            assert resp.data != svm["image"].page(gfn)  # ciphertext only
            svm["pages"][gfn], svm["cipher"][gfn] = "out", resp.data
            self.h.hv.guests[lpid].pages[gfn] = resp.data

    @rule(lpid=svms, gfn=st.integers(0, NPAGES - 1), tamper=st.booleans())
    def page_in(self, lpid, gfn, tamper):
        svm = self.model.get(lpid)
        data = svm["cipher"].get(gfn, bytes(PAGE_SIZE)) if svm else bytes(PAGE_SIZE)
        if tamper:
            data = bytes([data[0] ^ 1]) + data[1:]
        if svm is None:
            expected = refused("UV_PAGE_IN", SvmState.SVM_ABSENT)
        else:
            state = svm["pages"][gfn]
            expected = {"secure": U.U_P2, "shared": U.U_SUCCESS,
                        "out": U.U_P3 if tamper else U.U_SUCCESS}[state]
        resp = self.h.call(lambda: self.h.as_hv.stub.UV_PAGE_IN(upb.UvPageInRequest(
            lpid=lpid, src_ra=HV_RA_BASE, dest_gpa=self.gpa(gfn), order=PAGE_SHIFT, data=data)))
        assert resp.rc == expected
        if resp.rc == U.U_SUCCESS and svm["pages"][gfn] == "out":
            svm["pages"][gfn] = "secure"

    @rule(lpid=svms, gfn=st.integers(0, NPAGES - 1))
    def share(self, lpid, gfn):
        svm = self.model.get(lpid)
        resp = self.h.call(lambda: self.h.as_guest.stub.UV_SHARE_PAGE(upb.UvSharePageRequest(
            vcpu=common_pb2.VcpuContext(lpid=lpid, msr_s=True), gfn=gfn, npages=1)))
        assert resp.rc == (refused("UV_SHARE_PAGE", SvmState.SVM_ABSENT) if svm is None else U.U_SUCCESS)
        if svm is not None:
            svm["pages"][gfn] = "shared"

    @rule(lpid=svms, gfn=st.integers(0, NPAGES - 1))
    def unshare(self, lpid, gfn):
        svm = self.model.get(lpid)
        resp = self.h.call(lambda: self.h.as_guest.stub.UV_UNSHARE_PAGE(upb.UvUnsharePageRequest(
            vcpu=common_pb2.VcpuContext(lpid=lpid, msr_s=True), gfn=gfn, npages=1)))
        assert resp.rc == (refused("UV_UNSHARE_PAGE", SvmState.SVM_ABSENT) if svm is None else U.U_SUCCESS)
        if svm is not None and svm["pages"][gfn] == "shared":
            svm["pages"][gfn] = "secure"

    @rule(lpid=svms, order=st.sampled_from([0, 12, 21]))
    def wrong_order(self, lpid, order):
        resp = self.h.call(lambda: self.h.as_hv.stub.UV_PAGE_OUT(upb.UvPageOutRequest(
            lpid=lpid, dest_ra=HV_RA_BASE, src_gpa=0, order=order)))
        assert resp.rc == order_check("UV_PAGE_OUT")  # order is checked before anything else

    @rule(lpid=svms)
    def guest_tries_terminate(self, lpid):
        resp = self.h.call(lambda: self.h.as_guest.stub.UV_SVM_TERMINATE(upb.UvSvmTerminateRequest(lpid=lpid)))
        assert resp.rc == CALLS["UV_SVM_TERMINATE"].wrong_caller

    @rule(lpid=svms)
    def terminate(self, lpid):
        resp = self.h.call(lambda: self.h.as_hv.stub.UV_SVM_TERMINATE(upb.UvSvmTerminateRequest(lpid=lpid)))
        absent = refused("UV_SVM_TERMINATE", SvmState.SVM_ABSENT)
        assert resp.rc == (absent if lpid not in self.model else U.U_SUCCESS)
        self.model.pop(lpid, None)

    @invariant()
    def accounting_balances(self):
        status = self.h.call(lambda: self.h.as_op.stub.UvStatus(upb.UvStatusRequest()))
        mine = {s.lpid: s for s in status.svms if s.lpid in self.model or s.lpid >= 5000}
        assert set(mine) == set(self.model)
        assert status.pool_pages_in_use == sum(s.secure_pages for s in status.svms)
        assert status.pool_pages_reserved == sum(s.reserved_pages for s in status.svms)
        for lpid, svm in self.model.items():
            counts = {k: sum(1 for v in svm["pages"].values() if v == k) for k in ("secure", "out", "shared")}
            info = mine[lpid]
            assert (info.secure_pages, info.pagedout_pages, info.shared_pages) == (
                counts["secure"], counts["out"], counts["shared"]), (lpid, info, counts)


def test_uv_against_its_model(harness):
    """The UV's answers and accounting follow the model through random call sequences."""
    UvModel.h = harness
    run_state_machine_as_test(UvModel, settings=settings(
        max_examples=15, stateful_step_count=12, deadline=None, suppress_health_check=list(HealthCheck)))
