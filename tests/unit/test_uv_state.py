"""The UV's pool and GPF transitions, driven directly (no processes)."""
from __future__ import annotations

import asyncio

import pytest

from pefsim.abi import PAGE_SIZE, GpfState
from services.ultravisor.core.state import NoSlot, UvState, scrub_in_background


@pytest.fixture
def uv():
    return UvState(pool_pages=8)


def secure_svm(uv, lpid=1, npages=4):
    svm = uv.create_svm(lpid, "g")
    assert uv.add_slot(svm, 0, 0, npages)
    return svm


def test_reservation_is_bounded_by_the_pool(uv):
    a = uv.create_svm(1, "a")
    assert uv.add_slot(a, 0, 0, 6)
    b = uv.create_svm(2, "b")
    assert not uv.add_slot(b, 0, 0, 3)
    assert uv.pool.reserved == 6


def test_terminate_scrubs_frees_and_unreserves(uv):
    svm = secure_svm(uv)
    for gfn in range(4):
        uv.mark_secure(svm.gpf(gfn), bytes([gfn + 1]) * PAGE_SIZE)
    frames = [svm.gpf(g).frame for g in range(4)]
    assert uv.pool.in_use == 4
    assert uv.destroy_svm(1) == 4
    assert (uv.pool.in_use, uv.pool.reserved, uv.pool.scrubbing) == (0, 0, 4)
    assert [bytes(uv.pool.view(f))[:1] for f in frames] == [b"\x01", b"\x02", b"\x03", b"\x04"]  # not yet
    assert uv.pool.scrub() == 4 and uv.pool.scrubbing == 0
    for f in frames:
        assert bytes(uv.pool.view(f)) == bytes(PAGE_SIZE)
    assert uv.terminated_lpids() == [1] and 1 not in uv.svms and svm.key == b""


def test_a_released_frame_is_never_handed_out_unscrubbed():
    """With every frame released and none scrubbed yet, alloc and take scrub what they hand out."""
    uv = UvState(4)
    svm = secure_svm(uv)
    for gfn in range(4):
        uv.mark_secure(svm.gpf(gfn), b"\xaa" * PAGE_SIZE)
    uv.destroy_svm(1)
    assert uv.pool.scrubbing == 4 and uv.pool.in_use == 0
    one = uv.pool.alloc()
    assert bytes(uv.pool.view(one)) == bytes(PAGE_SIZE)
    more = uv.pool.take(3)
    assert all(bytes(uv.pool.view(f)) == bytes(PAGE_SIZE) for f in more)
    assert sorted([one, *more]) == [0, 1, 2, 3] and uv.pool.scrubbing == 0
    with pytest.raises(IndexError):
        uv.pool.take(1)


def test_the_background_scrubber_zeroes_released_frames():
    async def scenario():
        uv = UvState(300)
        task = asyncio.ensure_future(scrub_in_background(uv.pool))
        await asyncio.sleep(0)
        svm = uv.create_svm(1, "g")
        assert uv.add_slot(svm, 0, 0, 300)
        for gfn in range(300):
            uv.mark_secure(svm.gpf(gfn), b"\x55" * PAGE_SIZE)
        uv.destroy_svm(1)
        assert uv.pool.scrubbing == 300
        for _ in range(100):
            if not uv.pool.scrubbing:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        return uv
    uv = asyncio.run(scenario())
    assert uv.pool.scrubbing == 0 and uv.pool.in_use == 0
    assert all(bytes(uv.pool.view(f)) == bytes(PAGE_SIZE) for f in range(300))


def test_page_out_encrypts_and_page_in_decrypts(uv):
    svm = secure_svm(uv)
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    gpf = svm.gpf(2)
    uv.mark_secure(gpf, page)
    sealed = uv.page_out(svm, 2, gpf)
    assert len(sealed) == PAGE_SIZE and sealed != page
    assert gpf.state == GpfState.GPF_PAGEDOUT and gpf.frame is None and uv.pool.in_use == 0
    assert uv.page_in_sealed(svm, 2, gpf, sealed)
    assert gpf.state == GpfState.GPF_SECURE and bytes(uv.pool.view(gpf.frame)) == page


