"""HvState.load trusts nothing it reads: a VM whose files are damaged (a power cut, a full disk, a
hand edit) is quarantined, with every file kept, and every other VM loads. And a slot's blocks are
reserved when it is made, so a full disk is an ENOSPC answer, never a SIGBUS later."""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from pefsim.abi import PAGE_SIZE, Errno, GfnState, Role
from pefsim.v1 import common_pb2, hypervisor_pb2 as hpb
from services.hypervisor.core import vms as vm_control
from services.hypervisor.core.state import NoSpace
from services.hypervisor.server import HvConfig
from services.hypervisor.core.state import QUARANTINE, HvState

GOOD, VICTIM = 1, 2
DATA = b"kept across the restart"


def build(data_dir: Path) -> None:
    """Two VMs, each with two slots, a secure GFN and a recognisable page; then the HV 'dies'."""
    st = HvState(data_dir)
    for name in ("good", "victim"):
        vm = st.create_vm(name, "127.0.0.1:1", True)
        st.add_slot(vm, 0, 0, 8)
        st.add_slot(vm, 1, 100, 4)
        vm.slots[0].write(2, DATA.ljust(PAGE_SIZE, b"\0"))
        st.mark_secure_in(vm.slots[1], 1)
        st.set_secure_guest(vm, 3)
    for vm in st.vms.values():
        for slot in vm.slots.values():
            slot.close()


def victim_dir(data_dir: Path) -> Path:
    return data_dir / f"vm-{VICTIM}"


def edit_meta(data_dir: Path, change) -> None:
    path = victim_dir(data_dir) / "vm.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def load(data_dir: Path) -> HvState:
    st = HvState(data_dir)
    st.load()
    return st


def assert_quarantined(data_dir: Path, st: HvState, reason: str, caplog) -> Path:
    """The victim is quarantined for ``reason`` with its files kept and an ERROR line naming
    where; the good VM loaded, its memory and GFN states intact."""
    assert list(st.vms) == [GOOD]
    good = st.vms[GOOD]
    assert bytes(good.slots[0].page(2)[:len(DATA)]) == DATA
    assert good.slots[1].state(1) == GfnState.GFN_SECURE_IN and good.secure_guest == 3
    [q] = st.quarantined
    assert (q.lpid, q.reason) == (VICTIM, reason)
    assert q.path.parent == data_dir / QUARANTINE and q.path.is_dir()
    assert not victim_dir(data_dir).exists()
    assert {"slot-0.ram", "slot-0.gfn", "slot-1.ram", "slot-1.gfn"} <= {p.name for p in q.path.iterdir()}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"lpid {VICTIM} quarantined ({reason})" in m and str(q.path) in m for m in errors), errors
    return q.path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    build(tmp_path)
    return tmp_path


def test_intact_files_load(data_dir):
    st = load(data_dir)
    assert sorted(st.vms) == [GOOD, VICTIM] and st.quarantined == []
    assert bytes(st.vms[VICTIM].slots[0].page(2)[:len(DATA)]) == DATA


def test_empty_vm_json_is_quarantined_not_deleted(data_dir, caplog):
    """A 0-byte vm.json (a power cut before the data reached the disk) used to make the HV delete
    the VM's directory, RAM included, without a word."""
    (victim_dir(data_dir) / "vm.json").write_bytes(b"")
    path = assert_quarantined(data_dir, load(data_dir), "bad-vm-json", caplog)
    assert (path / "slot-0.ram").stat().st_size == 8 * PAGE_SIZE


def test_missing_key_is_quarantined(data_dir, caplog):
    """A vm.json missing a key used to stop the whole HV (KeyError at start: every VM down)."""
    edit_meta(data_dir, lambda m: m.pop("vcpu_endpoint"))
    assert_quarantined(data_dir, load(data_dir), "bad-vm-json", caplog)


@pytest.mark.parametrize("key, value", [("secure_guest", "3"), ("lpid", 2.0), ("secure_capable", 1),
                                        ("slots", {}), ("abort", {"phase": "page-out"})])
