"""Ultravisor state: the secure-memory pool, SVM objects and their per-GPF pages.

SVM states (SvmState, the UV's ``enum svm_state``)
-------------------------------------------------

  SVM_ABSENT   no SVM object for the lpid (pefsim's name for "not found")
  SVM_ACTIVE   created by UV_ESM; the ESM context is paging the guest in and checking its blob
  SVM_SECURE   ESM committed; the guest runs with MSR[S] = 1
  SVM_ABORT    ESM failed after H_SVM_INIT_START; H_SVM_INIT_ABORT issued. The SVM keeps every
               page, memslot and its key until UV_SVM_TERMINATE, and serves UV_PAGE_OUT (with
               the plaintext: the guest resumes as a normal VM) so the HV can take its pages back.

  event                 ABSENT        ACTIVE           SECURE           ABORT
  UV_ESM                -> ACTIVE     U_RETRY          U_RETRY          U_RETRY
  ESM commits           N/A           -> SECURE        N/A              N/A
  ESM fails             N/A           -> ABORT         (os-term)        N/A
  UV_SVM_TERMINATE      U_SUCCESS     -> ABSENT        -> ABSENT        -> ABSENT

  The per-call legality of every ucall in each state is the table in calltable.py.

GPF states (GpfState, the UV's per-guest-page-frame states; the subset pefsim uses)
------------------------------------------------------------------------------------

  GPF_UNBACKED      inside a registered slot, no pool frame yet (reads as zeros on first touch)
  GPF_SECURE        content in a pool frame
  GPF_PAGEDOUT      the HV holds AES-GCM ciphertext; the UV keeps key, nonce, tag and version
  GPF_HV_SHARING    transient: H_SVM_PAGE_IN(H_PAGE_IN_SHARED) in flight
  GPF_SHARED        shared with the HV: the HV page is the page (the UV reaches it through the HV)
  GPF_SHARED_INV    shared, but the HV dropped its mapping (UV_PAGE_INVAL); refaulted on access
  GPF_HV_UNSHARING  transient: the unshare page-in (H_SVM_PAGE_IN flags 0) in flight

  event                      UNBACKED   SECURE         PAGEDOUT     SHARED(_INV)  HV_SHARING  HV_UNSHARING
  UV_PAGE_IN (ESM / fault)   ->SECURE   copy (ESM) /   decrypt ->   ->SHARED      ->SHARED    ->SECURE (zero,
                                        U_P2 (secure)  SECURE / U_P3                           no copy)
  UV_PAGE_OUT (secure)       U_PARAM    ->PAGEDOUT     U_PARAMETER  U_PARAMETER   U_PARAMETER U_RETRY
  UV_PAGE_OUT (ABORT)        U_PARAM    plaintext, kept U_PARAMETER U_PARAMETER   U_PARAMETER U_RETRY
  UV_PAGE_INVAL              U_P2       U_P2           U_P2         ->SHARED_INV  U_P2        U_P2
  share                      ->HV_SHARING (after paging a PAGEDOUT page back in); the frame is kept
                             until every page of the call is shared, the page put back on it if not
  unshare                    SHARED(_INV) -> HV_UNSHARING; back to SHARED(_INV) if the HV fails it
  UV_SVM_TERMINATE           every frame given back to be scrubbed, reservation returned, key dropped

Scrubbing. A frame given back (UV_SVM_TERMINATE, page-out, share, memslot removal) is scrubbed
before anyone gets it again, but not on the caller's time: it waits, neither free nor in use, for
the UV's background scrubber (``scrub_in_background``, 4 MiB at a time between calls), and alloc
scrubs one itself if no free frame is left. So UV_SVM_TERMINATE costs its bookkeeping, not a
memset of the SVM's memory, and the guest an abort resumes does not wait for it.

Invariants (checked by tests and the chaos checkers)
  * a free pool frame holds zeros (frames are scrubbed before they are free again);
  * a frame belongs to at most one GPF of one SVM;
  * pages in use <= pages reserved <= pages total; an SVM's frames <= its reservation.

Locking: one asyncio.Lock per SVM (``Svm.lock``, the UV's page_lock) around every change of its
GPF map. It is never held across an outgoing hcall: H_SVM_PAGE_IN calls back with UV_PAGE_IN,
which takes it.
"""
from __future__ import annotations

