"""The Ultravisor's call table: one row per RPC, and the allowed-calls-per-SVM-state table.

Read by the dispatcher (pefsim/rpc.py), by the conformance tests (tests/conformance/) and by
tools/gen_conformance.py, which writes docs/conformance.md from it. A row's ``checks`` are in the
order the ABI's code performs them; STATE marks where the state table below is consulted (for the
SVM of the request's lpid; SVM_ABSENT when there is none).

The bulk calls check a run of pages (PageRef.count) at its two ends (core/bulk.py: run_passes),
so every check of UV_PAGE_IN and UV_PAGE_OUT must either not depend on the page's addresses or,
on addresses, hold for every address between two that pass (``_ra_ok``: not 0, below secure
memory). tests/unit/test_page_runs.py compares runs with single pages.
"""
from __future__ import annotations

from dataclasses import replace

from pefsim import faults
from pefsim.abi import PAGE_SHIFT, Errno, H, Role, SvmState, U, Ucall, is_secure_ra, page_aligned
from pefsim.calltable import ALLOW, STATE, Call, Check
from pefsim.dataplane import MAX_FRAME_PAGES, MAX_REQUEST_PAGES, decoder, limited
from pefsim.v1 import ultravisor_pb2 as upb
from services.ultravisor.core import access, bulk, memslot, page, reflect, share, svm
from services.ultravisor.core.state import SVM_MEM_SLOTS_NUM

HV = frozenset({Role.ROLE_HV})
SVM = frozenset({Role.ROLE_GUEST})
OPERATOR = frozenset({Role.ROLE_OPERATOR})
ANYONE = frozenset(Role)

ORDER_P5 = Check("order", lambda r: r.order == PAGE_SHIFT, U.U_P5, "order is not 16 (64 KiB)")
SECURE_CALLER = Check("msr", lambda r: r.vcpu.msr_s and not r.vcpu.msr_hv and not r.vcpu.msr_pr,
                      U.U_PERMISSION, "caller is not a secure supervisor vCPU (MSR[S]=1, HV=PR=0)")


def _ra_ok(ra: int) -> bool:
    return ra != 0 and not is_secure_ra(ra)