def test_tampered_and_replayed_ciphertext_refused_page_kept(uv):
    svm = secure_svm(uv)
    gpf = svm.gpf(1)
    uv.mark_secure(gpf, b"\x01" * PAGE_SIZE)
    first = uv.page_out(svm, 1, gpf)
    tampered = bytes([first[0] ^ 1]) + first[1:]
    assert not uv.page_in_sealed(svm, 1, gpf, tampered)
    assert gpf.state == GpfState.GPF_PAGEDOUT
    assert uv.page_in_sealed(svm, 1, gpf, first)
    uv.pool.view(gpf.frame)[:] = b"\x02" * PAGE_SIZE
    second = uv.page_out(svm, 1, gpf)
    assert not uv.page_in_sealed(svm, 1, gpf, first)  # replay of the older version
    assert uv.page_in_sealed(svm, 1, gpf, second)
    assert bytes(uv.pool.view(gpf.frame)) == b"\x02" * PAGE_SIZE


def test_ciphertext_is_bound_to_its_gpa(uv):
    """A ciphertext of one page offered for another page is refused."""
    svm = secure_svm(uv)
    a, b = svm.gpf(0), svm.gpf(1)
    uv.mark_secure(a, b"A" * PAGE_SIZE)
    uv.mark_secure(b, b"B" * PAGE_SIZE)
    sa, sb = uv.page_out(svm, 0, a), uv.page_out(svm, 1, b)
    assert not uv.page_in_sealed(svm, 1, b, sa)
    assert uv.page_in_sealed(svm, 1, b, sb)


def test_share_frees_the_frame_once_the_call_commits(uv):
    """A page being shared keeps its frame, untouched, until its share call has shared every
    page (a failed share puts the page back on it); then the frame is scrubbed and freed."""
    svm = secure_svm(uv)
    gpf = svm.gpf(3)
    uv.mark_secure(gpf, b"S" * PAGE_SIZE)
    frame = gpf.frame
    uv.mark_sharing(gpf)
    uv.mark_shared(gpf)
    assert gpf.frame == frame and bytes(uv.pool.view(frame)) == b"S" * PAGE_SIZE
    uv.drop_kept_frame(gpf)
    assert gpf.frame is None and uv.pool.in_use == 0 and uv.pool.scrubbing == 1
    uv.pool.scrub()
    assert bytes(uv.pool.view(frame)) == bytes(PAGE_SIZE)


def test_a_failed_share_puts_the_page_back_as_it_was(uv):
    svm = secure_svm(uv)
    secure, unbacked = svm.gpf(2), svm.gpf(3)
    uv.mark_secure(secure, b"S" * PAGE_SIZE)
    for gpf in (secure, unbacked):
        uv.mark_sharing(gpf)
        uv.mark_shared(gpf)
    uv.put_back(secure, GpfState.GPF_SECURE)
    uv.put_back(unbacked, GpfState.GPF_UNBACKED)
    assert (secure.state, bytes(uv.pool.view(secure.frame))) == (GpfState.GPF_SECURE, b"S" * PAGE_SIZE)
    assert (unbacked.state, unbacked.frame) == (GpfState.GPF_UNBACKED, None)
    assert uv.pool.in_use == 1


def test_the_uv_remembers_only_the_last_terminated_svms(uv):
    """terminated_lpids is bounded (TERMINATED_KEPT, the newest) and can be told per owner."""
    from services.ultravisor.core.state import TERMINATED_KEPT

    for lpid in range(1, TERMINATED_KEPT + 11):
        uv.create_svm(lpid, "odd" if lpid % 2 else "even")
        uv.destroy_svm(lpid)
    assert uv.terminated_lpids() == list(range(11, TERMINATED_KEPT + 11))
    assert uv.terminated_lpids("odd") == list(range(11, TERMINATED_KEPT + 11, 2))


def test_remove_slot_releases_its_pages(uv):
    svm = secure_svm(uv)
    assert uv.add_slot(svm, 1, 100, 2)
    uv.mark_secure(svm.gpf(100), b"x" * PAGE_SIZE)
    uv.remove_slot(svm, 1)
    assert uv.pool.in_use == 0 and svm.reserved == 4 and uv.pool.reserved == 4


def test_svm_lock_is_per_svm(uv):
    a, b = secure_svm(uv, 1), uv.create_svm(2, "b")

    async def both():
        async with a.lock:
            assert not b.lock.locked()
    asyncio.run(both())


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) << 10 for line in fh if line.startswith("VmRSS:"))