import asyncio
import mmap
import struct
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pefsim import entropy
from pefsim import clock
from pefsim import faults
from pefsim.dataplane import HvMemory
from pefsim.abi import PAGE_SIZE, SECURE_RA_BASE, GpfState, SvmState, gfn_of

SVM_MEM_SLOTS_NUM = 32  # slot ids the UV accepts per SVM (firmware's SVM_MEM_SLOTS_NUM)
# terminated SVMs the UV remembers (lpid and owner, for UvStatus): the last ones only, or the list
# would grow with every VM this UV ever ran and travel in every UvStatus
TERMINATED_KEPT = 1024
ZERO_PAGE = bytes(PAGE_SIZE)


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14


class SecurePool:
    """The UV's fixed-size secure memory: an anonymous mmap of 64 KiB frames.

    Like the secure memory firmware sets aside at boot, the pool is made resident when the UV
    starts (``populate``): a first touch costs a fault and a zeroing per 4 KiB, which on these
    machines is ten times the copy itself (41 us against 4.5 us for a 64 KiB page-in), and no
    hardware UV pays it on the page-in path. Without MADV_POPULATE_WRITE (Linux < 5.14) frames
    become resident on first use, as before, and the UV says so at start."""

    def __init__(self, pages: int, populate: bool = True):
        self.total = pages
        self.mem = mmap.mmap(-1, max(pages, 1) * PAGE_SIZE)
        self.residency = "on first use"
        if populate and pages:
            try:
                self.mem.madvise(MADV_POPULATE_WRITE)
                self.residency = "resident"
            except OSError as exc:  # an old kernel: the UV's start line says so
                self.residency = f"on first use (MADV_POPULATE_WRITE: {exc.strerror})"
        self._view = memoryview(self.mem)  # the pool is never closed: frames are slices of it
        # frame numbers packed (4 bytes each, not an int object each), the next one to hand out last
        self._free = array("i", range(pages - 1, -1, -1))
        self._dirty = array("i")  # released, not yet scrubbed: neither free nor in use
        self.reserved = 0
        self.wake_scrubber = lambda: None  # the UV's background scrubber (scrub_in_background)

    @property
    def in_use(self) -> int:
        return self.total - len(self._free) - len(self._dirty)

    @property
    def free(self) -> int:
        """Frames zeroed and ready to hand out."""
        return len(self._free)

    @property
    def scrubbing(self) -> int:
        """Frames released and waiting to be scrubbed."""
        return len(self._dirty)

    def reserve(self, n: int) -> bool:
        if self.reserved + n > self.total:
            return False
        self.reserved += n
        return True

    def unreserve(self, n: int) -> None:
        assert n <= self.reserved, "unreserving more than reserved"
        self.reserved -= n

    def alloc(self) -> int:
        """A zeroed frame (free frames are always zero; a released one is scrubbed first if no
        frame is free)."""
        return self.take(1)[0]

    def take(self, n: int) -> list[int]:
        """``n`` zeroed frames, the most recently freed first (released ones are scrubbed first
        if too few are free)."""
        if n <= 0:
            return []
        if n > len(self._free):
            self.scrub(n - len(self._free))
        if n > len(self._free):
            raise IndexError("secure pool exhausted")
        frames = self._free[-n:]
        del self._free[-n:]
        frames.reverse()
        return frames.tolist()

    def release(self, frame: int) -> None:
        """Give a frame back: it is scrubbed before anyone gets it again (by the background
        scrubber, or by alloc / take if they need it sooner)."""
        self._dirty.append(frame)
        self.wake_scrubber()

    def release_all(self, frames) -> None:
        """release() of each of ``frames``."""
        if frames:
            self._dirty.extend(frames)
            self.wake_scrubber()

    def scrub(self, n: int | None = None) -> int:
        """Zero up to ``n`` released frames (all of them: None) and free them; returns how many."""
        n = len(self._dirty) if n is None else min(n, len(self._dirty))
        if n <= 0:
            return 0
        frames = self._dirty[-n:]
        del self._dirty[-n:]
        for frame in frames:
            off = frame * PAGE_SIZE
            self.mem[off:off + PAGE_SIZE] = ZERO_PAGE
        self._free.extend(frames)
        return n

    def view(self, frame: int) -> memoryview:
        off = frame * PAGE_SIZE
        return self._view[off:off + PAGE_SIZE]

    def views(self, frames: list[int]) -> list[memoryview]:
        """The frames' memory in order, one view per run of consecutive frames."""
        out, start, prev = [], None, None
        for frame in frames:
            if start is None or frame != prev + 1:
                if start is not None:
                    out.append(self._view[start * PAGE_SIZE:(prev + 1) * PAGE_SIZE])
                start = frame
            prev = frame
        if start is not None:
            out.append(self._view[start * PAGE_SIZE:(prev + 1) * PAGE_SIZE])
        return out

    def ra(self, frame: int) -> int:
        return SECURE_RA_BASE + frame * PAGE_SIZE