def test_wrong_type_is_quarantined(data_dir, caplog, key, value):
    edit_meta(data_dir, lambda m: m.__setitem__(key, value))
    assert_quarantined(data_dir, load(data_dir), "bad-vm-json", caplog)


@pytest.mark.parametrize("value", [2, 5, 7, -1])
def test_secure_guest_must_be_a_valid_combination(data_dir, caplog, value):
    edit_meta(data_dir, lambda m: m.__setitem__("secure_guest", value))
    assert_quarantined(data_dir, load(data_dir), "bad-vm-json", caplog)


def test_truncated_ram_is_quarantined_not_zero_extended(data_dir, caplog):
    """A short RAM file used to be silently extended with zeros (the pages lost)."""
    os.truncate(victim_dir(data_dir) / "slot-0.ram", 3 * PAGE_SIZE)
    path = assert_quarantined(data_dir, load(data_dir), "bad-ram", caplog)
    assert (path / "slot-0.ram").stat().st_size == 3 * PAGE_SIZE  # as found, for the operator


def test_truncated_gfn_file_is_quarantined(data_dir, caplog):
    """A short GFN-state file used to be extended with GFN_NORMAL: a secure VM read back as
    normal pages."""
    os.truncate(victim_dir(data_dir) / "slot-1.gfn", 1)
    assert_quarantined(data_dir, load(data_dir), "bad-gfn", caplog)


def test_bad_gfn_byte_is_quarantined(data_dir, caplog):
    """A byte that is no GfnState used to load, and give INTERNAL at the first use of the page."""
    with open(victim_dir(data_dir) / "slot-1.gfn", "r+b") as fh:
        fh.seek(3)
        fh.write(b"\x07")
    assert_quarantined(data_dir, load(data_dir), "bad-gfn", caplog)
    assert any("is no GfnState" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("change", [
    lambda m: m["slots"][1].__setitem__("base_gfn", 4),  # GFNs 4..7 inside slot 0's 0..7
    lambda m: m["slots"][1].__setitem__("ra_base", m["slots"][0]["ra_base"] + PAGE_SIZE),
    lambda m: m["slots"][1].__setitem__("slot_id", 0),
    lambda m: m["slots"][1].__setitem__("npages", 0),
], ids=["gfns", "real-addresses", "same-id", "empty"])
def test_overlapping_or_impossible_slots_are_quarantined(data_dir, caplog, change):
    edit_meta(data_dir, change)
    assert_quarantined(data_dir, load(data_dir), "bad-slots", caplog)


def test_slot_over_another_vms_real_addresses_is_quarantined(data_dir, caplog):
    good = json.loads((data_dir / f"vm-{GOOD}" / "vm.json").read_text())
    edit_meta(data_dir, lambda m: m["slots"][0].__setitem__("ra_base", good["slots"][1]["ra_base"]))
    assert_quarantined(data_dir, load(data_dir), "bad-slots", caplog)


def test_missing_vm_json_with_slot_files_is_quarantined(data_dir, caplog):
    (victim_dir(data_dir) / "vm.json").unlink()
    assert_quarantined(data_dir, load(data_dir), "no-vm-json", caplog)


def test_a_creation_that_never_finished_is_removed(data_dir):
    """Neither vm.json nor slot files: provably nothing of a VM, the one case that is removed."""
    (data_dir / "vm-7").mkdir()
    (data_dir / "vm-7" / "vm.json.tmp").write_text("{")
    st = load(data_dir)
    assert sorted(st.vms) == [GOOD, VICTIM] and not (data_dir / "vm-7").exists() and st.quarantined == []


def test_quarantined_lpids_are_never_reused(data_dir, caplog):
    (victim_dir(data_dir) / "vm.json").write_bytes(b"")
    (data_dir / "next-lpid").unlink()  # even with the lpid record gone
    st = load(data_dir)
    assert st.quarantined[0].lpid == VICTIM
    assert st.create_vm("new", "127.0.0.1:1", False).lpid == VICTIM + 1
    st2 = HvState(data_dir)  # a later start finds it in quarantine/ only
    st2.load()
    assert not (data_dir / "next-lpid").exists()  # (an lpid is recorded with the VM's first slot)
    assert st2.quarantined == [] and st2.create_vm("new", "127.0.0.1:1", False).lpid == VICTIM + 1


def test_no_space_to_reserve_at_load_is_quarantined(data_dir, caplog, monkeypatch):
    """Files from before reservation existed may be sparse: load reserves them, and a VM whose
    blocks cannot be had is quarantined rather than left to SIGBUS the HV at its first store."""
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(victim_dir(data_dir))):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    assert_quarantined(data_dir, load(data_dir), "no-space", caplog)


