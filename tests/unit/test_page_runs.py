"""Runs of pages (PageRef.count) against the same pages one by one.

The bulk calls take a run that passes the checks at both ends, in the common case, together
(services/ultravisor/core/bulk.py, core/page.py: page_in_run, page_out_run). Every page must
still get exactly what it would get alone: the same result, the same GPF transition, the same
bytes. Two UVs in the same state are sent the same pages, one as single pages and one cut into
runs at random; results, GPF states and page contents must match, for page-in and page-out, with
data in the frames and through shared memory, in ESM, secure and abort states, with bad addresses,
orders and flags mixed in.
"""
from __future__ import annotations

import asyncio
import os
import random

import pytest

from pefsim.abi import HV_RA_BASE, PAGE_SHIFT, PAGE_SIZE, SECURE_RA_BASE, GpfState, Role, SvmState, U
from pefsim.dataplane import MAX_FRAME_PAGES, decoder, encode, limited
from pefsim.calltable import Caller
from pefsim.v1 import ultravisor_pb2 as upb
from services.ultravisor.core.bulk import uv_page_in_stream, uv_page_out_stream
from services.ultravisor.server import Ultravisor, UvConfig

SLOTS = {0: (0, 16), 1: (32, 8)}  # slot id -> (base gfn, pages); a hole between them
GFNS = [g for base, n in SLOTS.values() for g in range(base, base + n)]
HV = Caller(role=Role.ROLE_HV, name="hv")


def page(tag: int) -> bytes:
    return bytes([tag & 0xFF]) * PAGE_SIZE


def ra_of(gfn: int) -> int:
    return HV_RA_BASE + gfn * PAGE_SIZE


def make_uv(rng: random.Random, svm_state: int, ram_path) -> Ultravisor:
    """A UV with one SVM whose GPFs are in states drawn from ``rng``."""
    uv = Ultravisor(UvConfig(hv="127.0.0.1:1", pool_pages=64, lazy_pool=True))
    svm = uv.state.create_svm(7, "guest")
    for slot_id, (base, n) in SLOTS.items():
        assert uv.state.add_slot(svm, slot_id, base, n)
    usual = rng.choice(["unbacked", "secure"])  # most pages as ESM or the abort finds them
    for gfn in GFNS:
        pick = rng.choice([usual] * 6 + ["unbacked", "secure", "pagedout", "shared", "unsharing"])
        if pick == "unbacked":
            continue
        gpf = svm.gpf(gfn)
        uv.state.mark_secure(gpf, page(gfn))
        if pick == "pagedout":
            uv.state.page_out(svm, gfn, gpf)
        elif pick == "shared":
            uv.state.mark_shared(gpf)
        elif pick == "unsharing":
            uv.state.mark_unsharing(gpf)
    uv.state.set_svm_state(svm, svm_state)
    if ram_path is not None:
        uv.hvmem.add(7, 0, os.open(ram_path, os.O_RDWR), HV_RA_BASE, 48 * PAGE_SIZE)  # the HV's RAM, gfn = page
    return uv


