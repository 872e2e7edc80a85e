"""Hypervisor state: VMs, their secure_guest byte, memslots, per-GFN states and guest RAM.

VM states (VmState, derived from kvm->arch.secure_guest)
---------------------------------------------------------

  VM_NORMAL     secure_guest == 0
  VM_TRANSIENT  INIT_START                (H_SVM_INIT_START done, ESM in progress)
  VM_SECURE     INIT_START | INIT_DONE
  VM_ABORTING   INIT_ABORT                (v10 only, and never seen by a call: v10 clears it on the
                                           abort hcall's own exit path; a state of the flags,
                                           kept for completeness and for vm.json files that hold it)
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

Durability (survives kill -9). Guest RAM is a file per memslot under the data directory, 64 KiB
pages, read and written with pread/pwrite (Slot: never mapped); the GFN states sit beside it in an
mmapped file; ``vm.json``
(written atomically) holds the VM's metadata, its secure_guest byte and the journal of an abort in
progress. Writes are ordered so that a kill between any two of them leaves a state the restarted
HV can finish from: a GFN is marked secure before its HV page is scrubbed; a page given back is
written before its GFN is marked normal; secure_guest = 0 is recorded together with the abort's
next phase; a secure page-out (H_SVM_PAGE_OUT, host touch) is recorded as pending before the
UV_PAGE_OUT and cleared after the ciphertext is written. ``HvState.load`` rebuilds every VM at start.

Power cuts and full disks. ``vm.json``, ``next-lpid`` and ``uv.json`` are replaced durably
(write_durably: temporary, fsync, rename, fsync of the directory), so a power cut leaves the old
or the new file, never an empty one. A slot's files have their blocks reserved when created
(posix_fallocate, then fsync): a store into guest memory never meets a hole on a full disk, which
would be a SIGBUS killing the HV. ``load`` trusts nothing it reads: a VM whose files fail a check
is quarantined (moved under ``quarantine/``, kept, logged, its lpid never reused) and the others
load. docs/recovery.md, "What survives a power cut".

Locking: ``Vm.lock`` is the per-VM uvmem_lock: every page-in, page-out, share, drop and any change
of a GFN state happens under it. It is held across ucalls to the UV (which never call back into
the HV) but never across a call into the guest.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import mmap
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pefsim import entropy
from pefsim import clock, faults
from pefsim.abi import HV_RA_BASE, PAGE_SIZE, GfnState, SecureGuest, VmState, gfn_of, gpa_of
from pefsim.dataplane import MAX_FRAME_PAGES

log = logging.getLogger("pefsim.hv")

ZERO_PAGE = bytes(PAGE_SIZE)
MAX_SLOT_ID = 0xFFFF
IN_PLACE = object()  # page data the UV already wrote into the HV's page (shared memory)
# the most pages one pwritev scrubs (IOV_MAX buffers): each is ZERO_PAGE, whose 64 KiB stay in
# the CPU's cache (10.5 GB/s here, against 8 for one buffer of zeros as long as the run)
_ZERO_RUN = min(MAX_FRAME_PAGES, os.sysconf("SC_IOV_MAX"))
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# left free by every slot reservation: the space the HV's metadata writes need (each vm.json save
# makes a new file before the old one goes, the nonce files of shared memory), so guests filling
# the disk with memslots cannot make those writes fail
SPACE_HEADROOM = 1 << 20
QUARANTINE = "quarantine"  # under the data directory: VMs whose files failed load's checks
QUARANTINE_REASONS = ("no-vm-json", "bad-vm-json", "bad-slots", "bad-ram", "bad-gfn", "no-space", "io-error",
                      "load-error")
SECURE_GUEST_VALUES = frozenset({
    SecureGuest.SECURE_GUEST_NONE, SecureGuest.KVMPPC_SECURE_INIT_START,
    SecureGuest.KVMPPC_SECURE_INIT_START | SecureGuest.KVMPPC_SECURE_INIT_DONE,
    SecureGuest.KVMPPC_SECURE_INIT_ABORT})  # what vm_state_of's states are made of, nothing else
_GFN_BYTES = bytes(GfnState)


class NoSpace(OSError):
    """The data directory cannot hold what a VM asked for (a memslot's RAM and GFN-state files,
    with the headroom its metadata needs): answered ENOSPC, and nothing of it is left behind."""


ESM_RESET = -1  # Vm.esm_token after a ResetVm


def vm_state_of(secure_guest: int) -> VmState:
    if secure_guest == 0:
        return VmState.VM_NORMAL
    if secure_guest & SecureGuest.KVMPPC_SECURE_INIT_START:
        if secure_guest & SecureGuest.KVMPPC_SECURE_INIT_DONE:
            return VmState.VM_SECURE
        return VmState.VM_TRANSIENT
    return VmState.VM_ABORTING


class Slot:
    """One memslot: its RAM, a file the HV reads and writes with ``pread`` and ``pwrite``
    (``page``, ``run``, ``write``, ``write_run``, ``zero``), and its GFN-state bytes, a file-backed shared
    mapping.

    The RAM is not mapped. A store through a shared mapping of an ext4 file faults once per 4 KiB
    it first dirties (measured on these VMs: 512 KiB in 3-6 ms, ~120-170 MB/s, where one pwrite of
    it takes 0.1 ms, 5-6 GB/s), and every page read through a mapping stays in the HV's RSS (the
    whole guest, once a page-in stream has read it). The kernel's copies go through the same page
    cache, so a write is seen by the next read at once, and by a restarted HV and the UV's preadv
    alike."""

    def __init__(self, directory: Path, slot_id: int, base_gfn: int, npages: int, ra_base: int,
                 shared: bool = False):
        self.slot_id, self.base_gfn, self.npages, self.ra_base = slot_id, base_gfn, npages, ra_base
        self.shared = shared  # the UV opened this slot's RAM file (pefsim/dataplane.py)
        self.ram_path = directory / f"slot-{slot_id}.ram"
        self.gfn_path = directory / f"slot-{slot_id}.gfn"
        self.ram_fd = os.open(self.ram_path, os.O_RDWR)
        try:
            _check_size(self.ram_fd, self.ram_path, npages * PAGE_SIZE)
            fd = os.open(self.gfn_path, os.O_RDWR)
            try:
                self.states = _map(fd, self.gfn_path, npages)
            finally:
                os.close(fd)
        except BaseException:
            os.close(self.ram_fd)
            raise

    @classmethod
    def create(cls, directory: Path, slot_id: int, base_gfn: int, npages: int, ra_base: int) -> "Slot":
        """A new slot: its files made with every block reserved (posix_fallocate) and their size
        durable (fsync of each, then of the directory), so a store into guest memory never meets a
        hole on a full disk. On any failure (OSError ENOSPC when the disk cannot hold it) the files
        are removed again."""
        ram_path, gfn_path = directory / f"slot-{slot_id}.ram", directory / f"slot-{slot_id}.gfn"
        try:
            for path, size in ((ram_path, npages * PAGE_SIZE), (gfn_path, npages)):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(directory)
            return cls(directory, slot_id, base_gfn, npages, ra_base)
        except BaseException:
            ram_path.unlink(missing_ok=True)
            gfn_path.unlink(missing_ok=True)
            raise

    def unlink(self) -> None:
        """Close the slot and remove its files."""
        self.close()
        self.ram_path.unlink(missing_ok=True)
        self.gfn_path.unlink(missing_ok=True)

    def close(self) -> None:
        """Unmap the slot's states and close its RAM file (again is a no-op: a simulated crash
        closes every slot before the call it interrupted unwinds, closing its own)."""
        self.states.close()
        if self.ram_fd >= 0:
            fd, self.ram_fd = self.ram_fd, -1
            os.close(fd)

    def _check_run(self, idx: int, n: int) -> None:
        """ValueError unless the ``n`` pages from page ``idx`` lie within the slot."""
        if idx < 0 or n < 0 or idx + n > self.npages:
            raise ValueError(f"slot {self.slot_id}: {n} pages at page {idx} run past its {self.npages} pages")

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def page(self, idx: int) -> bytes:
        return self.run(idx, 1)

    def state(self, idx: int) -> GfnState:
        return GfnState(self.states[idx])

    def ra(self, idx: int) -> int:
        return self.ra_base + idx * PAGE_SIZE

    def gpa(self, idx: int) -> int:
        return gpa_of(self.base_gfn + idx)

    def count(self, state: int) -> int:
        return self.states[:].count(bytes([state]))

    def run(self, idx: int, n: int) -> bytes:
        """The RAM of ``n`` pages from ``idx``, back to back (read from the file)."""
        self._check_run(idx, n)
        want, offset = n * PAGE_SIZE, idx * PAGE_SIZE
        data = os.pread(self.ram_fd, want, offset)
        while len(data) < want:  # a regular file's reads are whole but for a signal
            more = os.pread(self.ram_fd, want - len(data), offset + len(data))
            if not more:
                raise OSError(errno.EIO, f"{self.ram_path}: shorter than its {self.npages} pages")
            data += more
        return data

    def write(self, idx: int, data) -> None:
        """Write ``data`` (whole pages, any buffer) into the RAM from page ``idx`` on."""
        self.write_run(idx, (data,))

    def write_run(self, idx: int, parts) -> None:
        """Write ``parts`` (buffers of whole pages) back to back into the RAM from page ``idx`` on,
        with one pwritev."""
        offset, want = idx * PAGE_SIZE, sum(memoryview(p).nbytes for p in parts)
        self._check_run(idx, -(-want // PAGE_SIZE))
        done = os.pwritev(self.ram_fd, parts, offset)
        if done < want:  # a regular file's writes are whole but for a signal or a full disk
            rest = memoryview(b"".join(parts))[done:]
            while rest:
                n = os.pwrite(self.ram_fd, rest, offset + done)
                if n == 0:
                    raise OSError(errno.EIO, f"{self.ram_path}: a write made no progress")
                rest, done = rest[n:], done + n

    def zero(self, idx: int, n: int) -> None:
        """Scrub ``n`` pages from ``idx`` (write zeros over them)."""
        self._check_run(idx, n)
        for first in range(idx, idx + n, _ZERO_RUN):
            self.write_run(first, [ZERO_PAGE] * min(_ZERO_RUN, idx + n - first))

    def all_in(self, idx: int, n: int, state: int) -> bool:
        """Whether the ``n`` GFNs from ``idx`` are all in ``state``."""
        return self.states[idx:idx + n].count(state) == n

    def runs_in(self, state: int):
        """(idx, n) of every run of consecutive GFNs in ``state``."""
        for m in re.finditer(re.escape(bytes([state])) + b"+", self.states[:]):
            yield m.start(), m.end() - m.start()


def _map(fd: int, path: Path, size: int) -> mmap.mmap:
    """A shared mapping of ``fd`` (the file at ``path``), which must be exactly ``size`` bytes
    (never resized: a short file is a damaged one, HvState.load's business, not pages to make up
    with zeros)."""
    _check_size(fd, path, size)
    return mmap.mmap(fd, size, mmap.MAP_SHARED)


def _check_size(fd: int, path: Path, size: int) -> None:
    """ValueError unless the file ``fd`` (at ``path``) is exactly ``size`` bytes: a short or long
    file is a damaged one, HvState.load's business, never pages to make up or to ignore."""
    found = os.fstat(fd).st_size
    if found != size:
        raise ValueError(f"{path}: {found} bytes, expected {size}")


