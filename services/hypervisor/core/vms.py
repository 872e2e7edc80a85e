"""The VMM's control surface for VMs (what QEMU does through KVM ioctls): CreateVm, RunVm,
StopVm, ResetVm (KVM_PPC_SVM_OFF), DestroyVm, SetMemslot and HvStatus. Results are errnos."""
from __future__ import annotations

import asyncio
import logging
import re

from pefsim import faults
from pefsim.abi import PAGE_SHIFT, Errno, Role, SecureGuest, U, VmState
from pefsim.v1 import common_pb2, hypervisor_pb2 as pb
from services.hypervisor.core import uv
from services.hypervisor.core.state import ESM_RESET, NoSpace
from services.hypervisor.core.state import MAX_SLOT_ID

log = logging.getLogger("pefsim.hv")
MAX_VM_PAGES = 1 << 20  # 64 GiB of guest memory per VM
MAX_GFN = 1 << (64 - PAGE_SHIFT)  # a guest physical address is 64 bits
MAX_REQUEST_ID = 64  # CreateVmRequest.request_id: a key, not a payload
MAX_ENDPOINT = 261  # a DNS name (253) or a bracketed IPv6 address, ':' and a port
# host:port and nothing else: no unix: paths, no dns:/// or other gRPC target schemes
ENDPOINT = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")


def endpoint_ok(endpoint: str) -> bool:
    """Whether a vCPU endpoint is a plain ``host:port`` the HV may dial (port 1-65535)."""
    m = len(endpoint) <= MAX_ENDPOINT and ENDPOINT.fullmatch(endpoint)
    return bool(m) and 0 < int(m["port"]) <= 0xFFFF


def _slots_valid(slots) -> bool:
    ranges = sorted((s.base_gfn, s.base_gfn + s.npages) for s in slots)
    ids = [s.slot_id for s in slots]
    return (all(0 < s.npages and s.slot_id <= MAX_SLOT_ID and s.base_gfn + s.npages <= MAX_GFN for s in slots)
            and len(set(ids)) == len(ids)
            and all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:]))
            and sum(s.npages for s in slots) <= MAX_VM_PAGES)


def owner_of_caller(caller) -> str:
    """Who a VM made by ``caller`` belongs to: the guest whose VMM made it, or "" (no guest: an
    operator made it, and only operators may act on it)."""
    return caller.name if caller.role == Role.ROLE_GUEST else ""


def over_quota(hv, owner: str, vms: int, pages: int) -> bool:
    """Whether ``vms`` more VMs and ``pages`` more pages of guest memory would take ``owner`` past
    --max-vms-per-owner or --max-pages-per-owner (CreateVm and SetMemslot answer ENOMEM)."""
    mine = hv.state.owned_by(owner)
    held = sum(vm.npages for vm in mine)
    if (vms and len(mine) + vms > hv.cfg.max_vms_per_owner) or held + pages > hv.cfg.max_pages_per_owner:
        log.warning("%s refused %d more VMs / %d more pages: holds %d VMs, %d pages (quota %d VMs, %d pages)",
                    owner or "the operators", vms, pages, len(mine), held, hv.cfg.max_vms_per_owner,
                    hv.cfg.max_pages_per_owner)
        return True
    return False


