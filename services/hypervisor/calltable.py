"""The Hypervisor's call table: one row per RPC, and the allowed-calls-per-VM-state table.

Read by the dispatcher (pefsim/rpc.py), the conformance tests and tools/gen_conformance.py.
Checks are in the kernel's order: for H_SVM_PAGE_IN/OUT the caller (MSR[S] in SRR1: only the UV
may make them, else H_UNSUPPORTED), then the VM state, then order (H_P3), then flags (H_P2).
"""
from __future__ import annotations

from dataclasses import replace

from pefsim import faults
from pefsim.abi import PAGE_SHIFT, Errno, H, Hcall, PageInFlag, Role, VmState, page_aligned
from pefsim.calltable import ALLOW, STATE, Call, Check, request_lpid
from services.hypervisor.core import memory, vms as vm
from services.hypervisor.core import pages as page, svm

UV = frozenset({Role.ROLE_UV})
# e3326ae3d59e dropped the MSR[S] caller check for H_SVM_INIT_ABORT (the UV makes it in the
# guest's context, with the guest's SRR1): any vCPU may issue it and the VM state decides.
UV_OR_GUEST = frozenset({Role.ROLE_UV, Role.ROLE_GUEST})
VMM = frozenset({Role.ROLE_GUEST, Role.ROLE_OPERATOR})  # QEMU's part: the guest's VMM, operators
ANYONE = frozenset(Role)
# owned=True on the hcalls: the UV names the guest it acts for (calltable.Caller.on_behalf), and an
# hcall for a VM that guest does not own is refused with the wrong-caller result before anything
# changes (H_SVM_INIT_START answers H_AUTHORITY for it itself, as it always did).

ORDER_P3 = Check("order", lambda r: r.order == PAGE_SHIFT, H.H_P3, "order is not 16 (64 KiB)")



ALIGNED = Check("gpa", lambda r: page_aligned(r.gpa), Errno.EINVAL, "gpa not 64 KiB aligned")

CALLS = [
    Call("H_SVM_PAGE_IN", page.h_svm_page_in, UV, H.H_UNSUPPORTED, opcode=Hcall.H_SVM_PAGE_IN,
         family=H, owned=True, checks=(STATE, ORDER_P3,
                           Check("flags", lambda r: r.flags & ~PageInFlag.H_PAGE_IN_SHARED == 0,
                                 H.H_P2, "a flag other than H_PAGE_IN_SHARED"))),
    Call("H_SVM_PAGE_OUT", page.h_svm_page_out, UV, H.H_UNSUPPORTED, opcode=Hcall.H_SVM_PAGE_OUT,
         family=H, owned=True, checks=(STATE, ORDER_P3,
                           Check("flags", lambda r: r.flags == 0, H.H_P2, "flags not 0"))),
    Call("H_SVM_INIT_START", svm.h_svm_init_start, UV, H.H_UNSUPPORTED,
         opcode=Hcall.H_SVM_INIT_START, family=H),
    Call("H_SVM_INIT_DONE", svm.h_svm_init_done, UV, H.H_UNSUPPORTED,
         opcode=Hcall.H_SVM_INIT_DONE, family=H, owned=True),
    Call("H_SVM_INIT_ABORT", svm.h_svm_init_abort, UV_OR_GUEST, H.H_UNSUPPORTED,
         opcode=Hcall.H_SVM_INIT_ABORT, family=H, owned=True, exit=svm.h_svm_init_abort_exit),
    Call("HSvmPageInBulk", page.h_svm_page_in_bulk, UV, H.H_UNSUPPORTED, family=H, owned=True),
    Call("CreateVm", vm.create_vm, VMM, None, checks=(), result="errno", family=Errno),
    Call("RunVm", vm.run_vm, VMM, None, checks=(STATE,), result="errno", family=Errno, owned=True),
    Call("StopVm", vm.stop_vm, VMM, None, checks=(STATE,), result="errno", family=Errno, owned=True),
    Call("ResetVm", vm.reset_vm, VMM, None, checks=(STATE,), result="errno", family=Errno, owned=True),
    Call("DestroyVm", vm.destroy_vm, VMM, None, checks=(STATE,), result="errno", family=Errno, owned=True),
    Call("SetMemslot", vm.set_memslot, VMM, None, checks=(STATE,), result="errno", family=Errno, owned=True),
    Call("VcpuLoad", memory.vcpu_load, frozenset({Role.ROLE_GUEST, Role.ROLE_UV}), None,
         checks=(STATE, ALIGNED,
                 Check("npages", lambda r: 0 < r.npages <= memory.MAX_ACCESS_PAGES, Errno.EINVAL,
                       "npages 0 or above the per-call limit")),
         result="errno", family=Errno, owned=True),
    Call("VcpuStore", memory.vcpu_store, frozenset({Role.ROLE_GUEST, Role.ROLE_UV}), None,
         checks=(STATE, ALIGNED,
                 Check("data", lambda r: 0 < len(r.data) <= memory.MAX_STORE_PAGES << PAGE_SHIFT
                       and page_aligned(len(r.data)), Errno.EINVAL,
                       "data not a whole number of pages")),
         result="errno", family=Errno, owned=True),
    Call("HostReadPage", memory.host_read_page, VMM, None,
         checks=(STATE, ALIGNED,
                 Check("npages", lambda r: r.npages <= memory.MAX_ACCESS_PAGES, Errno.EINVAL,
                       "npages above the per-call limit")),
         result="errno", family=Errno, owned=True),
    Call("HostUnmapPage", memory.host_unmap_page, VMM, None, checks=(STATE, ALIGNED),
         result="errno", family=Errno, owned=True),
    Call("HvStatus", vm.hv_status, ANYONE, None, checks=(), result=None),
    Call("SetFailpoint", faults.set_failpoint_call("hv"), frozenset({Role.ROLE_OPERATOR}), None, checks=(),
         result="errno", family=Errno),
    Call("VmSession", vm.vm_session, VMM, None, checks=(STATE,), result="errno", family=Errno, owned=True),
]