def draw_runs(rng: random.Random) -> list[tuple]:
    """(ra, gpa, flags, order, count) runs over the slots, past their ends and into the hole,
    with now and then a bad address, order or flag."""
    runs = []
    for _ in range(rng.randint(1, 8)):
        gfn, count = rng.randint(-1, 44), rng.randint(1, 7)
        ra = ra_of(gfn)
        bad = rng.random()
        if bad < 0.1:
            ra = 0
        elif bad < 0.2:
            ra = SECURE_RA_BASE - 2 * PAGE_SIZE  # the run crosses into secure memory
        gpa = max(gfn, 0) * PAGE_SIZE + (PAGE_SIZE // 2 if rng.random() < 0.05 else 0)
        runs.append((ra, gpa, 1 if rng.random() < 0.05 else 0, PAGE_SHIFT - (rng.random() < 0.05), count))
    return runs


def refs(runs, single: bool) -> list:
    out = []
    for ra, gpa, flags, order, count in runs:
        if single:
            out += [upb.PageRef(ra=ra + i * PAGE_SIZE, gpa=gpa + i * PAGE_SIZE, flags=flags, order=order)
                    for i in range(count)]
        else:
            out.append(upb.PageRef(ra=ra, gpa=gpa, flags=flags, order=order, count=count))
    return out


def snapshot(uv: Ultravisor) -> dict:
    svm = uv.state.svms[7]
    out = {}
    for gfn in sorted(svm.gfns()):
        gpf = svm.gpf(gfn)
        content = bytes(uv.state.pool.view(gpf.frame)) if gpf.frame is not None else None
        out[gfn] = (GpfState(gpf.state).name, content, gpf.version)
    return {"gpfs": out, "in_use": uv.state.pool.in_use}


async def page_in(uv: Ultravisor, runs, single: bool, shared: bool) -> list[int]:
    pages = refs(runs, single)
    total = sum(r[4] for r in runs)
    payload = [] if shared else [page(0x80 + i) for i in range(total)]
    raw = encode(upb.PageInBatch(lpid=7, pages=pages, shared_memory=shared), payload)

    async def frames():
        yield decoder(upb.PageInBatch, MAX_FRAME_PAGES)(raw)
    return [rc for result in [r async for r in uv_page_in_stream(uv, frames(), HV)] for rc in result.rc]


async def page_out(uv: Ultravisor, runs, single: bool, shared: bool) -> tuple[list[int], bytes]:
    request = upb.PageOutRequest(lpid=7, pages=refs(runs, single), batch_pages=5, shared_memory=shared)
    rcs, data = [], b""
    async for raw in uv_page_out_stream(uv, request, HV):
        frame = decoder(upb.PageOutBatch)(raw)
        assert frame.header.first == len(rcs)
        rcs += frame.header.rc
        data += bytes(frame.payload)
    return rcs, data


def ram_file(tmp_path, name: str):
    path = tmp_path / name
    path.write_bytes(b"".join(page(0x40 + gfn) for gfn in range(48)))
    return path


def single_pages_and_runs_agree(seed: int, tmp_path, shared: bool, svm_states: list, move) -> None:
    """Set up two UVs alike from ``seed``, draw the same runs, and ``move(uv, runs, single,
    svm_state, ram)`` them on one as single pages and on the other as runs: what it returns must
    be the same."""
    async def scenario():
        results = []
        for single in (True, False):
            rng = random.Random(seed)
            svm_state = rng.choice(svm_states)
            ram = ram_file(tmp_path, f"ram-{single}") if shared else None
            uv = make_uv(rng, svm_state, ram)
            results.append(await move(uv, draw_runs(rng), single, svm_state, ram))
            await uv.close()
        assert results[0] == results[1]
    asyncio.run(scenario())


@pytest.mark.parametrize("shared", [False, True], ids=["data", "shm"])
@pytest.mark.parametrize("seed", range(80))
def test_page_in_runs_match_single_pages(seed, shared, tmp_path):
    async def move(uv, runs, single, svm_state, ram):
        rcs = await page_in(uv, runs, single, shared)
        assert len(rcs) == sum(r[4] for r in runs) and all(isinstance(rc, int) for rc in rcs)
        return rcs, snapshot(uv)
    single_pages_and_runs_agree(seed, tmp_path, shared,
                                [SvmState.SVM_ACTIVE, SvmState.SVM_ACTIVE, SvmState.SVM_SECURE], move)


@pytest.mark.parametrize("shared", [False, True], ids=["data", "shm"])
@pytest.mark.parametrize("seed", range(80))
def test_page_out_runs_match_single_pages(seed, shared, tmp_path):
    async def move(uv, runs, single, svm_state, ram):
        rcs, data = await page_out(uv, runs, single, shared)
        state = snapshot(uv)
        if svm_state == SvmState.SVM_SECURE:  # ciphertext under each UV's own key: sizes only
            data = len(data)
            state = {g: (s, v) for g, (s, _, v) in state["gpfs"].items()}
        return rcs, data, state, ram.read_bytes() if ram is not None and svm_state == SvmState.SVM_ABORT else None
    single_pages_and_runs_agree(seed, tmp_path, shared,
                                [SvmState.SVM_ABORT, SvmState.SVM_ABORT, SvmState.SVM_SECURE], move)


def test_the_common_cases_take_the_run_path(tmp_path):
    """A guard on the comparison above: ESM's page-in of unbacked pages and the abort's page-out
    really go through page_in_run / page_out_run (else the tests compare the slow path with itself)."""
    from services.ultravisor.core import bulk

    taken = []
    real_in, real_out = bulk.page_in_run, bulk.page_out_run

    def spy(real):
        def run(*args):
            ok = real(*args)
            taken.append(ok)
            return ok
        return run

    async def scenario():
        uv = Ultravisor(UvConfig(hv="127.0.0.1:1", pool_pages=64, lazy_pool=True))
        svm = uv.state.create_svm(7, "guest")
        assert uv.state.add_slot(svm, 0, 0, 16)
        uv.hvmem.add(7, 0, os.open(ram_file(tmp_path, "ram"), os.O_RDWR), HV_RA_BASE, 48 * PAGE_SIZE)
        runs = [(ra_of(0), 0, 0, PAGE_SHIFT, 16)]
        assert await page_in(uv, runs, False, True) == [U.U_SUCCESS] * 16
        assert all(bytes(uv.state.pool.view(svm.gpf(g).frame)) == page(0x40 + g) for g in range(16))
        uv.state.set_svm_state(svm, SvmState.SVM_ABORT)
        rcs, data = await page_out(uv, runs, False, False)
        assert rcs == [U.U_SUCCESS] * 16 and data == b"".join(page(0x40 + g) for g in range(16))
        await uv.close()

    bulk.page_in_run, bulk.page_out_run = spy(real_in), spy(real_out)
    try:
        asyncio.run(scenario())
    finally:
        bulk.page_in_run, bulk.page_out_run = real_in, real_out
    assert taken == [True] * 4  # one page-in run; page-out frames of 5, 5, 5 and 1 (a single page)


def test_requests_naming_too_many_pages_do_not_parse():
    too_many = upb.PageInBatch(lpid=7, pages=[upb.PageRef(ra=HV_RA_BASE, gpa=0, count=MAX_FRAME_PAGES + 1)])
    with pytest.raises(ValueError, match="pages named"):
        decoder(upb.PageInBatch, MAX_FRAME_PAGES)(encode(too_many))
    huge = upb.PageOutRequest(lpid=7, pages=[upb.PageRef(ra=HV_RA_BASE, gpa=0, count=0xFFFFFFFF)] * 3)
    with pytest.raises(ValueError, match="pages named"):
        limited(upb.PageOutRequest, 1 << 20)(huge.SerializeToString())


def test_hv_groups_bulk_page_ins_into_runs_of_consecutive_addresses():
    from services.hypervisor.core.pages import _runs_of

    P = PAGE_SIZE
    assert list(_runs_of([])) == []
    assert list(_runs_of([P * i for i in range(5, 12)])) == [(0, 7)]  # one run, the fast way
    assert list(_runs_of([0, P, 2 * P, 7 * P, 8 * P, 3 * P, 3 * P + 1, 0])) == [(0, 3), (3, 2), (5, 1), (6, 1), (7, 1)]
    assert list(_runs_of([P, 0, 2 * P])) == [(0, 1), (1, 1), (2, 1)]