async def create_vm(hv, req: pb.CreateVmRequest, caller) -> pb.CreateVmResponse:
    """KVM_CREATE_VM plus the memslots. EINVAL for bad slots or a vCPU endpoint that is not a
    plain host:port; ENOMEM when the owner already holds its quota of VMs or of pages
    (--max-vms-per-owner, --max-pages-per-owner); ENOSPC when the disk cannot hold the RAM."""
    if not req.memslots or not _slots_valid(req.memslots) or not endpoint_ok(req.vcpu_endpoint) \
            or len(req.request_id) > MAX_REQUEST_ID:
        return pb.CreateVmResponse(errno=Errno.EINVAL)
    owner = owner_of_caller(caller)
    if req.request_id and not faults.mutant("hv-create-vm-ignores-request-id"):  # a repeat: the same VM
        same = next((vm for vm in hv.state.owned_by(owner) if vm.request_id == req.request_id), None)
        if same is not None:
            log.info("lpid %d: CreateVm repeated with its request id: the same VM", same.lpid)
            return pb.CreateVmResponse(errno=Errno.OK, lpid=same.lpid)
    if over_quota(hv, owner, vms=1, pages=sum(s.npages for s in req.memslots)):
        return pb.CreateVmResponse(errno=Errno.ENOMEM)
    vm = hv.state.create_vm(req.name or caller.name, req.vcpu_endpoint, req.secure_capable, owner, req.request_id)
    try:
        for s in req.memslots:
            hv.state.add_slot(vm, s.slot_id, s.base_gfn, s.npages)
    except OSError as exc:  # nothing of a half-made VM stays; the disk being full is ENOSPC
        hv.state.destroy_vm(vm)
        if not isinstance(exc, NoSpace):
            raise
        return pb.CreateVmResponse(errno=Errno.ENOSPC)
    log.info("lpid %d created for %s: %d pages", vm.lpid, vm.name, vm.npages)
    return pb.CreateVmResponse(errno=Errno.OK, lpid=vm.lpid)


async def run_vm(hv, req: pb.RunVmRequest, caller) -> pb.RunVmResponse:
    vm = hv.state.vms[req.lpid]
    vm.running = True
    return pb.RunVmResponse(errno=Errno.OK)


async def stop_vm(hv, req: pb.StopVmRequest, caller) -> pb.StopVmResponse:
    hv.state.vms[req.lpid].running = False
    return pb.StopVmResponse(errno=Errno.OK)


def _forget_esm(hv, vm) -> None:
    """A reset VM's vCPU is in no `sc 2` of before: no result of one goes to it (svm.h_svm_init_abort_exit)."""
    vm.esm_token = ESM_RESET
    hv.state.save(vm)


async def reset_vm(hv, req: pb.ResetVmRequest, caller) -> pb.ResetVmResponse:
    """KVM_PPC_SVM_OFF: 0 at once if INIT_START is clear; EBUSY with a vCPU running; otherwise
    drop every secure page without page-out, unregister every memslot, UV_SVM_TERMINATE
    (non-zero -> EINVAL), secure_guest = 0."""
    vm = hv.state.vms[req.lpid]
    async with hv.table.guard("ResetVm", req, vm.lock):  # an abort may be paging out
        if not vm.secure_guest & SecureGuest.KVMPPC_SECURE_INIT_START:
            _forget_esm(hv, vm)
            return pb.ResetVmResponse(errno=Errno.OK)
        if vm.running:
            return pb.ResetVmResponse(errno=Errno.EBUSY)
        for slot in sorted(vm.slots.values(), key=lambda s: s.slot_id):
            hv.state.drop_secure([slot])
            await uv.unregister_slot(hv, vm, slot.slot_id)
        rc, _ = await uv.terminate(hv, vm, "reset")
        if rc != U.U_SUCCESS:
            return pb.ResetVmResponse(errno=Errno.EINVAL)
        _forget_esm(hv, vm)
        hv.state.set_secure_guest(vm, SecureGuest.SECURE_GUEST_NONE)
    log.info("lpid %d reset to a normal VM (secure contents dropped)", vm.lpid)
    return pb.ResetVmResponse(errno=Errno.OK)


async def destroy_vm(hv, req: pb.DestroyVmRequest, caller) -> pb.DestroyVmResponse:
    return await destroy(hv, hv.state.vms[req.lpid], "destroy")


async def destroy(hv, vm, trigger: str) -> pb.DestroyVmResponse:
    """Destroy the VM; UV_SVM_TERMINATE first if secure_guest != 0 (or an abort is journalled).
    ``trigger``: destroy (the VMM asked), vmm-exited (its session ended), vmm-gone (it did not
    come back after an HV restart)."""
    vm.dying = True
    async with vm.lock:
        if vm.destroyed:
            return pb.DestroyVmResponse(errno=Errno.ENOENT)
        terminated, rc, seconds = False, 0, 0.0
        if vm.secure_guest != 0 or vm.abort is not None:
            rc, seconds = await uv.terminate(hv, vm, "destroy")
            terminated = True
        hv.state.destroy_vm(vm)
        vm.gone.set()
    await hv.vcpus.forget(vm.lpid)
    log.info("lpid %d destroyed (%s)%s", vm.lpid, trigger,
             f", UV_SVM_TERMINATE -> {rc}" if terminated else "")
    return pb.DestroyVmResponse(errno=Errno.OK, terminated=terminated, terminate_rc=rc,
                                terminate_latency_s=seconds)


