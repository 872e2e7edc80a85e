"""Hypervisor state: VMs, their secure_guest byte, memslots, per-GFN states and guest RAM.

VM states (VmState, derived from kvm->arch.secure_guest)
---------------------------------------------------------

  VM_NORMAL     secure_guest == 0
  VM_TRANSIENT  INIT_START                (H_SVM_INIT_START done, ESM in progress)
  VM_SECURE     INIT_START | INIT_DONE
  VM_ABORTING   INIT_ABORT                (only with abort_return = uv, the v10 proposal: cleared
                                           the next time the vCPU enters the HV)
  VM_ABSENT     no VM with the lpid (pefsim's name for "not found")

  call                 NORMAL            TRANSIENT                 SECURE
  H_SVM_INIT_START     -> TRANSIENT      re-runs (unguarded)       -> TRANSIENT (unguarded)
  H_SVM_INIT_DONE      H_UNSUPPORTED     sweep, -> SECURE          H_SUCCESS again
  H_SVM_INIT_ABORT     H_UNSUPPORTED     page out, -> NORMAL,      H_STATE
                                         H_PARAMETER to the guest
  H_SVM_PAGE_IN/OUT    H_UNSUPPORTED     allowed                   allowed
  ResetVm (SVM_OFF)    no-op             teardown -> NORMAL        teardown -> NORMAL
  DestroyVm            -                 UV_SVM_TERMINATE          UV_SVM_TERMINATE

  The exact table, with the caller and argument checks, is calltable.py.

GFN states (GfnState; KVMPPC_GFN_* since 5.9), one byte per page in ``slot-<id>.gfn``
------------------------------------------------------------------------------------

  GFN_NORMAL      ordinary HV page (content in ``slot-<id>.ram``)
  GFN_SECURE_IN   the data lives in the UV; the HV page is zeroed (the kernel frees it)
  GFN_SECURE_OUT  the HV page holds the UV's AES-GCM ciphertext
  GFN_SHARED      a page both sides use; zeroed when it becomes shared (the UV's zeroing)

  event                         NORMAL       SECURE_IN           SECURE_OUT       SHARED
  H_SVM_PAGE_IN(0)              ->SECURE_IN  H_PARAMETER         ->SECURE_IN      ->SECURE_IN
  H_SVM_PAGE_IN(SHARED)         ->SHARED     ->SHARED (no        ->SHARED         ->SHARED
                                             page-out: dropped)
  H_SVM_PAGE_OUT / host touch   no-op        ->SECURE_OUT        no-op            no-op
  INIT_DONE sweep               ->SECURE_IN  -                   -                -
  INIT_ABORT (drop_pages)       -            UV_PAGE_OUT->NORMAL ->NORMAL         ->NORMAL
  SVM_OFF / memslot delete      -            ->NORMAL (dropped)  ->NORMAL         ->NORMAL

Durability (survives kill -9). Guest RAM is a file-backed MAP_SHARED mmap per memslot under the
data directory, 64 KiB pages; the GFN states sit beside it in a second mmapped file; ``vm.json``
(written atomically) holds the VM's metadata, its secure_guest byte and the journal of an abort in
progress. Writes are ordered so that a kill between any two of them leaves a state the restarted
HV can finish from: a GFN is marked secure before its HV page is scrubbed; a page given back is
written before its GFN is marked normal; secure_guest = 0 is recorded together with the abort's
next phase; a secure page-out (H_SVM_PAGE_OUT, host touch) is recorded as pending before the
UV_PAGE_OUT and cleared after the ciphertext is written. ``HvState.load`` rebuilds every VM at start.

Locking: ``Vm.lock`` is the per-VM uvmem_lock: every page-in, page-out, share, drop and any change
of a GFN state happens under it. It is held across ucalls to the UV (which never call back into
the HV) but never across a call into the guest.
"""
from __future__ import annotations

import asyncio
import json
import mmap
import os
import re
import shutil
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pefsim.abi import HV_RA_BASE, PAGE_SIZE, GfnState, SecureGuest, VmState, gfn_of, gpa_of
from pefsim.dataplane import MAX_FRAME_PAGES