CALLS = [
    # a UV_ESM the checks refuse returns to the caller in R3 at once (resumed): no HV owes it a resume
    Call("UV_ESM", svm.uv_esm, SVM, U.U_PERMISSION, opcode=Ucall.UV_ESM, family=U,
         refusal=lambda r: {"resumed": True, "msr_s": False, "nip": r.vcpu.nip}, checks=(
        # the firmware's dispatcher refuses MSR[HV|PR] before uv_esm looks at its arguments
        # (uvcall.c:1151-1155 before 884-887): kbase 0 from user mode is U_PERMISSION
        Check("msr", lambda r: not r.vcpu.msr_hv and not r.vcpu.msr_pr, U.U_PERMISSION,
              "caller MSR has HV or PR set"),
        Check("kbase", lambda r: r.kbase != 0, U.U_P2, "kbase is 0"),
        Check("fdt", lambda r: r.fdt != 0, U.U_P3, "fdt is 0"),
        Check("lpid", lambda r: r.vcpu.lpid != 0, U.U_PERMISSION, "caller LPID is 0 (the HV)"),
        STATE,
        Check("msr_s", lambda r: not r.vcpu.msr_s, U.U_PERMISSION,
              "caller claims MSR[S] but has no SVM"),
    )),
    Call("UV_REGISTER_MEM_SLOT", memslot.uv_register_mem_slot, HV, U.U_PERMISSION,
         opcode=Ucall.UV_REGISTER_MEM_SLOT, family=U, checks=(
             Check("start_gpa", lambda r: page_aligned(r.start_gpa), U.U_PARAMETER,
                   "start_gpa not 64 KiB aligned"),
             Check("size", lambda r: r.size > 0 and page_aligned(r.size), U.U_PARAMETER,
                   "size 0 or not a multiple of 64 KiB"),
             Check("size", lambda r: r.start_gpa + r.size < 1 << 64, U.U_PARAMETER,
                   "start_gpa + size wraps"),
             Check("flags", lambda r: r.flags == 0, U.U_P4, "flags not 0"),
             Check("slotid", lambda r: r.slotid < SVM_MEM_SLOTS_NUM, U.U_PARAMETER,
                   "slotid >= SVM_MEM_SLOTS_NUM"),
             STATE,
         )),
    Call("UV_UNREGISTER_MEM_SLOT", memslot.uv_unregister_mem_slot, HV, U.U_PERMISSION,
         opcode=Ucall.UV_UNREGISTER_MEM_SLOT, family=U),
    Call("UV_PAGE_IN", page.uv_page_in, HV, U.U_PERMISSION, opcode=Ucall.UV_PAGE_IN, family=U,
         checks=(ORDER_P5,
                 Check("src_ra", lambda r: _ra_ok(r.src_ra), U.U_P2, "src_ra 0 or in secure memory"),
                 STATE)),
    Call("UV_PAGE_OUT", page.uv_page_out, HV, U.U_PERMISSION, opcode=Ucall.UV_PAGE_OUT, family=U,
         checks=(ORDER_P5,
                 Check("dest_ra", lambda r: _ra_ok(r.dest_ra), U.U_P2, "dest_ra 0 or in secure memory"),
                 STATE)),
    Call("UV_PAGE_INVAL", page.uv_page_inval, HV, U.U_PERMISSION, opcode=Ucall.UV_PAGE_INVAL,
         family=U, checks=(
             Check("order", lambda r: r.order == PAGE_SHIFT, U.U_P3, "order is not 16 (64 KiB)"),
             STATE)),
    Call("UV_SVM_TERMINATE", svm.uv_svm_terminate, HV, U.U_PERMISSION,
         opcode=Ucall.UV_SVM_TERMINATE, family=U),
    Call("UV_SHARE_PAGE", share.uv_share_page, SVM, U.U_PERMISSION, opcode=Ucall.UV_SHARE_PAGE,
         family=U, checks=(SECURE_CALLER, STATE), owned=True),
    Call("UV_UNSHARE_PAGE", share.uv_unshare_page, SVM, U.U_PERMISSION,
         opcode=Ucall.UV_UNSHARE_PAGE, family=U, checks=(SECURE_CALLER, STATE), owned=True),
    Call("UV_UNSHARE_ALL_PAGES", share.uv_unshare_all_pages, SVM, U.U_PERMISSION,
         opcode=Ucall.UV_UNSHARE_ALL_PAGES, family=U, checks=(SECURE_CALLER, STATE), owned=True),
    Call("SvmLoad", access.svm_load, SVM, U.U_PERMISSION, family=U, owned=True, checks=(
        SECURE_CALLER, STATE,
        Check("gpa", lambda r: page_aligned(r.gpa), U.U_PARAMETER, "gpa not 64 KiB aligned"),
        Check("npages", lambda r: 0 < r.npages <= access.MAX_ACCESS_PAGES, U.U_PARAMETER,
              "npages 0 or above the per-call limit"),
    )),
    Call("SvmStore", access.svm_store, SVM, U.U_PERMISSION, family=U, owned=True, checks=(
        SECURE_CALLER, STATE,
        Check("gpa", lambda r: page_aligned(r.gpa), U.U_PARAMETER, "gpa not 64 KiB aligned"),
        Check("data", lambda r: 0 < len(r.data) <= access.MAX_STORE_PAGES << PAGE_SHIFT
              and page_aligned(len(r.data)), U.U_PARAMETER, "data not a whole number of pages"),
    )),
    # a secure guest's `sc 1`: reflected to the HV or answered here (core/reflect.py); a vCPU not in
    # secure supervisor mode never traps to the UV with an hcall
    Call("SvmHcall", reflect.svm_hcall, SVM, H.H_FUNCTION, family=H, owned=True, checks=(
        Check("msr", lambda r: r.vcpu.msr_s and not r.vcpu.msr_hv and not r.vcpu.msr_pr, H.H_FUNCTION,
              "caller is not a secure supervisor vCPU (MSR[S]=1, HV=PR=0): its hcall goes to the HV"),
        STATE,
        Check("args", lambda r: len(r.args) <= 8, H.H_PARAMETER, "more than 8 argument registers"),
    )),
    Call("UvEvictPage", access.uv_evict_page, OPERATOR, None, family=H, checks=(
        STATE,
        Check("gpa", lambda r: page_aligned(r.gpa), H.H_PARAMETER, "gpa not 64 KiB aligned"),
    )),
    Call("UvStatus", access.uv_status, ANYONE, None, checks=(), result=None),
    Call("SetFailpoint", faults.set_failpoint_call("uv"), OPERATOR, None, checks=(), result="errno", family=Errno),
    # the bulk data plane: each page is checked as its UV_PAGE_IN / UV_PAGE_OUT (core/bulk.py)
    Call("UvPageInStream", bulk.uv_page_in_stream, HV, None, checks=(), result=None,
         request_codec=decoder(upb.PageInBatch, MAX_FRAME_PAGES)),
    Call("UvPageOutStream", bulk.uv_page_out_stream, HV, None, checks=(), result=None,
         request_codec=limited(upb.PageOutRequest, MAX_REQUEST_PAGES), response_codec=bytes),
    Call("UvShareHvMemory", bulk.uv_share_hv_memory, HV, U.U_PERMISSION, family=U),
]