def _reserve(path: Path) -> None:
    """Reserve every block of a file (a no-op for one already allocated; files from before
    reservation existed may be sparse). OSError ENOSPC when the disk cannot hold them."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def _no_space(what: str) -> NoSpace:
    """The NoSpace to raise (always errno ENOSPC: the errno the caller answers), logged: an
    operator learns the data directory is full from the HV's log, not only from the guest."""
    log.warning("%s: the data directory is full", what)
    return NoSpace(errno.ENOSPC, what)


def fsync_dir(directory: Path) -> None:
    """Make the entries of a directory durable (a rename, a new or removed file in it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str, who: str = "") -> None:
    """Replace ``path`` so that a kill or a power cut leaves the old content or the new, never an
    empty or torn file: a temporary written and fsync'd, renamed over, the directory fsync'd. A
    failure leaves the old file and no temporary; a kill between the two (failpoint
    ``hv.disk.before_rename``, for VM ``who``) leaves the old file and the temporary, which the
    next write replaces and loading ignores."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        faults.reach("hv.disk.before_rename", who)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class Damaged(Exception):
    """A VM's files failed a check of HvState.load: ``reason`` (one of QUARANTINE_REASONS, the
    metric's label) and what exactly is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Quarantined:
    """A VM HvState.load would not serve: why, and where its files are kept."""
    lpid: int
    reason: str
    detail: str
    path: Path


_REQUIRED = object()


def _field(meta: dict, key: str, kind: type, default: Any = _REQUIRED, where: str = "vm.json",
           reason: str = "bad-vm-json"):
    """``meta[key]`` if it is exactly a ``kind`` (a bool is no int here), ``default`` if absent
    and optional; else Damaged."""
    if key not in meta:
        if default is _REQUIRED:
            raise Damaged(reason, f"{where} has no {key!r}")
        return default
    value = meta[key]
    if type(value) is not kind:
        raise Damaged(reason, f"{where} {key!r} is {value!r}, not {kind.__name__}")
    return value


def _checked_meta(meta, lpid: int) -> dict:
    """vm.json's fields checked for type and range, with the defaults of those older versions
    did not write; raises Damaged saying which field is wrong."""
    if type(meta) is not dict:
        raise Damaged("bad-vm-json", f"vm.json holds a {type(meta).__name__}, not an object")
    out = {"lpid": _field(meta, "lpid", int), "name": _field(meta, "name", str),
           "vcpu_endpoint": _field(meta, "vcpu_endpoint", str),
           "secure_capable": _field(meta, "secure_capable", bool),
           "secure_guest": _field(meta, "secure_guest", int),
           "had_session": _field(meta, "had_session", bool, False), "failed": _field(meta, "failed", str, ""),
           "owner": _field(meta, "owner", str, ""), "request_id": _field(meta, "request_id", str, ""),
           "esm_token": _field(meta, "esm_token", int, 0),
           "pageouts_pending": _field(meta, "pageouts_pending", list, []),
           "abort": _checked_abort(meta.get("abort")), "slots": _checked_slots(_field(meta, "slots", list))}
    if out["lpid"] != lpid:
        raise Damaged("bad-vm-json", f"vm.json says lpid {out['lpid']}, in the directory of lpid {lpid}")
    if out["secure_guest"] not in SECURE_GUEST_VALUES:
        raise Damaged("bad-vm-json", f"secure_guest {out['secure_guest']} is no valid combination of flags")
    if not all(type(gfn) is int and gfn >= 0 for gfn in out["pageouts_pending"]):
        raise Damaged("bad-vm-json", f"pageouts_pending holds something other than GFNs: {out['pageouts_pending']!r}")
    return out


def _checked_abort(abort) -> dict | None:
    """The journal of an abort in progress (abort.py), checked."""
    from services.hypervisor.core.abort import PAGE_OUT, RESUME, TERMINATE  # abort.py imports this module

    if abort is None:
        return None
    if type(abort) is not dict:
        raise Damaged("bad-vm-json", f"the abort journal is {abort!r}, not an object")
    for key in ("token", "srr0", "trace_ns"):
        _field(abort, key, int, where="the abort journal")
    _field(abort, "r3", int, 0, where="the abort journal")  # the result the resume delivers (abort.py)
    _field(abort, "traceparent", str, "", where="the abort journal")  # its trace, continued after a restart
    if abort.get("phase") not in (PAGE_OUT, TERMINATE, RESUME):
        raise Damaged("bad-vm-json", f"the abort journal's phase is {abort.get('phase')!r}")
    return abort


def _checked_slots(slots: list) -> list[dict]:
    """vm.json's slots checked: ids in range and unique, GFN ranges and real addresses in range
    and non-overlapping."""
    out = []
    for n, s in enumerate(slots):
        where = f"vm.json slot #{n}"
        if type(s) is not dict:
            raise Damaged("bad-slots", f"{where} is {s!r}, not an object")
        slot = {key: _field(s, key, int, where=where, reason="bad-slots")
                for key in ("slot_id", "base_gfn", "npages", "ra_base")}
        slot["shared"] = _field(s, "shared", bool, False, where, "bad-slots")
        if not (0 <= slot["slot_id"] <= MAX_SLOT_ID and slot["base_gfn"] >= 0 and slot["npages"] >= 1
                and slot["ra_base"] >= HV_RA_BASE and slot["ra_base"] % PAGE_SIZE == 0):
            raise Damaged("bad-slots", f"{where} is out of range: {s}")
        out.append(slot)
    if len({s["slot_id"] for s in out}) != len(out):
        raise Damaged("bad-slots", f"slot ids repeat: {[s['slot_id'] for s in out]}")
    for key, unit in (("base_gfn", 1), ("ra_base", PAGE_SIZE)):
        spans = sorted((s[key], s[key] + s["npages"] * unit, s["slot_id"]) for s in out)
        for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
            if b_start < a_end:
                raise Damaged("bad-slots", f"slots {a} and {b} overlap ({key})")
    return out


def _file_size(path: Path, reason: str) -> int:
    """The size of a regular file, or Damaged (``reason``) when it is missing or no file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Damaged(reason, f"{path.name} is missing") from None
    except OSError as exc:
        raise Damaged("io-error", f"{path.name}: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Damaged(reason, f"{path.name} is not a regular file")
    return st.st_size


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
    request_id: str = ""  # the CreateVm's idempotency key (CreateVmRequest.request_id)
    # the token of the `sc 2` whose H_SVM_INIT_START this HV took (0: none yet; ESM_RESET: the VM
    # was reset since, its vCPU is in no `sc 2` of before): svm.h_svm_init_abort_exit reads it
    esm_token: int = 0
    # GFNs whose UV_PAGE_OUT (H_SVM_PAGE_OUT, host touch) was asked and whose answer is not yet
    # recorded: written before the ucall, so a restarted HV asks again (pages.py)
    pageouts_pending: set[int] = field(default_factory=set)
    # in memory only
    abort_task: Any = None
    abort_answer: Any = None  # asyncio.Future of the H_SVM_INIT_ABORT answer (abort.py)
    sessions: int = 0
    session_deadline: float = 0.0
    created_at: float = field(default_factory=clock.monotonic)  # this process's view: reset at load
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
        self.boot_id = entropy.token_hex(8)
        self.recovered = 0
        self.quarantined: list[Quarantined] = []  # by this start's load

    def load(self) -> list[Vm]:
        """Rebuild every VM from the data directory (after a restart), trusting nothing read:
        each VM's files are checked (_load_vm) and their blocks reserved; one that fails is
        quarantined (_quarantine) while the others load. Only a directory that provably never
        finished creation (neither vm.json nor slot files) is removed."""
        for entry in (self.data_dir / QUARANTINE).glob("vm-*"):
            if m := re.match(r"vm-(\d+)", entry.name):
                self.next_lpid = max(self.next_lpid, int(m[1]) + 1)
        found = []
        for directory in self.data_dir.glob("vm-*"):
            if (m := re.fullmatch(r"vm-(\d+)", directory.name)) and directory.is_dir():
                found.append((int(m[1]), directory))
            else:
                log.warning("%s is no VM directory of this HV: left alone", directory)
        for lpid, directory in sorted(found):
            self.next_lpid = max(self.next_lpid, lpid + 1)
            try:
                vm = self._load_vm(directory, lpid)
            except Damaged as exc:
                self._quarantine(directory, lpid, exc.reason, exc.detail)
                continue
            except Exception as exc:  # a bug here must cost this VM, not every VM of the HV
                log.exception("lpid %d: loading %s failed", lpid, directory)
                self._quarantine(directory, lpid, "load-error", repr(exc))
                continue
            if vm is None:
                log.info("%s: a VM whose creation never finished (no vm.json, no slot files): removed",
                         directory)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            self.vms[lpid] = vm
            for slot in vm.slots.values():
                self.next_ra = max(self.next_ra, slot.ra_base + slot.npages * PAGE_SIZE)
        self.recovered = len(self.vms)
        return list(self.vms.values())

    def _load_vm(self, directory: Path, lpid: int) -> Vm | None:
        """The VM kept in ``directory``, its slots mapped over reserved blocks; None for a creation
        that never finished. Raises Damaged saying what is wrong: vm.json unreadable or failing its
        schema (_checked_meta), slots overlapping (also another VM's real addresses), a RAM or
        GFN-state file missing or not exactly npages pages / bytes, a byte that is no GfnState,
        blocks that cannot be reserved."""
        try:
            text = (directory / "vm.json").read_bytes()
        except FileNotFoundError:
            if any(directory.glob("slot-*.ram")) or any(directory.glob("slot-*.gfn")):
                raise Damaged("no-vm-json", "vm.json is missing but slot files are there") from None
            return None
        except OSError as exc:
            raise Damaged("io-error", f"vm.json unreadable: {exc}") from None
        try:
            meta = json.loads(text)
        except ValueError as exc:
            raise Damaged("bad-vm-json", f"vm.json ({len(text)} bytes) is not JSON: {exc}") from None
        meta = _checked_meta(meta, lpid)
        for s in meta["slots"]:
            end = s["ra_base"] + s["npages"] * PAGE_SIZE
            for other in self.vms.values():
                for o in other.slots.values():
                    if s["ra_base"] < o.ra_base + o.npages * PAGE_SIZE and o.ra_base < end:
                        raise Damaged("bad-slots", f"slot {s['slot_id']}'s real addresses overlap lpid "
                                                   f"{other.lpid}'s slot {o.slot_id}")
        files = []
        for s in meta["slots"]:
            ram, gfn = directory / f"slot-{s['slot_id']}.ram", directory / f"slot-{s['slot_id']}.gfn"
            found = _file_size(ram, "bad-ram")
            if found != s["npages"] * PAGE_SIZE:
                raise Damaged("bad-ram", f"{ram.name} is {found} bytes, slot {s['slot_id']} has "
                                         f"{s['npages']} pages of {PAGE_SIZE}")
            found = _file_size(gfn, "bad-gfn")
            if found != s["npages"]:
                raise Damaged("bad-gfn", f"{gfn.name} is {found} bytes, slot {s['slot_id']} has {s['npages']} pages")
            try:
                states = gfn.read_bytes()
            except OSError as exc:
                raise Damaged("io-error", f"{gfn.name} unreadable: {exc}") from None
            if states.translate(None, _GFN_BYTES):
                idx = next(i for i, b in enumerate(states) if b not in _GFN_BYTES)
                raise Damaged("bad-gfn", f"{gfn.name}: byte {states[idx]} of page {idx} (gfn "
                                         f"{s['base_gfn'] + idx:#x}) is no GfnState")
            files += [ram, gfn]
        for path in files:
            try:
                _reserve(path)
            except OSError as exc:
                raise Damaged("no-space" if exc.errno in SPACE_ERRNOS else "io-error",
                              f"cannot reserve the blocks of {path.name}: {exc}") from None
        vm = Vm(lpid=lpid, name=meta["name"], directory=directory, vcpu_endpoint=meta["vcpu_endpoint"],
                secure_capable=meta["secure_capable"], secure_guest=meta["secure_guest"], abort=meta["abort"],
                had_session=meta["had_session"], failed=meta["failed"], owner=meta["owner"],
                request_id=meta["request_id"], esm_token=meta["esm_token"],
                pageouts_pending=set(meta["pageouts_pending"]))
        try:
            for s in meta["slots"]:
                vm.slots[s["slot_id"]] = Slot(directory, s["slot_id"], s["base_gfn"], s["npages"], s["ra_base"],
                                              s["shared"])
        except BaseException as exc:
            for slot in vm.slots.values():
                slot.close()
            if isinstance(exc, OSError):
                raise Damaged("io-error", f"cannot map the slot files: {exc}") from None
            raise
        return vm

    def _quarantine(self, directory: Path, lpid: int, reason: str, detail: str) -> None:
        """Keep a damaged VM out of service without losing anything: its directory moves under
        quarantine/ (stays where it is if even that fails: it is checked again at the next start),
        an ERROR line says what is wrong and where the files are, and its lpid stays taken."""
        root = self.data_dir / QUARANTINE
        dest, n = root / f"vm-{lpid}-{reason}", 1
        while dest.exists():
            dest, n = root / f"vm-{lpid}-{reason}.{n}", n + 1
        try:
            root.mkdir(exist_ok=True)
            os.rename(directory, dest)
            fsync_dir(root)
            fsync_dir(self.data_dir)
        except OSError as exc:
            log.error("lpid %d: cannot move %s to %s (%s): left where it is", lpid, directory, dest, exc)
            dest = directory
        self.quarantined.append(Quarantined(lpid, reason, detail, dest))
        log.error("lpid %d quarantined (%s): %s; its files are kept in %s and it is not served "
                  "(docs/recovery.md, What survives a power cut)", lpid, reason, detail, dest)

    @property
    def uv_boot_file(self) -> Path:
        return self.data_dir / "uv.json"

    def known_uv_boot_id(self) -> str:
        try:
            return json.loads(self.uv_boot_file.read_text())["boot_id"]
        except (OSError, ValueError, KeyError):
            return ""

    def remember_uv_boot_id(self, boot_id: str) -> None:
        write_durably(self.uv_boot_file, json.dumps({"boot_id": boot_id}))

    def owned_by(self, owner: str) -> list[Vm]:
        """The VMs of one owner (a guest's name; "" for operator-made VMs): a pass over the VM
        table's owners only, no VM's pages."""
        return [vm for vm in self.vms.values() if vm.owner == owner]

    def vm_state(self, lpid: int | None) -> VmState:
        vm = self.vms.get(lpid)
        return VmState.VM_ABSENT if vm is None else vm.state

    # -- VMs and slots -------------------------------------------------------------------------

    @property
    def lpid_file(self) -> Path:
        return self.data_dir / "next-lpid"

    def create_vm(self, name: str, vcpu_endpoint: str, secure_capable: bool, owner: str = "",
                  request_id: str = "") -> Vm:
        """A new VM, in memory. lpids are never reused by this data directory, even across restarts;
        the lpid's record and the VM's directory are written with its first slot (add_slot), where
        a full disk is answered."""
        try:
            self.next_lpid = max(self.next_lpid, int(self.lpid_file.read_text()))
        except (OSError, ValueError):
            pass
        lpid = self.next_lpid
        while (self.data_dir / f"vm-{lpid}").exists():  # not ours to reuse, whatever it holds
            lpid += 1
        self.next_lpid = lpid + 1
        vm = self.vms[lpid] = Vm(lpid=lpid, name=name, directory=self.data_dir / f"vm-{lpid}",
                                 vcpu_endpoint=vcpu_endpoint, secure_capable=secure_capable, owner=owner,
                                 request_id=request_id)
        return vm

    def add_slot(self, vm: Vm, slot_id: int, base_gfn: int, npages: int) -> Slot:
        """A new memslot, its files' blocks reserved (Slot.create). Raises NoSpace, with nothing
        of the slot left behind, when the data directory cannot hold it and SPACE_HEADROOM to
        spare."""
        try:
            if not vm.directory.is_dir():
                write_durably(self.lpid_file, str(self.next_lpid))
                vm.directory.mkdir()
                fsync_dir(self.data_dir)
            slot = Slot.create(vm.directory, slot_id, base_gfn, npages, self.next_ra)
        except OSError as exc:
            if exc.errno in SPACE_ERRNOS:
                raise _no_space(f"lpid {vm.lpid}: no space for slot {slot_id} ({npages} pages): "
                                f"{exc.strerror}") from exc
            raise
        try:
            space = os.statvfs(self.data_dir)
            if space.f_bavail * space.f_frsize < SPACE_HEADROOM:
                raise _no_space(f"lpid {vm.lpid}: slot {slot_id} ({npages} pages) would leave less than "
                                f"{SPACE_HEADROOM} bytes free")
            vm.slots[slot_id] = slot
            self.save(vm)
        except BaseException as exc:
            vm.slots.pop(slot_id, None)
            slot.unlink()
            if isinstance(exc, OSError) and not isinstance(exc, NoSpace) and exc.errno in SPACE_ERRNOS:
                raise _no_space(f"lpid {vm.lpid}: no space for vm.json: {exc.strerror}") from exc
            raise
        self.next_ra += npages * PAGE_SIZE
        return slot

    def remove_slot(self, vm: Vm, slot_id: int) -> None:
        vm.slots.pop(slot_id).unlink()
        self.save(vm)

    def destroy_vm(self, vm: Vm) -> None:
        vm.destroyed = True
        for slot in vm.slots.values():
            slot.close()
        self.vms.pop(vm.lpid, None)
        shutil.rmtree(vm.directory, ignore_errors=True)

    def save(self, vm: Vm) -> None:
        """Write the VM's metadata next to its RAM, durably (write_durably: fsync'd, atomic). A
        VM destroyed meanwhile has no metadata any more (its directory is gone): nothing is
        written. Work that outlives a VM's lock (an abort's terminate and resume phases, a
        machine check) may still record a step for it after a destroy ran (found by pefsim sim:
        a guest killed while its abort called UV_SVM_TERMINATE made the abort's next journal
        write fail, and H_SVM_INIT_ABORT answer INTERNAL)."""
        if vm.destroyed:
            return
        meta = {"lpid": vm.lpid, "name": vm.name, "vcpu_endpoint": vm.vcpu_endpoint,
                "secure_capable": vm.secure_capable, "secure_guest": vm.secure_guest,
                "abort": vm.abort, "had_session": vm.had_session, "failed": vm.failed, "owner": vm.owner,
                "request_id": vm.request_id, "esm_token": vm.esm_token,
                "pageouts_pending": sorted(vm.pageouts_pending),
                "slots": [{"slot_id": s.slot_id, "base_gfn": s.base_gfn, "npages": s.npages,
                           "ra_base": s.ra_base, "shared": s.shared} for s in vm.slots.values()]}
        write_durably(vm.directory / "vm.json", json.dumps(meta, sort_keys=True), vm.name)

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
        slot.zero(idx, n)

    def mark_secure_out(self, slot: Slot, idx: int, ciphertext) -> None:
        """-> GFN_SECURE_OUT: the HV page holds the ciphertext the UV handed out (or wrote in
        place, IN_PLACE)."""
        if ciphertext is not IN_PLACE:
            slot.write(idx, ciphertext)
        self._set(slot, idx, GfnState.GFN_SECURE_OUT)

    def mark_shared(self, slot: Slot, idx: int) -> None:
        """-> GFN_SHARED on a fresh, zeroed page."""
        slot.zero(idx, 1)
        self._set(slot, idx, GfnState.GFN_SHARED)

    def mark_normal(self, slot: Slot, idx: int, data: bytes | None = None, scrub: bool = False) -> None:
        """-> GFN_NORMAL, holding ``data`` if given (a page given back by the UV); ``scrub``
        zeroes it instead (secure content dropped without page-out)."""
        if data is IN_PLACE:
            pass
        elif data is not None:
            slot.write(idx, data)
        elif scrub:
            slot.zero(idx, 1)
        self._set(slot, idx, GfnState.GFN_NORMAL)

    def mark_normal_run(self, slot: Slot, idx: int, pages: list) -> None:
        """mark_normal for ``len(pages)`` GFNs from ``idx``, each given back by the UV (its data,
        or IN_PLACE): every page written before the GFNs are marked normal."""
        start = None  # the first page of the run of written pages being gathered
        for i, data in enumerate([*pages, IN_PLACE]):
            if data is IN_PLACE and start is not None:
                slot.write_run(idx + start, pages[start:i])
                start = None
            elif data is not IN_PLACE and start is None:
                start = i
        slot.states[idx:idx + len(pages)] = bytes([GfnState.GFN_NORMAL]) * len(pages)

    def drop_secure(self, slots) -> None:
        """kvmppc_uvmem_drop_pages with skip_page_out: every GFN of ``slots`` back to normal,
        secure content dropped without page-out and the HV page scrubbed (reset, memslot removal,
        a UV reset). Called with vm.lock held."""
        for slot in slots:
            for idx in range(slot.npages):
                st = slot.state(idx)
                if st != GfnState.GFN_NORMAL:
                    self.mark_normal(slot, idx, scrub=st == GfnState.GFN_SECURE_IN)

    def restore(self, slot: Slot, idx: int, state: int) -> None:
        """Put a GFN back in the state it had before a transition that the UV refused."""
        self._set(slot, idx, state)