async def vm_session(hv, req: pb.VmSessionRequest, caller):
    """The VMM's hold on its VM. Ends when the VM is destroyed; if the VMM goes away first the
    VM is destroyed (as closing QEMU's KVM VM fd does)."""
    vm = hv.state.vms[req.lpid]
    vm.sessions += 1
    if not vm.had_session:
        vm.had_session = True
        hv.state.save(vm)
    try:
        yield pb.VmSessionEvent(errno=Errno.OK, hv_boot_id=hv.state.boot_id)
        await vm.gone.wait()
    finally:
        vm.sessions -= 1
        if not vm.destroyed and vm.sessions == 0 and not hv.stopping:
            asyncio.ensure_future(destroy(hv, vm, "vmm-exited"))


async def set_memslot(hv, req: pb.SetMemslotRequest, caller) -> pb.SetMemslotResponse:
    """Add or delete a memslot. While secure_guest != 0 a new slot is registered with the UV and
    its GFNs made secure without copy; a deleted one is dropped and unregistered. pefsim reports
    a UV refusal as ENOSPC and undoes the add (the kernel ignores it: a TODO there)."""
    vm = hv.state.vms[req.lpid]
    s = req.slot
    async with hv.table.guard("SetMemslot", req, vm.lock):
        if req.delete:
            slot = vm.slots.get(s.slot_id)
            if slot is None:
                return pb.SetMemslotResponse(errno=Errno.ENOENT)
            if vm.secure_guest != 0:
                hv.state.drop_secure([slot])
                await uv.unregister_slot(hv, vm, slot.slot_id)
            hv.state.remove_slot(vm, slot.slot_id)
            return pb.SetMemslotResponse(errno=Errno.OK)
        if s.slot_id in vm.slots:
            return pb.SetMemslotResponse(errno=Errno.EEXIST)
        if not _slots_valid(list(_infos(vm)) + [s]):
            return pb.SetMemslotResponse(errno=Errno.EINVAL)
        if over_quota(hv, vm.owner, vms=0, pages=s.npages):
            return pb.SetMemslotResponse(errno=Errno.ENOMEM)
        try:
            slot = hv.state.add_slot(vm, s.slot_id, s.base_gfn, s.npages)
        except NoSpace:  # add_slot left nothing of the slot behind
            return pb.SetMemslotResponse(errno=Errno.ENOSPC)
        if vm.secure_guest != 0:
            if await uv.register_slot(hv, vm, slot) != U.U_SUCCESS:
                hv.state.remove_slot(vm, s.slot_id)
                return pb.SetMemslotResponse(errno=Errno.ENOSPC)
            hv.state.mark_secure_in_run(slot, 0, slot.npages)
    return pb.SetMemslotResponse(errno=Errno.OK)


def _infos(vm):
    for slot in vm.slots.values():
        yield common_pb2.Memslot(slot_id=slot.slot_id, base_gfn=slot.base_gfn, npages=slot.npages)


async def hv_status(hv, req: pb.HvStatusRequest, caller) -> pb.HvStatusResponse:
    """Every VM for an operator, the UV or the HV's own; a guest sees only the VMs it owns (at
    most its quota: the answer costs O(the caller's VMs))."""
    shown = hv.state.owned_by(caller.name) if caller.role == Role.ROLE_GUEST else hv.state.vms.values()
    vms = [pb.VmInfo(lpid=vm.lpid, name=vm.name, secure_guest=vm.secure_guest,
                     state=VmState(vm.state).name, running=vm.running, npages=vm.npages,
                     gfns_by_state=vm.gfn_counts(), memslots=list(_infos(vm)),
                     aborting=vm.abort is not None, failed=vm.failed, session=vm.sessions > 0)
           for vm in sorted(shown, key=lambda v: v.lpid)]
    return pb.HvStatusResponse(vms=vms, boot_id=hv.state.boot_id, vms_recovered=hv.state.recovered)