NO_FRAME = -1


class NoSlot(LookupError):
    """A gfn in no memslot of the SVM, or a GPF record whose memslot went away (unregistered, or
    the SVM terminated) while a call that held it waited on the HV."""


class SlotPages:
    """One memslot's GPF records, packed: a state byte, a frame number (NO_FRAME: none) and a
    page-out version per page, 5 bytes a page (13 once one of its pages was paged out) instead of
    a Python object each (a 64 GiB guest has a million pages, and the UV's RSS bound is its pool
    + 64 MiB)."""

    __slots__ = ("base", "npages", "states", "frames", "_versions", "gone")

    def __init__(self, base: int, npages: int):
        self.base, self.npages, self.gone = base, npages, False
        self.states = bytearray([GpfState.GPF_UNBACKED]) * npages
        self.frames = array("i", [NO_FRAME]) * npages
        self._versions: array | None = None

    @property
    def versions(self) -> array:
        """Each page's page-out count (64 bits: no count a hostile HV forces wraps), made at the
        slot's first page-out or sealed page-in: a guest none of whose pages is ever paged out
        (every ESM that aborts) does not hold its 8 bytes a page."""
        if self._versions is None:
            self._versions = array("Q", [0]) * self.npages
        return self._versions

    def contains(self, gfn: int) -> bool:
        return self.base <= gfn < self.base + self.npages

    def all_in(self, idx: int, n: int, state: int) -> bool:
        return self.states.count(state, idx, idx + n) == n

    def first_not(self, state: int, start: int = 0, end: int | None = None) -> int | None:
        """Index of the first page from ``start`` to ``end`` not in ``state`` (None: all are)."""
        end = self.npages if end is None else end
        rest = self.states[start:end].lstrip(bytes([state]))
        return end - len(rest) if rest else None

    def used_frames(self) -> array:
        """The frames the slot holds, in an array: 4 bytes a frame, where a list of them is ~36
        (an int object each), 4.5 MiB at 8 GiB, which UV_SVM_TERMINATE added to the UV's peak RSS."""
        return array("i", (f for f in self.frames if f != NO_FRAME))

    def retire(self) -> array:
        """The slot is going away: its frames (to be released), and every record of it held by
        a call still running reads as gone (NoSlot) from now on, so no such call can reach a
        frame that is about to be someone else's."""
        frames = self.used_frames()
        self.gone = True
        self.frames = array("i")
        return frames


class _Packed:
    """A Gpf field kept in one of its slot's arrays (``empty``, if given, reads as None)."""

    def __init__(self, array_name: str, empty: int | None = None):
        self.array_name, self.empty = array_name, empty

    def __get__(self, gpf, owner=None):
        if gpf is None:
            return self
        if gpf._slot.gone:
            raise NoSlot(f"gfn {gpf.gfn}: its memslot went away")
        value = getattr(gpf._slot, self.array_name)[gpf._i]
        return None if self.empty is not None and value == self.empty else value

    def __set__(self, gpf, value) -> None:
        if gpf._slot.gone:
            raise NoSlot(f"gfn {gpf.gfn}: its memslot went away")
        getattr(gpf._slot, self.array_name)[gpf._i] = self.empty if value is None else value