# call -> what its handler itself may answer, beyond the checks above (the chaos checker holds
# every observed result to these, with calltable.legal_results).
RESULTS = {
    "HSvmPageInBulk": (H.H_SUCCESS, H.H_PARAMETER, H.H_P2, H.H_P3, H.H_UNSUPPORTED),
    "H_SVM_PAGE_IN": (H.H_SUCCESS, H.H_PARAMETER),
    "H_SVM_PAGE_OUT": (H.H_SUCCESS, H.H_PARAMETER),
    "H_SVM_INIT_START": (H.H_SUCCESS, H.H_AUTHORITY, H.H_PARAMETER),
    "H_SVM_INIT_DONE": (H.H_SUCCESS, H.H_STATE),
    "H_SVM_INIT_ABORT": (H.H_PARAMETER, H.H_SUCCESS, H.H_HARDWARE),
    "CreateVm": (Errno.OK, Errno.EINVAL, Errno.ENOMEM, Errno.ENOSPC),
    "RunVm": (Errno.OK,),
    "StopVm": (Errno.OK,),
    "ResetVm": (Errno.OK, Errno.EBUSY, Errno.EINVAL),
    "DestroyVm": (Errno.OK, Errno.ENOENT),
    "SetMemslot": (Errno.OK, Errno.ENOENT, Errno.EEXIST, Errno.EINVAL, Errno.ENOSPC, Errno.ENOMEM),
    "VcpuLoad": (Errno.OK, Errno.EFAULT),
    "VcpuStore": (Errno.OK, Errno.EFAULT),
    "HostReadPage": (Errno.OK, Errno.EFAULT),
    "HostUnmapPage": (Errno.OK, Errno.EFAULT, Errno.EIO),
    "VmSession": (Errno.OK,),
    "SetFailpoint": (Errno.OK, Errno.EINVAL),  # EINVAL: a spec this service does not take (pefsim/faults.py)
}
CALLS = [replace(c, results=frozenset(RESULTS.get(c.name, ()))) for c in CALLS]

A = ALLOW
ABSENT, NORMAL, TRANSIENT, SECURE, ABORTING = (VmState.VM_ABSENT, VmState.VM_NORMAL,
                                               VmState.VM_TRANSIENT, VmState.VM_SECURE,
                                               VmState.VM_ABORTING)
_ANY_VM = {ABSENT: Errno.ENOENT, NORMAL: A, TRANSIENT: A, SECURE: A, ABORTING: A}

# states no call can find a VM in (the conformance rows need none): v10 sets INIT_ABORT and clears
# it on the abort hcall's own exit path (check_svm_abort), before any other call of the VM runs
UNREACHABLE = {ABORTING: "v10 clears INIT_ABORT on the abort hcall's own exit path (check_svm_abort)"}

# call -> VM state -> ALLOW or the result. Sources in docs/conformance.md.
STATE_TABLE = {
    "H_SVM_PAGE_IN": {ABSENT: H.H_PARAMETER, NORMAL: H.H_UNSUPPORTED, TRANSIENT: A, SECURE: A,
                      ABORTING: H.H_UNSUPPORTED},
    "H_SVM_PAGE_OUT": {ABSENT: H.H_PARAMETER, NORMAL: H.H_UNSUPPORTED, TRANSIENT: A, SECURE: A,
                       ABORTING: H.H_UNSUPPORTED},
    "HSvmPageInBulk": {ABSENT: H.H_PARAMETER, NORMAL: H.H_UNSUPPORTED, TRANSIENT: A, SECURE: A,
                       ABORTING: H.H_UNSUPPORTED},
    "H_SVM_INIT_START": {ABSENT: H.H_PARAMETER, NORMAL: A, TRANSIENT: A, SECURE: A, ABORTING: A},
    "H_SVM_INIT_DONE": {ABSENT: H.H_PARAMETER, NORMAL: H.H_UNSUPPORTED, TRANSIENT: A, SECURE: A,
                        ABORTING: H.H_UNSUPPORTED},
    "H_SVM_INIT_ABORT": {ABSENT: H.H_PARAMETER, NORMAL: H.H_UNSUPPORTED, TRANSIENT: A,
                         SECURE: H.H_STATE, ABORTING: H.H_UNSUPPORTED},
    "RunVm": _ANY_VM, "StopVm": _ANY_VM, "ResetVm": _ANY_VM, "DestroyVm": _ANY_VM,
    "SetMemslot": _ANY_VM, "VcpuLoad": _ANY_VM, "VcpuStore": _ANY_VM, "HostReadPage": _ANY_VM,
    "HostUnmapPage": _ANY_VM, "VmSession": _ANY_VM,
}


def state_of(hv, call: Call, request) -> VmState:
    return hv.state.vm_state(request_lpid(request))


def owner_of(hv, request) -> str | None:
    """The identity of the VMM that created the VM, for the calls only its guest may make: None
    when there is no such VM (the state table answers), "" for a VM an operator made (no guest
    may act on it)."""
    vm = hv.state.vms.get(request_lpid(request))
    return None if vm is None else vm.owner