ZERO_PAGE = bytes(PAGE_SIZE)
MAX_SLOT_ID = 0xFFFF
IN_PLACE = object()  # page data the UV already wrote into the HV's page (shared memory)
_ZERO_RUN = MAX_FRAME_PAGES  # the most pages one batch scrubs at once
_ZEROS = memoryview(bytes(_ZERO_RUN * PAGE_SIZE))  # never written: it reads as the zero page, no memory


def _zeros(n: int):
    return _ZEROS[:n * PAGE_SIZE] if n <= _ZERO_RUN else bytes(n * PAGE_SIZE)


def vm_state_of(secure_guest: int) -> VmState:
    if secure_guest == 0:
        return VmState.VM_NORMAL
    if secure_guest & SecureGuest.KVMPPC_SECURE_INIT_START:
        if secure_guest & SecureGuest.KVMPPC_SECURE_INIT_DONE:
            return VmState.VM_SECURE
        return VmState.VM_TRANSIENT
    return VmState.VM_ABORTING


class Slot:
    """One memslot: its RAM and its GFN-state bytes, each a file-backed shared mapping."""

    def __init__(self, directory: Path, slot_id: int, base_gfn: int, npages: int, ra_base: int,
                 shared: bool = False):
        self.slot_id, self.base_gfn, self.npages, self.ra_base = slot_id, base_gfn, npages, ra_base
        self.shared = shared  # the UV opened this slot's RAM file (pefsim/dataplane.py)
        self.ram_path = directory / f"slot-{slot_id}.ram"
        self.gfn_path = directory / f"slot-{slot_id}.gfn"
        self.ram = _map(self.ram_path, npages * PAGE_SIZE)
        self.states = _map(self.gfn_path, npages)

    def close(self) -> None:
        self.ram.close()
        self.states.close()

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def page(self, idx: int) -> memoryview:
        return self.run(idx, 1)

    def state(self, idx: int) -> GfnState:
        return GfnState(self.states[idx])

    def ra(self, idx: int) -> int:
        return self.ra_base + idx * PAGE_SIZE

    def gpa(self, idx: int) -> int:
        return gpa_of(self.base_gfn + idx)

    def count(self, state: int) -> int:
        return self.states[:].count(bytes([state]))

    def run(self, idx: int, n: int) -> memoryview:
        """The RAM of ``n`` pages from ``idx``, back to back."""
        return memoryview(self.ram)[idx * PAGE_SIZE:(idx + n) * PAGE_SIZE]

    def all_in(self, idx: int, n: int, state: int) -> bool:
        """Whether the ``n`` GFNs from ``idx`` are all in ``state``."""
        return self.states[idx:idx + n].count(state) == n

    def runs_in(self, state: int):
        """(idx, n) of every run of consecutive GFNs in ``state``."""
        for m in re.finditer(re.escape(bytes([state])) + b"+", self.states[:]):
            yield m.start(), m.end() - m.start()


def _map(path: Path, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED)
    finally:
        os.close(fd)


@dataclass
class Vm:
    lpid: int
    name: str
    directory: Path
    vcpu_endpoint: str
    secure_capable: bool
    secure_guest: int = 0
    running: bool = False
    slots: dict[int, Slot] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # journal of an H_SVM_INIT_ABORT in progress: token, srr0, trace_ns, phase
    # ("page-out" -> "terminate" -> "resume"); None when no abort is under way
    abort: dict | None = None
    had_session: bool = False  # a VMM held a session: after a restart it must come back
    failed: str = ""  # why the HV failed the VM (e.g. "uv-reset")
    owner: str = ""  # identity of the guest whose VMM created it ("" when an operator did)
    # GFNs whose UV_PAGE_OUT (H_SVM_PAGE_OUT, host touch) was asked and whose answer is not yet
    # recorded: written before the ucall, so a restarted HV asks again (hcalls/page.py)
    pageouts_pending: set[int] = field(default_factory=set)
    # in memory only
    abort_task: Any = None
    sessions: int = 0
    session_deadline: float = 0.0
    destroyed: bool = False
    dying: bool = False  # a destroy is waiting for the VM's lock: retries give up
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set when destroyed

    @property
    def state(self) -> VmState:
        return vm_state_of(self.secure_guest)

    def locate(self, gpa: int) -> tuple[Slot, int] | None:
        gfn = gfn_of(gpa)
        for slot in self.slots.values():
            if slot.contains(gfn):
                return slot, gfn - slot.base_gfn
        return None

    def pages(self):
        """Every (slot, index) of the VM, slot by slot."""
        for slot in sorted(self.slots.values(), key=lambda s: s.base_gfn):
            for idx in range(slot.npages):
                yield slot, idx

    @property
    def npages(self) -> int:
        return sum(s.npages for s in self.slots.values())

    def gfn_counts(self) -> dict[str, int]:
        return {st.name: sum(s.count(st) for s in self.slots.values()) for st in GfnState}