# call -> what its handler itself may answer, beyond the checks above (the chaos checker holds
# every observed result to these, with calltable.legal_results).
RESULTS = {
    # H_UNSUPPORTED: the context ended when the HV took its abort's refusal to the guest (esm.abort)
    "UV_ESM": (U.U_SUCCESS, H.H_PARAMETER, U.U_STATE, H.H_UNSUPPORTED),
    "UV_REGISTER_MEM_SLOT": (U.U_SUCCESS, U.U_PARAMETER),
    "SetFailpoint": (Errno.OK, Errno.EINVAL),  # EINVAL: a spec this service does not take (pefsim/faults.py)
    "UV_UNREGISTER_MEM_SLOT": (U.U_SUCCESS, U.U_P2),
    "UV_PAGE_IN": (U.U_SUCCESS, U.U_P2, U.U_P3),
    "UV_PAGE_OUT": (U.U_SUCCESS, U.U_P3, U.U_PARAMETER, U.U_RETRY),
    "UV_PAGE_INVAL": (U.U_SUCCESS, U.U_P2, U.U_P3),
    "UV_SVM_TERMINATE": (U.U_SUCCESS,),
    "UV_SHARE_PAGE": (U.U_SUCCESS, U.U_P2),
    "UV_UNSHARE_PAGE": (U.U_SUCCESS, U.U_P2),
    "UV_UNSHARE_ALL_PAGES": (U.U_SUCCESS, U.U_P2),
    "SvmLoad": (U.U_SUCCESS, U.U_PARAMETER, U.U_RETRY, U.U_BUSY, U.U_P2),
    "SvmStore": (U.U_SUCCESS, U.U_PARAMETER, U.U_RETRY, U.U_BUSY, U.U_P2),
    "UvShareHvMemory": (U.U_SUCCESS, U.U_P2),
    # the HV's answer, whatever it is (a reflected hcall), H_FUNCTION (not modelled, or filtered),
    # H_BUSY (the HV did not answer)
    "SvmHcall": tuple(H),
    "UvEvictPage": (H.H_SUCCESS, H.H_PARAMETER, H.H_P2, H.H_P3, H.H_UNSUPPORTED, H.H_HARDWARE),
}
CALLS = [replace(c, results=frozenset(RESULTS.get(c.name, ()))) for c in CALLS]

A = ALLOW
ABSENT, ACTIVE, SECURE, ABORT = (SvmState.SVM_ABSENT, SvmState.SVM_ACTIVE, SvmState.SVM_SECURE,
                                 SvmState.SVM_ABORT)

# call -> SVM state -> ALLOW or the result. Sources in docs/conformance.md.
STATE_TABLE = {
    "UV_ESM": {ABSENT: A, ACTIVE: U.U_RETRY, SECURE: U.U_RETRY, ABORT: U.U_RETRY},
    "UV_REGISTER_MEM_SLOT": {ABSENT: U.U_PARAMETER, ACTIVE: A, SECURE: A, ABORT: U.U_STATE},
    "UV_UNREGISTER_MEM_SLOT": {ABSENT: U.U_PARAMETER, ACTIVE: A, SECURE: A, ABORT: A},
    "UV_PAGE_IN": {ABSENT: U.U_PARAMETER, ACTIVE: A, SECURE: A, ABORT: U.U_STATE},
    "UV_PAGE_OUT": {ABSENT: U.U_PARAMETER, ACTIVE: A, SECURE: A, ABORT: A},
    "UV_PAGE_INVAL": {ABSENT: U.U_PARAMETER, ACTIVE: A, SECURE: A, ABORT: U.U_STATE},
    "UV_SVM_TERMINATE": {ABSENT: U.U_SUCCESS, ACTIVE: A, SECURE: A, ABORT: A},
    "UV_SHARE_PAGE": {ABSENT: U.U_PERMISSION, ACTIVE: U.U_PERMISSION, SECURE: A,
                      ABORT: U.U_PERMISSION},
    "UV_UNSHARE_PAGE": {ABSENT: U.U_PERMISSION, ACTIVE: U.U_PERMISSION, SECURE: A,
                        ABORT: U.U_PERMISSION},
    "UV_UNSHARE_ALL_PAGES": {ABSENT: U.U_PERMISSION, ACTIVE: U.U_PERMISSION, SECURE: A,
                             ABORT: U.U_PERMISSION},
    "SvmLoad": {ABSENT: U.U_PERMISSION, ACTIVE: U.U_PERMISSION, SECURE: A, ABORT: U.U_PERMISSION},
    "SvmStore": {ABSENT: U.U_PERMISSION, ACTIVE: U.U_PERMISSION, SECURE: A, ABORT: U.U_PERMISSION},
    "UvEvictPage": {ABSENT: H.H_PARAMETER, ACTIVE: H.H_STATE, SECURE: A, ABORT: H.H_STATE},
    # only a secure vCPU makes hcalls through the UV; in ESM (ACTIVE) it waits in `sc 2`
    "SvmHcall": {ABSENT: H.H_FUNCTION, ACTIVE: H.H_FUNCTION, SECURE: A, ABORT: H.H_FUNCTION},
    "UvShareHvMemory": {ABSENT: U.U_PARAMETER, ACTIVE: A, SECURE: A, ABORT: U.U_STATE},
}


def state_of(uv, call: Call, request) -> SvmState:
    from pefsim.calltable import request_lpid

    return uv.state.svm_state(request_lpid(request))


def owner_of(uv, request) -> str | None:
    """The identity that made the SVM's UV_ESM (its guest), for the calls only it may make."""
    from pefsim.calltable import request_lpid

    svm = uv.state.svms.get(request_lpid(request))
    return None if svm is None else svm.owner
