"""How the HV writes guest memory: with pwrite into the memslot's RAM file, never through its
mapping (services/hypervisor/core/state.py, Slot), and what the guest keeps in flight while it
loads and checks that memory (services/guest/core/program.py, in_flight)."""
from __future__ import annotations

import asyncio
import os

import pytest

from pefsim.abi import PAGE_SIZE, GfnState
from services.guest.core.program import GuestFailure, in_flight
from services.hypervisor.core.state import IN_PLACE, HvState


def page(tag: int) -> bytes:
    return bytes([tag]) * PAGE_SIZE


@pytest.fixture
def slot(tmp_path):
    st = HvState(tmp_path)
    vm = st.create_vm("g", "127.0.0.1:1", True)
    st.add_slot(vm, 0, 0, 8)
    yield st, vm.slots[0]
    for vm in st.vms.values():
        for s in vm.slots.values():
            s.close()


def test_the_ram_is_never_mapped(slot):
    """Pages read through a mapping would stay in the HV's RSS (the whole guest after a page-in
    stream); stores through one fault per 4 KiB."""
    _, s = slot
    s.write(0, page(1))
    assert s.run(0, 8)[:PAGE_SIZE] == page(1)
    with open("/proc/self/maps") as maps:
        assert str(s.ram_path) not in maps.read()


def test_a_write_is_seen_by_the_next_read_and_in_the_file(slot):
    _, s = slot
    s.write(3, page(7))
    s.write_run(5, [page(1), memoryview(page(2))])
    assert bytes(s.page(3)) == page(7)
    assert bytes(s.run(5, 2)) == page(1) + page(2)
    with open(s.ram_path, "rb") as f:
        f.seek(3 * PAGE_SIZE)
        assert f.read(PAGE_SIZE) == page(7)


@pytest.mark.parametrize("idx, pages", [(7, 2), (8, 1), (-1, 1)])
def test_a_write_past_the_slot_is_refused(slot, idx, pages):
    _, s = slot
    before = bytes(s.run(0, 8))
    with pytest.raises(ValueError):
        s.write(idx, page(9) * pages)
    with pytest.raises(ValueError):
        s.run(idx, pages)
    assert bytes(s.run(0, 8)) == before


def test_pages_given_back_skip_the_ones_written_in_place(slot):
    """mark_normal_run gathers runs of pages with data and leaves IN_PLACE ones as they are."""
    st, s = slot
    st.mark_secure_in_run(s, 0, 8)
    s.write(2, page(0xAA))  # what the UV wrote in place (shared memory)
    s.write(5, page(0xBB))
    pages = [page(1), page(2), IN_PLACE, page(4), page(5), IN_PLACE, IN_PLACE, page(8)]
    st.mark_normal_run(s, 0, pages)
    want = [page(1), page(2), page(0xAA), page(4), page(5), page(0xBB), bytes(PAGE_SIZE), page(8)]
    assert [bytes(s.page(i)) for i in range(8)] == want
    assert all(s.state(i) == GfnState.GFN_NORMAL for i in range(8))


def test_in_flight_keeps_the_window_and_runs_every_call():
    running, most, done = 0, 0, []

    async def call(n):
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001 * (n % 3))
        running -= 1
        done.append(n)

    asyncio.run(in_flight((lambda n=n: call(n) for n in range(20)), window=3))
    assert sorted(done) == list(range(20)) and most == 3


def test_in_flight_stops_at_the_first_failure_and_cancels_the_rest():
    started, cancelled = [], []

    async def call(n):
        started.append(n)
        try:
            if n == 2:
                raise GuestFailure("VcpuStore: EFAULT")
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(n)
            raise

    with pytest.raises(GuestFailure, match="EFAULT"):
        asyncio.run(in_flight((lambda n=n: call(n) for n in range(100)), window=4))
    assert started == [0, 1, 2, 3] and sorted(cancelled) == [0, 1, 3]


def test_closing_a_slot_twice_closes_its_file_once(slot):
    """A simulated crash closes every slot, then the call it interrupted closes its own again:
    the second close must not close a descriptor number the process has since reused."""
    _, s = slot
    s.close()
    other = os.open(os.devnull, os.O_RDONLY)  # may take the slot's old descriptor number
    try:
        s.close()
        os.fstat(other)
    finally:
        os.close(other)


def test_a_scrub_zeroes_exactly_its_pages_in_chunks(slot, monkeypatch):
    """Slot.zero writes ZERO_PAGE buffers, at most _ZERO_RUN (IOV_MAX) per pwritev."""
    from services.hypervisor.core import state

    _, s = slot
    s.write_run(0, [page(i + 1) for i in range(8)])
    monkeypatch.setattr(state, "_ZERO_RUN", 3)
    s.zero(1, 6)
    assert [bytes(s.page(i)) for i in range(8)] == [page(1)] + [bytes(PAGE_SIZE)] * 6 + [page(8)]
    s.write(4, page(5))
    with pytest.raises(ValueError):
        s.zero(4, 5)  # its first chunk would fit: still nothing is written
    assert bytes(s.page(4)) == page(5)


def test_a_store_and_a_load_across_two_slots_make_one_call_a_slot(tmp_path, monkeypatch):
    """VcpuStore and VcpuLoad touch each run of consecutive pages of one slot with one pwritev or
    pread (services/hypervisor/core/memory.py, _runs), and a run never crosses into the next slot."""
    from types import SimpleNamespace

    from pefsim.abi import Role, gpa_of
    from pefsim.v1 import hypervisor_pb2 as pb
    from services.hypervisor.core import memory

    st = HvState(tmp_path)
    vm = st.create_vm("g", "127.0.0.1:1", True)
    st.add_slot(vm, 0, 0, 8)
    st.add_slot(vm, 1, 8, 8)
    hv, guest = SimpleNamespace(state=st), SimpleNamespace(role=Role.ROLE_GUEST)
    calls = []
    for name in ("pwritev", "pread"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    data = b"".join(page(n) for n in range(1, 11))  # 10 pages from GFN 3: 5 in slot 0, 5 in slot 1
    try:
        got = asyncio.run(memory.vcpu_store(hv, pb.VcpuStoreRequest(lpid=vm.lpid, gpa=gpa_of(3), data=data),
                                            guest))
        assert got.errno == 0 and calls == ["pwritev", "pwritev"]
        calls.clear()
        got = asyncio.run(memory.vcpu_load(hv, pb.VcpuLoadRequest(lpid=vm.lpid, gpa=gpa_of(3), npages=10),
                                           guest))
        assert got.errno == 0 and calls == ["pread", "pread"] and got.data == data
        assert bytes(vm.slots[0].page(7)) == page(5) and bytes(vm.slots[1].page(0)) == page(6)
    finally:
        for s in vm.slots.values():
            s.close()


def test_a_write_of_part_of_a_page_past_the_slot_is_refused(slot):
    _, s = slot
    with pytest.raises(ValueError):
        s.write_run(7, [page(1), b"x"])