def test_the_secure_pool_is_resident_from_the_start():
    """Secure memory is set aside at boot: the pool's pages are resident before any page-in
    (a first touch costs more than the copy), and still all zeros."""
    from services.ultravisor.core.state import SecurePool

    before = _rss_bytes()
    pool = SecurePool(256)  # 16 MiB
    assert pool.residency == "resident"
    assert _rss_bytes() - before >= 15 << 20
    assert pool.mem[:] == bytes(256 * PAGE_SIZE)
    lazy = SecurePool(256, populate=False)
    assert lazy.residency == "on first use"
    from services.ultravisor.server import parse_args

    cfg = parse_args(["--hv", "127.0.0.1:1", "--trusted-key", "k.pub", "--lazy-pool", "--insecure"])
    assert cfg.lazy_pool and UvState(16, populate_pool=not cfg.lazy_pool).pool.residency == "on first use"


def test_bookkeeping_is_a_few_bytes_per_page():
    """The UV's RSS bound is its pool + 64 MiB whatever the guest's size, so what it keeps per
    page (pool free lists, GPF records) must stay a few bytes, not an object per page; the
    page-out versions (8 bytes a page) only once a page of the slot is paged out."""
    import tracemalloc

    npages = 1 << 14
    tracemalloc.start()
    try:
        state = UvState(pool_pages=npages, populate_pool=False)
        svm = state.create_svm(1, "g")
        assert state.add_slot(svm, 0, 0, npages)
        state.mark_secure_run(svm, 0, npages)
        used = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert svm.count(GpfState.GPF_SECURE) == svm.frames == npages
    assert used / npages < 8, f"{used / npages:.1f} bytes per page"  # 5 of records, the rest the free list


@pytest.mark.parametrize("end", ["terminate", "remove slot"])
def test_letting_a_big_guest_go_holds_a_few_bytes_per_page_at_its_peak(end):
    """UV_SVM_TERMINATE and a memslot's removal release every frame of the slot at once: what
    they build on the way is part of the UV's peak RSS, so it must stay a few bytes a page too (a
    list of the frame numbers was ~36 bytes a page: 4.5 MiB at 8 GiB, over the UV's bound)."""
    import tracemalloc

    npages = 1 << 14
    state = UvState(pool_pages=npages, populate_pool=False)
    svm = state.create_svm(1, "g")
    assert state.add_slot(svm, 0, 0, npages)
    state.mark_secure_run(svm, 0, npages)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        if end == "terminate":
            assert state.destroy_svm(1) == npages
        else:
            state.remove_slot(svm, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert state.pool.scrubbing == npages
    assert peak / npages < 10, f"{peak / npages:.1f} bytes per page"


@pytest.mark.parametrize("how", ["slot unregistered", "svm terminated"])
def test_a_record_held_across_its_slot_going_away_reaches_no_frame(uv, how):
    """A call holding a GPF record while it waits on the HV, whose slot the HV unregisters (or
    whose SVM it terminates) meanwhile, finds the record gone (NoSlot) rather than the frame,
    which is released and may already be another SVM's page."""
    svm = secure_svm(uv)
    held = svm.gpf(2)
    uv.mark_secure(held, b"A" * PAGE_SIZE)
    if how == "slot unregistered":
        uv.remove_slot(svm, 0)
    else:
        uv.destroy_svm(svm.lpid)
    uv.pool.scrub()
    other = secure_svm(uv, lpid=2, npages=8)
    for gfn in range(8):
        uv.mark_secure(other.gpf(gfn), b"B" * PAGE_SIZE)  # every frame of the pool is the other's
    with pytest.raises(NoSlot):
        held.frame
    with pytest.raises(NoSlot):
        held.state = GpfState.GPF_SECURE
    with pytest.raises(NoSlot):
        svm.gpf(2)
    assert uv.pool.in_use == 8


def test_a_page_in_with_no_frame_free_can_be_retried(uv):
    """Paging a ciphertext back in when the pool is full fails without losing what decrypts it."""
    svm = secure_svm(uv, npages=8)
    gpf = svm.gpf(0)
    uv.mark_secure(gpf, b"P" * PAGE_SIZE)
    sealed = uv.page_out(svm, 0, gpf)
    uv.pool.scrub()
    frames = uv.pool.take(uv.pool.free)  # nothing left
    with pytest.raises(IndexError):
        uv.page_in_sealed(svm, 0, gpf, sealed)
    assert gpf.state == GpfState.GPF_PAGEDOUT
    uv.pool.release_all(frames)
    assert uv.page_in_sealed(svm, 0, gpf, sealed)
    assert bytes(uv.pool.view(gpf.frame)) == b"P" * PAGE_SIZE
    assert not uv.page_in_sealed(svm, 0, gpf, sealed)  # not paged out any more: nothing to decrypt