class Gpf:
    """One GPF's record: a view of its slot's arrays (SlotPages) and of the SVM's sealing data,
    made on demand; reading or setting a field reads or sets the arrays."""

    __slots__ = ("_slot", "_i", "_svm", "gfn")

    def __init__(self, svm: "Svm", slot: SlotPages, gfn: int):
        self._svm, self._slot, self._i, self.gfn = svm, slot, gfn - slot.base, gfn

    state = _Packed("states")
    frame = _Packed("frames", empty=NO_FRAME)  # None: no pool frame
    version = _Packed("versions")  # page-out count: bound into the AAD, so an older ciphertext never decrypts

    @property
    def sealing(self) -> tuple[bytes, bytes]:
        """(nonce, tag) of the page's latest ciphertext, kept only while it is paged out."""
        return self._svm.sealed.get(self.gfn, (b"", b""))

    @sealing.setter
    def sealing(self, value: tuple[bytes, bytes] | None) -> None:
        if value is None:
            self._svm.sealed.pop(self.gfn, None)
        else:
            self._svm.sealed[self.gfn] = value


@dataclass
class Svm:
    lpid: int
    owner: str  # identity of the guest that made UV_ESM
    state: int = SvmState.SVM_ACTIVE
    slots: dict[int, SlotPages] = field(default_factory=dict)  # slotid -> its pages
    sealed: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # gfn -> (nonce, tag), paged out
    key: bytes = field(default_factory=lambda: entropy.token_bytes(32))  # AES-256-GCM
    nonce_prefix: bytes = field(default_factory=lambda: entropy.token_bytes(4))
    nonce_counter: int = 0
    reserved: int = 0
    abort_issued_ns: int = 0
    # the ESM context's token (the vCPU's `sc 2`): its H_SVM_INIT_START and H_SVM_INIT_ABORT carry
    # it, and every resume it causes, so the vCPU takes exactly one
    token: int = field(default_factory=lambda: int.from_bytes(entropy.token_bytes(8), "big") or 1)
    created_ns: int = field(default_factory=clock.wall_ns)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    destroyed: bool = False
    esm_task: Any = None  # the ESM context (esm.py) while it runs
    unanswered: tuple[str, int] | None = None  # (hcall, first attempt ns) while hv.hcall_until_answered asks

    def pages_of(self, gfn: int) -> SlotPages | None:
        """The pages of the slot holding ``gfn`` (None: no slot does)."""
        for slot in self.slots.values():
            if slot.contains(gfn):
                return slot
        return None

    def in_slots(self, gpa: int) -> bool:
        return self.pages_of(gfn_of(gpa)) is not None

    def slots_in_order(self) -> list[SlotPages]:
        """The slots there are now, by base gfn."""
        return sorted(self.slots.values(), key=lambda s: s.base)

    def gfns(self):
        """Every gfn of every slot, in ascending order (of the slots there are when it starts)."""
        for slot in self.slots_in_order():
            yield from range(slot.base, slot.base + slot.npages)

    def gpf(self, gfn: int) -> Gpf:
        """The GPF record of a gfn inside a slot (UNBACKED until the page is first used);
        NoSlot outside every slot."""
        slot = self.pages_of(gfn)
        if slot is None:
            raise NoSlot(f"gfn {gfn} is in no memslot of SVM {self.lpid}")
        return Gpf(self, slot, gfn)

    def gfns_in(self, *states: int) -> list[int]:
        """Every gfn whose GPF is in one of ``states``, in order within each slot."""
        return [slot.base + i for slot in self.slots.values()
                for i, st in enumerate(slot.states) if st in states]

    def count(self, state: int) -> int:
        return sum(slot.states.count(state) for slot in self.slots.values())

    @property
    def frames(self) -> int:
        return sum(slot.npages - slot.frames.count(NO_FRAME) for slot in self.slots.values())


SCRUB_STEP = 64  # frames (4 MiB) the background scrubber zeroes between two turns of the loop


async def scrub_in_background(pool: SecurePool) -> None:
    """Zero released frames while the UV has nothing better to do; runs for the UV's life."""
    wake = asyncio.Event()
    pool.wake_scrubber = wake.set
    while True:
        await wake.wait()
        wake.clear()
        while pool.scrub(SCRUB_STEP):
            await asyncio.sleep(0)


def _aad(lpid: int, gfn: int, version: int) -> bytes:
    return struct.pack(">IQQ", lpid, gfn, version)