def test_sparse_files_are_reserved_at_load(data_dir):
    ram = victim_dir(data_dir) / "slot-0.ram"
    data = ram.read_bytes()
    ram.unlink()
    with open(ram, "wb") as fh:  # sparse, as _map made them before
        fh.truncate(len(data))
        fh.seek(2 * PAGE_SIZE)
        fh.write(data[2 * PAGE_SIZE:3 * PAGE_SIZE])
    assert ram.stat().st_blocks * 512 < len(data)
    st = load(data_dir)
    assert ram.stat().st_blocks * 512 >= len(data)
    assert bytes(st.vms[VICTIM].slots[0].page(2)[:len(DATA)]) == DATA


def test_vm_json_replacement_is_durable(data_dir, monkeypatch):
    """vm.json is fsync'd before the rename and its directory after: a power cut leaves the old
    or the new file, not an empty one."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    st = load(data_dir)
    st.set_secure_guest(st.vms[GOOD], 0)
    vm_dir = str(data_dir / f"vm-{GOOD}")
    assert synced == [vm_dir + "/vm.json.tmp", vm_dir]
    assert not (data_dir / f"vm-{GOOD}" / "vm.json.tmp").exists()


def no_space_over(limit: int, monkeypatch) -> None:
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        if length > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)


def test_add_slot_without_space_leaves_nothing(tmp_path, monkeypatch):
    st = HvState(tmp_path)
    vm = st.create_vm("a", "127.0.0.1:1", False)
    st.add_slot(vm, 0, 0, 4)
    before = sorted(p.name for p in vm.directory.iterdir()), (vm.directory / "vm.json").read_text(), st.next_ra
    no_space_over(4 * PAGE_SIZE, monkeypatch)
    with pytest.raises(NoSpace):
        st.add_slot(vm, 1, 100, 16)
    assert list(vm.slots) == [0]
    assert (sorted(p.name for p in vm.directory.iterdir()), (vm.directory / "vm.json").read_text(),
            st.next_ra) == before


def test_create_vm_without_space_answers_enospc_and_leaves_nothing(tmp_path, monkeypatch):
    st = HvState(tmp_path)
    hv = SimpleNamespace(state=st, cfg=HvConfig())
    caller = SimpleNamespace(role=Role.ROLE_GUEST, name="attacker")
    no_space_over(4 * PAGE_SIZE, monkeypatch)

    def create(*slots):
        req = hpb.CreateVmRequest(name="x", vcpu_endpoint="127.0.0.1:1", memslots=[
            common_pb2.Memslot(slot_id=i, base_gfn=base, npages=n) for i, (base, n) in enumerate(slots)])
        return asyncio.run(vm_control.create_vm(hv, req, caller))
    # the second slot does not fit: the first one's files, the directory and the VM all go
    assert create((0, 4), (100, 16)).errno == Errno.ENOSPC
    assert st.vms == {} and sorted(p.name for p in tmp_path.iterdir()) == ["next-lpid"]
    ok = create((0, 4))
    assert ok.errno == Errno.OK and ok.lpid == 2  # the refused VM's lpid is not reused either