class HvState:
    """Every VM of this HV. GFN states and secure_guest change only through the helpers below."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.vms: dict[int, Vm] = {}
        self.next_lpid = 1
        self.next_ra = HV_RA_BASE
        self.boot_id = secrets.token_hex(8)
        self.recovered = 0

    def load(self) -> list[Vm]:
        """Rebuild every VM from the data directory (after a restart). A directory without a
        readable vm.json is a VM whose creation never finished: removed."""
        for directory in sorted(self.data_dir.glob("vm-*")):
            try:
                meta = json.loads((directory / "vm.json").read_text())
            except (OSError, ValueError):
                shutil.rmtree(directory, ignore_errors=True)
                continue
            vm = Vm(lpid=meta["lpid"], name=meta["name"], directory=directory,
                    vcpu_endpoint=meta["vcpu_endpoint"], secure_capable=meta["secure_capable"],
                    secure_guest=meta["secure_guest"], abort=meta.get("abort"),
                    had_session=meta.get("had_session", False), failed=meta.get("failed", ""),
                    owner=meta.get("owner", ""), pageouts_pending=set(meta.get("pageouts_pending", [])))
            for s in meta["slots"]:
                vm.slots[s["slot_id"]] = Slot(directory, s["slot_id"], s["base_gfn"], s["npages"], s["ra_base"],
                                              s.get("shared", False))
                self.next_ra = max(self.next_ra, s["ra_base"] + s["npages"] * PAGE_SIZE)
            self.vms[vm.lpid] = vm
            self.next_lpid = max(self.next_lpid, vm.lpid + 1)
        self.recovered = len(self.vms)
        return list(self.vms.values())

    @property
    def uv_boot_file(self) -> Path:
        return self.data_dir / "uv.json"

    def known_uv_boot_id(self) -> str:
        try:
            return json.loads(self.uv_boot_file.read_text())["boot_id"]
        except (OSError, ValueError, KeyError):
            return ""

    def remember_uv_boot_id(self, boot_id: str) -> None:
        tmp = self.data_dir / "uv.json.tmp"
        tmp.write_text(json.dumps({"boot_id": boot_id}))
        os.replace(tmp, self.uv_boot_file)

    def vm_state(self, lpid: int | None) -> VmState:
        vm = self.vms.get(lpid)
        return VmState.VM_ABSENT if vm is None else vm.state

    # -- VMs and slots -------------------------------------------------------------------------

    @property
    def lpid_file(self) -> Path:
        return self.data_dir / "next-lpid"

    def create_vm(self, name: str, vcpu_endpoint: str, secure_capable: bool, owner: str = "") -> Vm:
        """A new VM. lpids are never reused by this data directory, even across restarts."""
        try:
            self.next_lpid = max(self.next_lpid, int(self.lpid_file.read_text()))
        except (OSError, ValueError):
            pass
        lpid = self.next_lpid
        self.next_lpid += 1
        tmp = self.data_dir / "next-lpid.tmp"
        tmp.write_text(str(self.next_lpid))
        os.replace(tmp, self.lpid_file)
        directory = self.data_dir / f"vm-{lpid}"
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        vm = self.vms[lpid] = Vm(lpid=lpid, name=name, directory=directory,
                                 vcpu_endpoint=vcpu_endpoint, secure_capable=secure_capable, owner=owner)
        return vm

    def add_slot(self, vm: Vm, slot_id: int, base_gfn: int, npages: int) -> Slot:
        slot = Slot(vm.directory, slot_id, base_gfn, npages, self.next_ra)
        self.next_ra += npages * PAGE_SIZE
        vm.slots[slot_id] = slot
        self.save(vm)
        return slot

    def remove_slot(self, vm: Vm, slot_id: int) -> None:
        slot = vm.slots.pop(slot_id)
        slot.close()
        slot.ram_path.unlink(missing_ok=True)
        slot.gfn_path.unlink(missing_ok=True)
        self.save(vm)

    def destroy_vm(self, vm: Vm) -> None:
        vm.destroyed = True
        for slot in vm.slots.values():
            slot.close()
        self.vms.pop(vm.lpid, None)
        shutil.rmtree(vm.directory, ignore_errors=True)

    def save(self, vm: Vm) -> None:
        """Write the VM's metadata (atomically) next to its RAM."""
        meta = {"lpid": vm.lpid, "name": vm.name, "vcpu_endpoint": vm.vcpu_endpoint,
                "secure_capable": vm.secure_capable, "secure_guest": vm.secure_guest,
                "abort": vm.abort, "had_session": vm.had_session, "failed": vm.failed, "owner": vm.owner,
                "pageouts_pending": sorted(vm.pageouts_pending),
                "slots": [{"slot_id": s.slot_id, "base_gfn": s.base_gfn, "npages": s.npages,
                           "ra_base": s.ra_base, "shared": s.shared} for s in vm.slots.values()]}
        tmp = vm.directory / "vm.json.tmp"
        tmp.write_text(json.dumps(meta, sort_keys=True))
        os.replace(tmp, vm.directory / "vm.json")

    # -- secure_guest --------------------------------------------------------------------------

    def set_secure_guest(self, vm: Vm, value: int, abort: dict | None | bool = False) -> None:
        """Set secure_guest (and, if given, the abort journal) in one durable write."""
        vm.secure_guest = value
        if abort is not False:
            vm.abort = abort
        self.save(vm)

    def set_abort(self, vm: Vm, abort: dict | None) -> None:
        vm.abort = abort
        self.save(vm)

    # -- GFN transitions -----------------------------------------------------------------------

    @staticmethod
    def _set(slot: Slot, idx: int, state: int) -> None:
        slot.states[idx] = state

    def mark_secure_in(self, slot: Slot, idx: int) -> None:
        """-> GFN_SECURE_IN: the data now lives in the UV; the HV page is scrubbed (after the
        state is recorded, so a kill in between never leaves a normal GFN without its data)."""
        self.mark_secure_in_run(slot, idx, 1)

    def mark_secure_in_run(self, slot: Slot, idx: int, n: int) -> None:
        """mark_secure_in for ``n`` GFNs from ``idx`` (the states first, then the scrub)."""
        slot.states[idx:idx + n] = bytes([GfnState.GFN_SECURE_IN]) * n
        slot.run(idx, n)[:] = _zeros(n)

    def mark_secure_out(self, slot: Slot, idx: int, ciphertext) -> None:
        """-> GFN_SECURE_OUT: the HV page holds the ciphertext the UV handed out (or wrote in
        place, IN_PLACE)."""
        if ciphertext is not IN_PLACE:
            slot.page(idx)[:] = ciphertext
        self._set(slot, idx, GfnState.GFN_SECURE_OUT)

    def mark_shared(self, slot: Slot, idx: int) -> None:
        """-> GFN_SHARED on a fresh, zeroed page."""
        slot.page(idx)[:] = ZERO_PAGE
        self._set(slot, idx, GfnState.GFN_SHARED)

    def mark_normal(self, slot: Slot, idx: int, data: bytes | None = None, scrub: bool = False) -> None:
        """-> GFN_NORMAL, holding ``data`` if given (a page given back by the UV); ``scrub``
        zeroes it instead (secure content dropped without page-out)."""
        if data is IN_PLACE:
            pass
        elif data is not None:
            slot.page(idx)[:] = data
        elif scrub:
            slot.page(idx)[:] = ZERO_PAGE
        self._set(slot, idx, GfnState.GFN_NORMAL)

    def mark_normal_run(self, slot: Slot, idx: int, pages: list) -> None:
        """mark_normal for ``len(pages)`` GFNs from ``idx``, each given back by the UV (its data,
        or IN_PLACE): every page written before the GFNs are marked normal."""
        for i, data in enumerate(pages):
            if data is not IN_PLACE:
                slot.page(idx + i)[:] = data
        slot.states[idx:idx + len(pages)] = bytes([GfnState.GFN_NORMAL]) * len(pages)

    def restore(self, slot: Slot, idx: int, state: int) -> None:
        """Put a GFN back in the state it had before a transition that the UV refused."""
        self._set(slot, idx, state)