class UvState:
    """Every SVM of this UV and the pool they draw from. All GPF transitions go through the
    helpers below; nothing else assigns ``Gpf.state`` or ``Svm.state``."""

    def __init__(self, pool_pages: int, populate_pool: bool = True, hv_memory_dir: str | None = None):
        self.pool = SecurePool(pool_pages, populate_pool)
        self.svms: dict[int, Svm] = {}
        self.terminated: deque[tuple[int, str]] = deque(maxlen=TERMINATED_KEPT)  # (lpid, owner), oldest first
        self.boot_id = entropy.token_hex(8)  # a restarted UV is a new machine: nothing survives
        self.hvmem = HvMemory(hv_memory_dir)  # HV RAM files the HV shared, per SVM and slot

    def svm_state(self, lpid: int) -> int:
        svm = self.svms.get(lpid)
        return SvmState.SVM_ABSENT if svm is None else SvmState(svm.state)

    # -- SVM life cycle ------------------------------------------------------------------------

    def create_svm(self, lpid: int, owner: str) -> Svm:
        assert lpid not in self.svms
        svm = self.svms[lpid] = Svm(lpid=lpid, owner=owner)
        return svm

    def set_svm_state(self, svm: Svm, state: int) -> None:
        svm.state = state
        if state == SvmState.SVM_ABORT:
            svm.abort_issued_ns = clock.wall_ns()

    def destroy_svm(self, lpid: int) -> int:
        """UV_SVM_TERMINATE's work: scrub and free every frame, return the reservation, forget
        slots, GPFs and key. Returns the number of frames freed."""
        svm = self.svms.pop(lpid, None)
        if svm is None:
            return 0
        self.hvmem.drop(lpid)
        freed = 0
        leak = faults.mutant("uv-terminate-keeps-pages")
        for slot in svm.slots.values():
            frames = slot.retire() if not leak else []
            self.pool.release_all(frames)
            freed += len(frames)
        if not leak:
            self.pool.unreserve(svm.reserved)
        svm.sealed.clear()
        svm.slots.clear()
        svm.reserved = 0
        svm.key = b""
        svm.destroyed = True
        self.terminated.append((lpid, svm.owner))
        return freed

    def terminated_lpids(self, owner: str | None = None) -> list[int]:
        """The lpids of the last TERMINATED_KEPT SVMs terminated, in order (only ``owner``'s, if
        given)."""
        return [lpid for lpid, who in self.terminated if owner is None or who == owner]

    # -- memslots ------------------------------------------------------------------------------

    def add_slot(self, svm: Svm, slotid: int, base_gfn: int, npages: int) -> bool:
        if not self.pool.reserve(npages):
            return False
        svm.slots[slotid] = SlotPages(base_gfn, npages)
        svm.reserved += npages
        return True

    def remove_slot(self, svm: Svm, slotid: int) -> None:
        self.hvmem.drop(svm.lpid, slotid)
        slot = svm.slots.pop(slotid)
        self.pool.release_all(slot.retire())
        for gfn in [g for g in svm.sealed if slot.contains(g)]:
            del svm.sealed[gfn]
        svm.reserved -= slot.npages
        self.pool.unreserve(slot.npages)

    # -- GPF transitions -----------------------------------------------------------------------

    def _take_frame(self, gpf: Gpf) -> int:
        if gpf.frame is None:
            gpf.frame = self.pool.alloc()
        return gpf.frame

    def _drop_frame(self, gpf: Gpf) -> None:
        if gpf.frame is not None:
            self.pool.release(gpf.frame)
            gpf.frame = None

    def forget_page(self, gpf: Gpf) -> None:
        """-> GPF_UNBACKED, its frame back to the pool (only the mutants that give pages up early
        use it: the design keeps an aborting SVM's pages until UV_SVM_TERMINATE)."""
        self._drop_frame(gpf)
        gpf.state = GpfState.GPF_UNBACKED

    def mark_secure(self, gpf: Gpf, data) -> None:
        """-> GPF_SECURE holding ``data``: bytes, a page source that fills the frame itself
        (pefsim/dataplane.py: one copy, straight into the pool), or None for zeros."""
        frame = self._take_frame(gpf)
        view = self.pool.view(frame)
        if data is None:
            view[:] = ZERO_PAGE
        elif hasattr(data, "fill"):
            data.fill(view)
        else:
            view[:] = data
        gpf.state = GpfState.GPF_SECURE

    def mark_secure_run(self, svm: Svm, gfn: int, n: int) -> list[memoryview]:
        """``n`` GPFs from ``gfn``, each UNBACKED without a frame -> GPF_SECURE, each on a fresh
        frame; returns the frames (SecurePool.views) for the caller to fill before it releases
        the SVM's lock."""
        slot = svm.pages_of(gfn)
        frames = self.pool.take(n)
        i = gfn - slot.base
        slot.frames[i:i + n] = array("i", frames)
        slot.states[i:i + n] = bytes([GpfState.GPF_SECURE]) * n
        return self.pool.views(frames)

    def page_out(self, svm: Svm, gfn: int, gpf: Gpf) -> bytes:
        """GPF_SECURE -> GPF_PAGEDOUT: encrypt under the SVM key, free the frame, hand back the
        ciphertext (the tag stays here)."""
        svm.nonce_counter += 1
        gpf.version += 1
        nonce = svm.nonce_prefix + struct.pack(">Q", svm.nonce_counter)
        sealed = AESGCM(svm.key).encrypt(nonce, bytes(self.pool.view(gpf.frame)),
                                         _aad(svm.lpid, gfn, gpf.version))
        gpf.sealing = nonce, sealed[PAGE_SIZE:]
        self._drop_frame(gpf)
        gpf.state = GpfState.GPF_PAGEDOUT
        return sealed[:PAGE_SIZE]

    def page_in_sealed(self, svm: Svm, gfn: int, gpf: Gpf, ciphertext: bytes) -> bool:
        """GPF_PAGEDOUT -> GPF_SECURE if the ciphertext is the latest one the UV produced for the
        page and untouched; otherwise nothing changes and the caller answers U_P3."""
        from cryptography.exceptions import InvalidTag

        nonce, tag = gpf.sealing
        if not nonce:
            return False  # no ciphertext of this page is outstanding
        try:
            plain = AESGCM(svm.key).decrypt(nonce, bytes(ciphertext) + tag, _aad(svm.lpid, gfn, gpf.version))
        except InvalidTag:
            return False
        self.mark_secure(gpf, plain)
        gpf.sealing = None  # only once the page is back: a pool with no frame left can be retried
        return True

    def mark_sharing(self, gpf: Gpf) -> None:
        gpf.state = GpfState.GPF_HV_SHARING

    def mark_shared(self, gpf: Gpf) -> None:
        """-> GPF_SHARED. A page being shared (GPF_HV_SHARING) keeps its secure frame, untouched,
        until the share call has shared every page (``drop_kept_frame``: scrubbed and freed) or
        fails (``put_back`` on it), so a failed UV_SHARE_PAGE leaves the page as it was. Any other
        page (a shared one refaulted) has its frame, if any, scrubbed and freed."""
        if gpf.state != GpfState.GPF_HV_SHARING:
            self._drop_frame(gpf)
        gpf.state = GpfState.GPF_SHARED

    def drop_kept_frame(self, gpf: Gpf) -> None:
        """The frame a shared page kept for its share call (mark_shared), scrubbed and freed."""
        if gpf.state in (GpfState.GPF_SHARED, GpfState.GPF_SHARED_INV):
            self._drop_frame(gpf)

    def put_back(self, gpf: Gpf, state: int, content: bytes | None = None) -> None:
        """A page a failed call changed, as it was before: ``state``. GPF_SECURE keeps the frame
        it has (the share kept it), with ``content`` written back if given (an unshare at the HV
        zeroed it meanwhile), or, if the HV made the UV give that frame up, a zeroed one; any
        other state has no frame."""
        if state == GpfState.GPF_SECURE:
            frame = self._take_frame(gpf)
            if content is not None:
                self.pool.view(frame)[:] = content
        else:
            self._drop_frame(gpf)
        gpf.state = state

    def mark_shared_inv(self, gpf: Gpf) -> None:
        gpf.state = GpfState.GPF_SHARED_INV

    def mark_unsharing(self, gpf: Gpf) -> None:
        gpf.state = GpfState.GPF_HV_UNSHARING
