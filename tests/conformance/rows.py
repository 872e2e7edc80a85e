"""The conformance table: call x state x input -> result, with the source of each row.

tests/conformance/ runs every row against the UV and HV cores in process and against real UV and
HV processes (each driven by a scripted peer in the test process), and tools/gen_conformance.py writes docs/conformance.md from these rows
and the services' call tables. Sources:

  UV code   open-power/ultravisor (the published firmware)
  kernel    Linux book3s_hv_uvmem.c / book3s_hv.c (merged code, v5.9+ layout)
  doc       Documentation/powerpc/ultravisor.rst
  pefsim    a choice where the sources are silent, contradict each other or describe a bug;
            the row says why

A row's ``request`` builds the call's request from a context the test prepares for the state
(``c.lpid``, ``c.gpa(gfn)``, the page numbers in each page state, ...). ``check`` names the
argument check of the call table a row exercises, so the tests can tell every check is covered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pefsim.abi import PAGE_SHIFT, PAGE_SIZE, HV_RA_BASE, SECURE_RA_BASE, AbortReturn, H, Hcall, PageInFlag
from pefsim.v1 import common_pb2 as cpb, hypervisor_pb2 as hpb, ultravisor_pb2 as upb


@dataclass(frozen=True)
class Row:
    service: str  # "UV" or "HV"
    call: str
    state: str  # SvmState / VmState name the target is put in first
    case: str  # the input, in words
    expect: str  # the result's name (U_*, H_*, errno) or a gRPC status code name
    source: str
    request: Callable[[Any], Any]
    caller: str = ""  # "hv", "uv", "guest", "operator"; "" = the call's own caller
    check: str = ""  # the call-table check (argument name) the row violates, if any
    setup: str = ""  # a variant of the state's setup
    then: tuple[str, Callable[[Any, Any], bool]] | None = None  # and afterwards (words, test)


# -- UV rows -----------------------------------------------------------------------------------
# Context (tests/conformance/test_uv_conformance.py): c.lpid; c.npages (16); pages by state in
# SVM_SECURE: c.secure_gfn, c.pagedout_gfn (+ c.cipher, its ciphertext), c.shared_gfn; in
# SVM_ACTIVE: c.unbacked_gfn; c.vcpu (the SVM's secure vCPU context); c.gpa(gfn).

def _page_in(c, gfn=None, **kw):
    gfn = c.secure_gfn if gfn is None else gfn
    args = dict(lpid=c.lpid, src_ra=HV_RA_BASE + (gfn << PAGE_SHIFT), dest_gpa=c.gpa(gfn), flags=0,
                order=PAGE_SHIFT, data=bytes(PAGE_SIZE))
    args.update(kw)
    return upb.UvPageInRequest(**args)


def _page_out(c, gfn=None, **kw):
    gfn = c.secure_gfn if gfn is None else gfn
    args = dict(lpid=c.lpid, dest_ra=HV_RA_BASE + (gfn << PAGE_SHIFT), src_gpa=c.gpa(gfn), flags=0,
                order=PAGE_SHIFT)
    args.update(kw)
    return upb.UvPageOutRequest(**args)


def _register(c, **kw):
    args = dict(lpid=c.lpid, start_gpa=c.gpa(1000), size=4 * PAGE_SIZE, flags=0, slotid=5)
    args.update(kw)
    return upb.UvRegisterMemSlotRequest(**args)


def _esm(c, **vcpu):
    ctx = dict(lpid=c.lpid, nip=0x11004)
    ctx.update(vcpu)
    return upb.UvEsmRequest(vcpu=cpb.VcpuContext(**ctx), kbase=PAGE_SIZE, fdt=c.gpa(4))


def _share(msg, c, gfn=None, n=1, **vcpu):
    ctx = dict(lpid=c.lpid, msr_s=True)
    ctx.update(vcpu)
    return msg(vcpu=cpb.VcpuContext(**ctx), gfn=c.shared_gfn if gfn is None else gfn, npages=n)


def _vcpu(c, **kw):
    ctx = dict(lpid=c.lpid, msr_s=True)
    ctx.update(kw)
    return cpb.VcpuContext(**ctx)


A, S, B, X = "SVM_ACTIVE", "SVM_SECURE", "SVM_ABORT", "SVM_ABSENT"

UV_ROWS = [
    # UV_ESM -------------------------------------------------------------------------------------
    Row("UV", "UV_ESM", X, "kbase 0", "U_P2", "UV code", lambda c: upb.UvEsmRequest(
        vcpu=cpb.VcpuContext(lpid=c.lpid), kbase=0, fdt=c.gpa(4)), check="kbase"),
    Row("UV", "UV_ESM", X, "fdt 0", "U_P3", "UV code (the doc says U_P2: numbering shifted)",
        lambda c: upb.UvEsmRequest(vcpu=cpb.VcpuContext(lpid=c.lpid), kbase=PAGE_SIZE, fdt=0),
        check="fdt"),
    Row("UV", "UV_ESM", X, "caller LPID 0 (the HV)", "U_PERMISSION", "UV code",
        lambda c: _esm(c, lpid=0), check="lpid"),
    Row("UV", "UV_ESM", X, "caller MSR[HV] set", "U_PERMISSION", "UV code",
        lambda c: _esm(c, msr_hv=True), check="msr"),
    Row("UV", "UV_ESM", X, "caller MSR[PR] set (user mode)", "U_PERMISSION", "UV code",
        lambda c: _esm(c, msr_pr=True), check="msr"),
    Row("UV", "UV_ESM", X, "kbase 0 from user mode (MSR checked first)", "U_PERMISSION",
        "UV code (uvcall.c: the dispatcher's MSR[HV|PR] check, 1151-1155, before uv_esm's, 884-887)",
        lambda c: upb.UvEsmRequest(vcpu=cpb.VcpuContext(lpid=c.lpid, msr_pr=True), kbase=0, fdt=c.gpa(4)),
        check="msr"),
    Row("UV", "UV_ESM", X, "caller claims MSR[S] but has no SVM", "U_PERMISSION",
        "pefsim: a vCPU in secure mode always has an SVM", lambda c: _esm(c, msr_s=True),
        check="msr_s"),
    Row("UV", "UV_ESM", A, "second UV_ESM during ESM", "U_RETRY", "UV code (create_svm: SVM exists)", _esm),
    Row("UV", "UV_ESM", S, "UV_ESM when already secure", "U_RETRY",
        "UV code (the doc's 'already secure -> U_SUCCESS' is not implemented)", _esm),
    Row("UV", "UV_ESM", B, "UV_ESM while aborting", "U_RETRY", "UV code", _esm),
    Row("UV", "UV_ESM", X, "made by the HV", "U_PERMISSION", "UV code (caller MSR has HV)", _esm,
        caller="hv"),
    # UV_REGISTER_MEM_SLOT -----------------------------------------------------------------------
    Row("UV", "UV_REGISTER_MEM_SLOT", S, "start_gpa not 64 KiB aligned", "U_PARAMETER", "UV code",
        lambda c: _register(c, start_gpa=c.gpa(1000) + 4096), check="start_gpa"),
    Row("UV", "UV_REGISTER_MEM_SLOT", S, "size 0", "U_PARAMETER", "pefsim (the UV code would "
        "register an empty slot)", lambda c: _register(c, size=0), check="size"),
    Row("UV", "UV_REGISTER_MEM_SLOT", S, "start_gpa + size wraps", "U_PARAMETER", "UV code",
        lambda c: _register(c, start_gpa=(1 << 64) - PAGE_SIZE, size=2 * PAGE_SIZE), check="size"),
    Row("UV", "UV_REGISTER_MEM_SLOT", S, "flags not 0", "U_P4",
        "doc (the UV code ignores flags; refusing them keeps the reserved field reserved)",
        lambda c: _register(c, flags=1), check="flags"),
    Row("UV", "UV_REGISTER_MEM_SLOT", S, "slotid >= SVM_MEM_SLOTS_NUM", "U_PARAMETER", "UV code",
        lambda c: _register(c, slotid=32), check="slotid"),
    Row("UV", "UV_REGISTER_MEM_SLOT", X, "no SVM for the lpid", "U_PARAMETER",
        "doc (the UV code passes a NULL SVM on: undefined)", _register),
    Row("UV", "UV_REGISTER_MEM_SLOT", A, "a new slot during ESM", "U_SUCCESS", "UV code", _register),
    Row("UV", "UV_REGISTER_MEM_SLOT", S, "a new slot (memory hot-plug)", "U_SUCCESS", "UV code / kernel",
        _register),
    Row("UV", "UV_REGISTER_MEM_SLOT", S, "slot id already registered", "U_SUCCESS",
        "UV code (memslot_overlap skips the same id, svm_host.c:264-265: the slot is reserved again "
        "and replaced; the doc and the kernel say nothing)", lambda c: _register(c, slotid=0),
        then=("the slot is replaced: the old slot's secure pages are freed",
              lambda c, r: c.status is not None and c.status.secure_pages < c.frames)),
    Row("UV", "UV_REGISTER_MEM_SLOT", S, "range overlaps another slot", "U_PARAMETER", "UV code",
        lambda c: _register(c, start_gpa=c.gpa(2))),
    Row("UV", "UV_REGISTER_MEM_SLOT", S, "larger than the free secure memory", "U_PARAMETER",
        "UV code (reservation fails)", lambda c: _register(c, size=1 << 40)),
    Row("UV", "UV_REGISTER_MEM_SLOT", B, "while aborting", "U_STATE",
        "pefsim (the SVM is being torn down; no source registers slots then)", _register),
    Row("UV", "UV_REGISTER_MEM_SLOT", S, "made by the guest", "U_PERMISSION", "UV code", _register,
        caller="guest"),
    # UV_UNREGISTER_MEM_SLOT ---------------------------------------------------------------------
    Row("UV", "UV_UNREGISTER_MEM_SLOT", X, "no SVM for the lpid", "U_PARAMETER", "doc",
        lambda c: upb.UvUnregisterMemSlotRequest(lpid=c.lpid, slotid=0)),
    Row("UV", "UV_UNREGISTER_MEM_SLOT", S, "unknown slot id", "U_P2",
        "doc (the UV code returns 0 for anything)",
        lambda c: upb.UvUnregisterMemSlotRequest(lpid=c.lpid, slotid=7)),
    Row("UV", "UV_UNREGISTER_MEM_SLOT", A, "the registered slot", "U_SUCCESS", "UV code",
        lambda c: upb.UvUnregisterMemSlotRequest(lpid=c.lpid, slotid=0)),
    Row("UV", "UV_UNREGISTER_MEM_SLOT", S, "the registered slot (pages scrubbed, freed)", "U_SUCCESS",
        "UV code", lambda c: upb.UvUnregisterMemSlotRequest(lpid=c.lpid, slotid=0)),
    Row("UV", "UV_UNREGISTER_MEM_SLOT", B, "the registered slot", "U_SUCCESS",
        "UV code (the v10 abort unregistered them)",
        lambda c: upb.UvUnregisterMemSlotRequest(lpid=c.lpid, slotid=0)),
    Row("UV", "UV_UNREGISTER_MEM_SLOT", S, "made by the guest", "U_PERMISSION", "UV code",
        lambda c: upb.UvUnregisterMemSlotRequest(lpid=c.lpid, slotid=0), caller="guest"),
    # UV_PAGE_IN ---------------------------------------------------------------------------------
    Row("UV", "UV_PAGE_IN", X, "order 12 (before the lpid is looked at)", "U_P5", "UV code",
        lambda c: _page_in(c, 1, order=12), check="order"),
    Row("UV", "UV_PAGE_IN", S, "src_ra 0", "U_P2", "UV code", lambda c: _page_in(c, src_ra=0),
        check="src_ra"),
    Row("UV", "UV_PAGE_IN", S, "src_ra in secure memory", "U_P2", "UV code",
        lambda c: _page_in(c, src_ra=SECURE_RA_BASE), check="src_ra"),
    Row("UV", "UV_PAGE_IN", X, "no SVM for the lpid", "U_PARAMETER", "UV code", lambda c: _page_in(c, 1)),
    Row("UV", "UV_PAGE_IN", B, "any page while aborting", "U_STATE", "UV code", _page_in),
    Row("UV", "UV_PAGE_IN", S, "gpa outside every slot", "U_P3", "UV code",
        lambda c: _page_in(c, 5000)),
    Row("UV", "UV_PAGE_IN", S, "gpa not 64 KiB aligned", "U_P3",
        "pefsim (the kernel passes unaligned gpas on; the firmware's svm_valid_address is a range test "
        "only, svm_host.c:603-618, and accepts it)",
        lambda c: _page_in(c, dest_gpa=c.gpa(c.secure_gfn) + 8)),
    Row("UV", "UV_PAGE_IN", A, "a page not yet in, with its content", "U_SUCCESS", "UV code (plain copy)",
        lambda c: _page_in(c, c.unbacked_gfn)),
    Row("UV", "UV_PAGE_IN", A, "short page (no page at src_ra)", "U_P2", "pefsim",
        lambda c: _page_in(c, c.unbacked_gfn, data=b"x")),
    Row("UV", "UV_PAGE_IN", S, "a page already in", "U_P2",
        "UV code ('page-in of a page that is not paged out')", _page_in),
    Row("UV", "UV_PAGE_IN", S, "paged-out page, tampered ciphertext", "U_P3",
        "UV code (AES-GCM tag check: hypervisor tampering)",
        lambda c: _page_in(c, c.pagedout_gfn, data=bytes([c.cipher[0] ^ 1]) + c.cipher[1:]),
        then=("the page stays paged out and intact: the real ciphertext still pages in",
              lambda c, r: c.page_in_again_ok)),
    Row("UV", "UV_PAGE_IN", S, "paged-out page, its ciphertext", "U_SUCCESS", "UV code",
        lambda c: _page_in(c, c.pagedout_gfn, data=c.cipher)),
    Row("UV", "UV_PAGE_IN", S, "made by the guest", "U_PERMISSION", "UV code", _page_in, caller="guest"),
    # UV_PAGE_OUT --------------------------------------------------------------------------------
    Row("UV", "UV_PAGE_OUT", X, "order 12", "U_P5", "UV code", lambda c: _page_out(c, 1, order=12),
        check="order"),
    Row("UV", "UV_PAGE_OUT", S, "dest_ra 0", "U_P2", "UV code", lambda c: _page_out(c, dest_ra=0),
        check="dest_ra"),
    Row("UV", "UV_PAGE_OUT", X, "no SVM for the lpid", "U_PARAMETER", "UV code", lambda c: _page_out(c, 1)),
    Row("UV", "UV_PAGE_OUT", S, "gpa outside every slot", "U_P3", "UV code", lambda c: _page_out(c, 5000)),
    Row("UV", "UV_PAGE_OUT", S, "a secure page", "U_SUCCESS", "UV code", _page_out,
        then=("the HV gets AES-GCM ciphertext, not the page", lambda c, r: r.data != c.plain)),
    Row("UV", "UV_PAGE_OUT", S, "a page already paged out", "U_PARAMETER", "UV code",
        lambda c: _page_out(c, c.pagedout_gfn)),
    Row("UV", "UV_PAGE_OUT", S, "a shared page", "U_PARAMETER",
        "UV code (the doc says success for shared pages)", lambda c: _page_out(c, c.shared_gfn)),
    Row("UV", "UV_PAGE_OUT", A, "a page not yet in", "U_PARAMETER",
        "pefsim (the firmware has no unbacked state: a GFN never paged in is GPF_SECURE by default, "
        "svm_host.h:474, so it would be encrypted and U_SUCCESS)", lambda c: _page_out(c, c.unbacked_gfn)),
    Row("UV", "UV_PAGE_OUT", B, "a secure page while aborting", "U_SUCCESS",
        "pefsim (the UV code returns 0 WITHOUT copying: a bug the merged abort needs fixed)",
        _page_out, then=("the HV gets the plaintext page back", lambda c, r: r.data == c.plain)),
    Row("UV", "UV_PAGE_OUT", B, "the same page again (an HV that lost the answer)", "U_SUCCESS",
        "pefsim (pages stay until UV_SVM_TERMINATE, so page-out is idempotent while aborting)",
        _page_out, setup="paged-out-once",
        then=("the same plaintext again", lambda c, r: r.data == c.plain)),
    Row("UV", "UV_PAGE_OUT", S, "made by the guest", "U_PERMISSION", "UV code", _page_out, caller="guest"),
    # UV_PAGE_INVAL ------------------------------------------------------------------------------
    Row("UV", "UV_PAGE_INVAL", X, "order 12", "U_P3", "UV code (U_P3 for order here)",
        lambda c: upb.UvPageInvalRequest(lpid=c.lpid, guest_pa=c.gpa(1), order=12), check="order"),
    Row("UV", "UV_PAGE_INVAL", X, "no SVM for the lpid", "U_PARAMETER", "UV code",
        lambda c: upb.UvPageInvalRequest(lpid=c.lpid, guest_pa=c.gpa(1), order=PAGE_SHIFT)),
    Row("UV", "UV_PAGE_INVAL", B, "while aborting", "U_STATE", "UV code",
        lambda c: upb.UvPageInvalRequest(lpid=c.lpid, guest_pa=c.gpa(1), order=PAGE_SHIFT)),
    Row("UV", "UV_PAGE_INVAL", S, "gpa outside every slot", "U_P3", "UV code (the doc says U_P2)",
        lambda c: upb.UvPageInvalRequest(lpid=c.lpid, guest_pa=c.gpa(5000), order=PAGE_SHIFT)),
    Row("UV", "UV_PAGE_INVAL", S, "a secure page", "U_P2", "UV code and doc",
        lambda c: upb.UvPageInvalRequest(lpid=c.lpid, guest_pa=c.gpa(c.secure_gfn), order=PAGE_SHIFT)),
    Row("UV", "UV_PAGE_INVAL", S, "a shared page", "U_SUCCESS", "UV code",
        lambda c: upb.UvPageInvalRequest(lpid=c.lpid, guest_pa=c.gpa(c.shared_gfn), order=PAGE_SHIFT)),
    Row("UV", "UV_PAGE_INVAL", S, "a shared page already invalidated", "U_SUCCESS", "UV code (no-op)",
        lambda c: upb.UvPageInvalRequest(lpid=c.lpid, guest_pa=c.gpa(c.shared_gfn), order=PAGE_SHIFT),
        setup="invalidated"),
    Row("UV", "UV_PAGE_INVAL", S, "made by the guest", "U_PERMISSION", "UV code",
        lambda c: upb.UvPageInvalRequest(lpid=c.lpid, guest_pa=c.gpa(c.shared_gfn), order=PAGE_SHIFT),
        caller="guest"),
    Row("UV", "UV_PAGE_INVAL", A, "during ESM, a page not yet in", "U_P2", "UV code",
        lambda c: upb.UvPageInvalRequest(lpid=c.lpid, guest_pa=c.gpa(c.unbacked_gfn), order=PAGE_SHIFT)),
    # UV_SVM_TERMINATE ---------------------------------------------------------------------------
    Row("UV", "UV_SVM_TERMINATE", X, "no SVM for the lpid", "U_SUCCESS", "UV code (0 even if none)",
        lambda c: upb.UvSvmTerminateRequest(lpid=c.lpid)),
    Row("UV", "UV_SVM_TERMINATE", A, "during ESM", "U_SUCCESS", "UV code",
        lambda c: upb.UvSvmTerminateRequest(lpid=c.lpid),
        then=("the UV holds nothing of the SVM", lambda c, r: c.gone())),
    Row("UV", "UV_SVM_TERMINATE", S, "a secure SVM", "U_SUCCESS", "UV code",
        lambda c: upb.UvSvmTerminateRequest(lpid=c.lpid),
        then=("every page freed (scrubbed before reuse)", lambda c, r: r.pages_freed == c.frames and c.gone())),
    Row("UV", "UV_SVM_TERMINATE", B, "an aborting SVM (the merged abort's last ucall)", "U_SUCCESS",
        "kernel / UV code", lambda c: upb.UvSvmTerminateRequest(lpid=c.lpid),
        then=("every page freed (scrubbed before reuse)", lambda c, r: r.pages_freed == c.npages and c.gone())),
    Row("UV", "UV_SVM_TERMINATE", S, "made by the guest", "U_PERMISSION", "UV code",
        lambda c: upb.UvSvmTerminateRequest(lpid=c.lpid), caller="guest"),
    # UV_SHARE_PAGE / UV_UNSHARE_PAGE / UV_UNSHARE_ALL_PAGES -------------------------------------
    Row("UV", "UV_SHARE_PAGE", S, "caller MSR[S] clear", "U_PERMISSION", "UV code",
        lambda c: _share(upb.UvSharePageRequest, c, c.secure_gfn, msr_s=False), check="msr"),
    Row("UV", "UV_SHARE_PAGE", S, "caller in user mode (MSR[PR])", "U_PERMISSION", "UV code",
        lambda c: _share(upb.UvSharePageRequest, c, c.secure_gfn, msr_pr=True), check="msr"),
    Row("UV", "UV_SHARE_PAGE", X, "no SVM for the lpid", "U_PERMISSION",
        "pefsim (the doc's U_INVALID has no value in any source)",
        lambda c: _share(upb.UvSharePageRequest, c, 1)),
    Row("UV", "UV_SHARE_PAGE", A, "during ESM", "U_PERMISSION", "pefsim (not secure yet)",
        lambda c: _share(upb.UvSharePageRequest, c, c.unbacked_gfn)),
    Row("UV", "UV_SHARE_PAGE", B, "while aborting", "U_PERMISSION", "pefsim (never secure)",
        lambda c: _share(upb.UvSharePageRequest, c, 1)),
    Row("UV", "UV_SHARE_PAGE", S, "range outside every slot", "U_P2", "UV code",
        lambda c: _share(upb.UvSharePageRequest, c, 5000)),
    Row("UV", "UV_SHARE_PAGE", S, "0 pages", "U_P2", "pefsim (the doc lists U_P2 for a bad count)",
        lambda c: _share(upb.UvSharePageRequest, c, c.secure_gfn, n=0)),
    Row("UV", "UV_SHARE_PAGE", S, "a secure page", "U_SUCCESS", "UV code",
        lambda c: _share(upb.UvSharePageRequest, c, c.secure_gfn),
        then=("it reads as zeros, through the HV's page", lambda c, r: c.reads_zero(c.secure_gfn))),
    Row("UV", "UV_SHARE_PAGE", S, "a paged-out page", "U_SUCCESS",
        "UV code (paged back in first, then shared)",
        lambda c: _share(upb.UvSharePageRequest, c, c.pagedout_gfn)),
    Row("UV", "UV_SHARE_PAGE", S, "a page already shared", "U_SUCCESS", "UV code (skipped)",
        lambda c: _share(upb.UvSharePageRequest, c)),
    Row("UV", "UV_SHARE_PAGE", S, "made by the HV", "U_PERMISSION", "UV code",
        lambda c: _share(upb.UvSharePageRequest, c), caller="hv"),
    Row("UV", "UV_UNSHARE_PAGE", S, "caller MSR[S] clear", "U_PERMISSION", "UV code",
        lambda c: _share(upb.UvUnsharePageRequest, c, msr_s=False), check="msr"),
    Row("UV", "UV_UNSHARE_PAGE", X, "no SVM for the lpid", "U_PERMISSION", "pefsim",
        lambda c: _share(upb.UvUnsharePageRequest, c, 1)),
    Row("UV", "UV_UNSHARE_PAGE", A, "during ESM", "U_PERMISSION", "pefsim",
        lambda c: _share(upb.UvUnsharePageRequest, c, c.unbacked_gfn)),
    Row("UV", "UV_UNSHARE_PAGE", B, "while aborting", "U_PERMISSION", "pefsim",
        lambda c: _share(upb.UvUnsharePageRequest, c, 1)),
    Row("UV", "UV_UNSHARE_PAGE", S, "range outside every slot", "U_P2", "UV code",
        lambda c: _share(upb.UvUnsharePageRequest, c, 5000)),
    Row("UV", "UV_UNSHARE_PAGE", S, "a shared page", "U_SUCCESS", "UV code",
        lambda c: _share(upb.UvUnsharePageRequest, c),
        then=("secure again, and zeroed", lambda c, r: c.reads_zero(c.shared_gfn))),
    Row("UV", "UV_UNSHARE_PAGE", S, "made by the HV", "U_PERMISSION", "UV code",
        lambda c: _share(upb.UvUnsharePageRequest, c), caller="hv"),
    Row("UV", "UV_UNSHARE_PAGE", S, "a page that is not shared", "U_SUCCESS",
        "UV code (\"Unsharing a secure page is a idempotent operation\": skipped)",
        lambda c: _share(upb.UvUnsharePageRequest, c, c.secure_gfn)),
    Row("UV", "UV_UNSHARE_ALL_PAGES", S, "caller MSR[S] clear", "U_PERMISSION", "UV code",
        lambda c: upb.UvUnshareAllPagesRequest(vcpu=_vcpu(c, msr_s=False)), check="msr"),
    Row("UV", "UV_UNSHARE_ALL_PAGES", X, "no SVM for the lpid", "U_PERMISSION", "pefsim",
        lambda c: upb.UvUnshareAllPagesRequest(vcpu=_vcpu(c))),
    Row("UV", "UV_UNSHARE_ALL_PAGES", A, "during ESM", "U_PERMISSION", "pefsim",
        lambda c: upb.UvUnshareAllPagesRequest(vcpu=_vcpu(c))),
    Row("UV", "UV_UNSHARE_ALL_PAGES", B, "while aborting", "U_PERMISSION", "pefsim",
        lambda c: upb.UvUnshareAllPagesRequest(vcpu=_vcpu(c))),
    Row("UV", "UV_UNSHARE_ALL_PAGES", S, "made by the HV", "U_PERMISSION", "UV code",
        lambda c: upb.UvUnshareAllPagesRequest(vcpu=_vcpu(c)), caller="hv"),
    Row("UV", "UV_UNSHARE_ALL_PAGES", S, "with a shared page", "U_SUCCESS", "UV code",
        lambda c: upb.UvUnshareAllPagesRequest(vcpu=_vcpu(c)),
        then=("no page is shared any more", lambda c, r: c.shared_count() == 0)),
    # the SVM's loads and stores -----------------------------------------------------------------
    Row("UV", "SvmLoad", S, "caller MSR[S] clear", "U_PERMISSION", "pefsim",
        lambda c: upb.SvmLoadRequest(vcpu=_vcpu(c, msr_s=False), gpa=0, npages=1), check="msr"),
    Row("UV", "SvmLoad", X, "no SVM", "U_PERMISSION", "pefsim",
        lambda c: upb.SvmLoadRequest(vcpu=_vcpu(c), gpa=0, npages=1)),
    Row("UV", "SvmLoad", A, "during ESM", "U_PERMISSION", "pefsim",
        lambda c: upb.SvmLoadRequest(vcpu=_vcpu(c), gpa=0, npages=1)),
    Row("UV", "SvmLoad", B, "while aborting", "U_PERMISSION", "pefsim",
        lambda c: upb.SvmLoadRequest(vcpu=_vcpu(c), gpa=0, npages=1)),
    Row("UV", "SvmLoad", S, "gpa not aligned", "U_PARAMETER", "pefsim",
        lambda c: upb.SvmLoadRequest(vcpu=_vcpu(c), gpa=8, npages=1), check="gpa"),
    Row("UV", "SvmLoad", S, "0 pages", "U_PARAMETER", "pefsim",
        lambda c: upb.SvmLoadRequest(vcpu=_vcpu(c), gpa=0, npages=0), check="npages"),
    Row("UV", "SvmLoad", S, "outside memory", "U_PARAMETER", "pefsim",
        lambda c: upb.SvmLoadRequest(vcpu=_vcpu(c), gpa=c.gpa(5000), npages=1)),
    Row("UV", "SvmLoad", S, "a paged-out page", "U_SUCCESS", "pefsim (faulted back in, decrypted)",
        lambda c: upb.SvmLoadRequest(vcpu=_vcpu(c), gpa=c.gpa(c.pagedout_gfn), npages=1),
        then=("the page's own content", lambda c, r: r.data == c.pagedout_plain)),
    Row("UV", "SvmStore", S, "caller MSR[S] clear", "U_PERMISSION", "pefsim",
        lambda c: upb.SvmStoreRequest(vcpu=_vcpu(c, msr_s=False), gpa=0, data=bytes(PAGE_SIZE)),
        check="msr"),
    Row("UV", "SvmStore", X, "no SVM", "U_PERMISSION", "pefsim",
        lambda c: upb.SvmStoreRequest(vcpu=_vcpu(c), gpa=0, data=bytes(PAGE_SIZE))),
    Row("UV", "SvmStore", A, "during ESM", "U_PERMISSION", "pefsim",
        lambda c: upb.SvmStoreRequest(vcpu=_vcpu(c), gpa=0, data=bytes(PAGE_SIZE))),
    Row("UV", "SvmStore", B, "while aborting", "U_PERMISSION", "pefsim",
        lambda c: upb.SvmStoreRequest(vcpu=_vcpu(c), gpa=0, data=bytes(PAGE_SIZE))),
    Row("UV", "SvmStore", S, "gpa not aligned", "U_PARAMETER", "pefsim",
        lambda c: upb.SvmStoreRequest(vcpu=_vcpu(c), gpa=8, data=bytes(PAGE_SIZE)), check="gpa"),
    Row("UV", "SvmStore", S, "not a whole page", "U_PARAMETER", "pefsim",
        lambda c: upb.SvmStoreRequest(vcpu=_vcpu(c), gpa=0, data=b"x"), check="data"),
    Row("UV", "SvmStore", S, "a secure page", "U_SUCCESS", "pefsim",
        lambda c: upb.SvmStoreRequest(vcpu=_vcpu(c), gpa=c.gpa(c.secure_gfn), data=b"\x5a" * PAGE_SIZE)),
    Row("UV", "UvShareHvMemory", X, "no SVM for the lpid", "U_PARAMETER", "pefsim",
        lambda c: c.share_request()),
    Row("UV", "UvShareHvMemory", B, "while aborting", "U_STATE", "pefsim", lambda c: c.share_request()),
    Row("UV", "UvShareHvMemory", A, "a file whose nonce does not match", "U_P2",
        "pefsim (not this HV's directory: the UV must not read another's)",
        lambda c: c.share_request("bad nonce")),
    Row("UV", "UvShareHvMemory", S, "the HV's file for the slot", "U_SUCCESS", "pefsim",
        lambda c: c.share_request(),
        then=("UV_PAGE_IN without data reads the page at src_ra",
              lambda c, r: c.shared_page_in_ok)),
    Row("UV", "UvShareHvMemory", S, "a slot that does not exist", "U_P2", "pefsim",
        lambda c: c.share_request(slot_id=9)),
    Row("UV", "UvShareHvMemory", S, "a file outside --hv-memory-dir (nonce right)", "U_P2",
        "pefsim (the UV opens only the HV's RAM files: vm-<lpid>/slot-<id>.ram in that directory)",
        lambda c: c.share_request("outside")),
    Row("UV", "UvShareHvMemory", S, "a symlink in the directory to a file outside", "U_P2",
        "pefsim (resolved, and opened with O_NOFOLLOW)", lambda c: c.share_request("symlink")),
    Row("UV", "UvShareHvMemory", S, "a path with ..", "U_P2", "pefsim (the HV names its files plainly)",
        lambda c: c.share_request("dotdot")),
    Row("UV", "UvShareHvMemory", S, "another lpid's RAM file", "U_P2", "pefsim (vm-<lpid> is the request's)",
        lambda c: c.share_request("other lpid")),
    Row("UV", "UvShareHvMemory", S, "a file not the slot's size", "U_P2", "pefsim (npages x 64 KiB exactly)",
        lambda c: c.share_request("wrong size")),
    # a secure guest's hcalls (core/reflect.py) ------------------------------------------------------
    Row("UV", "SvmHcall", S, "H_SVM_INIT_DONE again, from the SVM", "H_SUCCESS",
        "open Ultravisor (reflects every hcall but H_RANDOM); the HV's answer",
        lambda c: upb.SvmHcallRequest(vcpu=_vcpu(c), opcode=Hcall.H_SVM_INIT_DONE),
        then=("reflected to the HV", lambda c, r: r.reflected)),
    Row("UV", "SvmHcall", S, "H_RANDOM (0x300)", "H_FUNCTION", "open Ultravisor (H_RANDOM is not reflected)",
        lambda c: upb.SvmHcallRequest(vcpu=_vcpu(c), opcode=0x300),
        then=("answered by the UV", lambda c, r: not r.reflected)),
    Row("UV", "SvmHcall", S, "caller MSR[S] clear", "H_FUNCTION", "pefsim (its hcall goes to the HV)",
        lambda c: upb.SvmHcallRequest(vcpu=_vcpu(c, msr_s=False), opcode=Hcall.H_SVM_INIT_DONE), check="msr"),
    Row("UV", "SvmHcall", S, "9 argument registers", "H_PARAMETER", "pefsim",
        lambda c: upb.SvmHcallRequest(vcpu=_vcpu(c), opcode=Hcall.H_SVM_INIT_DONE, args=[0] * 9), check="args"),
    Row("UV", "SvmHcall", X, "no SVM", "H_FUNCTION", "pefsim",
        lambda c: upb.SvmHcallRequest(vcpu=_vcpu(c), opcode=Hcall.H_SVM_INIT_DONE)),
    Row("UV", "SvmHcall", A, "during ESM (the vCPU waits in `sc 2`)", "H_FUNCTION", "pefsim",
        lambda c: upb.SvmHcallRequest(vcpu=_vcpu(c), opcode=Hcall.H_SVM_INIT_DONE)),
    Row("UV", "SvmHcall", B, "while aborting", "H_FUNCTION", "pefsim",
        lambda c: upb.SvmHcallRequest(vcpu=_vcpu(c), opcode=Hcall.H_SVM_INIT_DONE)),
    Row("UV", "UvEvictPage", S, "a secure page", "H_SUCCESS", "kernel (H_SVM_PAGE_OUT)",
        lambda c: upb.UvEvictPageRequest(lpid=c.lpid, gpa=c.gpa(c.secure_gfn))),
    Row("UV", "UvEvictPage", S, "gpa not aligned", "H_PARAMETER", "pefsim",
        lambda c: upb.UvEvictPageRequest(lpid=c.lpid, gpa=8), check="gpa"),
    Row("UV", "UvEvictPage", X, "no SVM", "H_PARAMETER", "pefsim",
        lambda c: upb.UvEvictPageRequest(lpid=c.lpid, gpa=0)),
    Row("UV", "UvEvictPage", A, "during ESM", "H_STATE", "pefsim",
        lambda c: upb.UvEvictPageRequest(lpid=c.lpid, gpa=0)),
    Row("UV", "UvEvictPage", B, "while aborting", "H_STATE", "pefsim",
        lambda c: upb.UvEvictPageRequest(lpid=c.lpid, gpa=0)),
    Row("UV", "UvEvictPage", S, "made by the HV", "PERMISSION_DENIED", "pefsim (operator only)",
        lambda c: upb.UvEvictPageRequest(lpid=c.lpid, gpa=0), caller="hv"),
    # `pefsim failpoint`: only refusals here (an armed point would stay armed in the process under test)
    Row("UV", "SetFailpoint", S, "made by the HV", "PERMISSION_DENIED", "pefsim (operator only)",
        lambda c: cpb.SetFailpointRequest(spec="uv.esm.before_abort"), caller="hv"),
    Row("UV", "SetFailpoint", S, "a failpoint of the HV", "EINVAL", "pefsim",
        lambda c: cpb.SetFailpointRequest(spec="hv.abort.page_out"), caller="operator"),
    Row("UV", "SetFailpoint", S, "hit number 0", "EINVAL", "pefsim",
        lambda c: cpb.SetFailpointRequest(spec="uv.esm.before_abort:0"), caller="operator"),
    Row("UV", "SetFailpoint", S, "=crash (one process only)", "EINVAL", "pefsim",
        lambda c: cpb.SetFailpointRequest(spec="uv.esm.before_abort=crash"), caller="operator"),
]


# -- HV rows -----------------------------------------------------------------------------------
# Context (tests/conformance/test_hv_conformance.py): a real HV process whose UV is scripted in
# the test; c.lpid (a VM of 16 pages in slot 0), c.gpa(gfn); the test is the UV (role "uv").

def _h_page_in(c, gfn=2, **kw):
    args = dict(lpid=c.lpid, guest_pa=c.gpa(gfn), flags=0, order=PAGE_SHIFT)
    args.update(kw)
    return hpb.HSvmPageInRequest(**args)


def _h_page_out(c, gfn=2, **kw):
    args = dict(lpid=c.lpid, guest_pa=c.gpa(gfn), flags=0, order=PAGE_SHIFT)
    args.update(kw)
    return hpb.HSvmPageOutRequest(**args)


def _bulk(c, **kw):
    args = dict(lpid=c.lpid, guest_pa=[c.gpa(g) for g in range(c.npages)], flags=0, order=PAGE_SHIFT)
    args.update(kw)
    return hpb.HSvmPageInBulkRequest(**args)


def _abort(c):
    return hpb.HSvmInitAbortRequest(lpid=c.lpid, srr0=0x11004, srr1_msr_s=False)


N, T, SEC, NONE = "VM_NORMAL", "VM_TRANSIENT", "VM_SECURE", "VM_ABSENT"

HV_ROWS = [
    # H_SVM_PAGE_IN ------------------------------------------------------------------------------
    Row("HV", "H_SVM_PAGE_IN", T, "made by the guest (no MSR[S] in SRR1)", "H_UNSUPPORTED",
        "kernel 8c47b6ff29e3", _h_page_in, caller="guest"),
    Row("HV", "H_SVM_PAGE_IN", N, "a normal VM", "H_UNSUPPORTED", "kernel", _h_page_in),
    Row("HV", "H_SVM_PAGE_IN", N, "a normal VM, order 12 (state is checked first)", "H_UNSUPPORTED",
        "kernel", lambda c: _h_page_in(c, order=12)),
    Row("HV", "H_SVM_PAGE_IN", NONE, "no VM with the lpid", "H_PARAMETER",
        "pefsim (in KVM the calling vCPU's VM always exists)", _h_page_in),
    Row("HV", "H_SVM_PAGE_IN", T, "order 12", "H_P3", "kernel", lambda c: _h_page_in(c, order=12),
        check="order"),
    Row("HV", "H_SVM_PAGE_IN", T, "flags 0x2", "H_P2", "kernel", lambda c: _h_page_in(c, flags=2),
        check="flags"),
    Row("HV", "H_SVM_PAGE_IN", T, "gpa outside every memslot", "H_PARAMETER", "kernel",
        lambda c: _h_page_in(c, 5000)),
    Row("HV", "H_SVM_PAGE_IN", T, "a normal page", "H_SUCCESS", "kernel", _h_page_in,
        then=("the UV got the page's content, the HV page is scrubbed",
              lambda c, r: c.uv_got(2) == c.content(2) and c.hv_page_zero(2))),
    Row("HV", "H_SVM_PAGE_IN", T, "a page already paged in", "H_PARAMETER", "kernel",
        _h_page_in, setup="paged-in"),
    Row("HV", "H_SVM_PAGE_IN", T, "the UV refuses the page", "H_PARAMETER",
        "kernel for the result (5.9+; before, the UV_PAGE_IN result was ignored: H_SUCCESS); pefsim for "
        "the state after: the GFN stays normal and a retry can succeed, where the kernel has already "
        "marked it device-backed (kvmppc_uvmem_get_page) and answers a retry H_PARAMETER",
        _h_page_in, setup="uv-refuses",
        then=("the GFN is still normal, its content in the HV",
              lambda c, r: c.gfn_state(2) == "GFN_NORMAL" and c.hv_page(2) == c.content(2))),
    Row("HV", "H_SVM_PAGE_IN", SEC, "H_PAGE_IN_SHARED on a secure page", "H_SUCCESS",
        "kernel (skip_page_out: content dropped); pefsim for the zeroed page (the kernel's replacement "
        "page holds whatever its allocator had)",
        lambda c: _h_page_in(c, flags=PageInFlag.H_PAGE_IN_SHARED), setup="paged-in",
        then=("GFN shared, page zeroed", lambda c, r: c.gfn_state(2) == "GFN_SHARED" and c.hv_page_zero(2))),
    Row("HV", "H_SVM_PAGE_IN", SEC, "a paged-out page", "H_SUCCESS", "kernel",
        _h_page_in, setup="paged-out",
        then=("the UV got the ciphertext back", lambda c, r: c.uv_got(2) == c.cipher)),
    # HSvmPageInBulk (pefsim's batched H_SVM_PAGE_IN) --------------------------------------------
    Row("HV", "HSvmPageInBulk", T, "made by the guest", "H_UNSUPPORTED", "as H_SVM_PAGE_IN", _bulk,
        caller="guest"),
    Row("HV", "HSvmPageInBulk", N, "a normal VM", "H_UNSUPPORTED", "as H_SVM_PAGE_IN", _bulk),
    Row("HV", "HSvmPageInBulk", NONE, "no VM with the lpid", "H_PARAMETER", "as H_SVM_PAGE_IN", _bulk),
    Row("HV", "HSvmPageInBulk", T, "every page of the slot", "H_SUCCESS", "as H_SVM_PAGE_IN, page by page",
        _bulk, then=("the UV got every page's content, each HV page scrubbed, each result H_SUCCESS",
                     lambda c, r: all(c.uv_got(g) == c.content(g) and c.hv_page_zero(g) for g in range(c.npages))
                     and list(r.rcs) == [0] * c.npages)),
    Row("HV", "HSvmPageInBulk", T, "order 12", "H_P3", "as H_SVM_PAGE_IN", lambda c: _bulk(c, order=12)),
    Row("HV", "HSvmPageInBulk", T, "H_PAGE_IN_SHARED", "H_P2",
        "pefsim (sharing is H_SVM_PAGE_IN's alone)", lambda c: _bulk(c, flags=PageInFlag.H_PAGE_IN_SHARED)),
    Row("HV", "HSvmPageInBulk", SEC, "pages already in", "H_PARAMETER", "as H_SVM_PAGE_IN", _bulk),
    Row("HV", "HSvmPageInBulk", T, "the UV refuses the pages", "H_PARAMETER", "as H_SVM_PAGE_IN", _bulk,
        setup="uv-refuses"),
    # H_SVM_PAGE_OUT -----------------------------------------------------------------------------
    Row("HV", "H_SVM_PAGE_OUT", SEC, "made by the guest", "H_UNSUPPORTED",
        "pefsim (8c47b6ff29e3 tests MSR[S] in SRR1, which a secure guest's hcalls carry, and the open "
        "UV reflects them unfiltered: the kernel would execute it; pefsim's UV filters H_SVM_* from an "
        "SVM, as that commit's message assumes)", _h_page_out, caller="guest"),
    Row("HV", "H_SVM_PAGE_OUT", N, "a normal VM", "H_UNSUPPORTED", "kernel", _h_page_out),
    Row("HV", "H_SVM_PAGE_OUT", NONE, "no VM with the lpid", "H_PARAMETER", "pefsim", _h_page_out),
    Row("HV", "H_SVM_PAGE_OUT", SEC, "order 12", "H_P3", "kernel", lambda c: _h_page_out(c, order=12),
        check="order"),
    Row("HV", "H_SVM_PAGE_OUT", SEC, "flags 1", "H_P2", "kernel", lambda c: _h_page_out(c, flags=1),
        check="flags"),
    Row("HV", "H_SVM_PAGE_OUT", SEC, "gpa outside every memslot", "H_PARAMETER", "kernel",
        lambda c: _h_page_out(c, 5000)),
    Row("HV", "H_SVM_PAGE_OUT", T, "a page that is not paged in", "H_SUCCESS",
        "kernel (nothing done)", _h_page_out),
    Row("HV", "H_SVM_PAGE_OUT", SEC, "a secure page", "H_SUCCESS", "kernel", _h_page_out,
        setup="paged-in", then=("the HV page holds what the UV handed out",
                                lambda c, r: c.gfn_state(2) == "GFN_SECURE_OUT" and c.hv_page(2) == c.uv_sent(2))),
    Row("HV", "H_SVM_PAGE_OUT", SEC, "the UV refuses", "H_PARAMETER", "kernel", _h_page_out,
        setup="paged-in,uv-refuses"),
    # H_SVM_INIT_START ---------------------------------------------------------------------------
    Row("HV", "H_SVM_INIT_START", N, "made by the guest", "H_UNSUPPORTED", "kernel 8c47b6ff29e3",
        lambda c: hpb.HSvmInitStartRequest(lpid=c.lpid), caller="guest"),
    Row("HV", "H_SVM_INIT_START", NONE, "no VM with the lpid", "H_PARAMETER", "pefsim",
        lambda c: hpb.HSvmInitStartRequest(lpid=c.lpid)),
    Row("HV", "H_SVM_INIT_START", N, "a normal VM", "H_SUCCESS", "kernel",
        lambda c: hpb.HSvmInitStartRequest(lpid=c.lpid),
        then=("VM transient, every memslot registered",
              lambda c, r: c.vm_state() == "VM_TRANSIENT" and c.registered() == 1)),
    Row("HV", "H_SVM_INIT_START", N, "without KVM_CAP_PPC_SECURE_GUEST", "H_AUTHORITY",
        "kernel (5.7+)", lambda c: hpb.HSvmInitStartRequest(lpid=c.lpid), setup="not-capable",
        then=("VM transient anyway (377f02d487b5)", lambda c, r: c.vm_state() == "VM_TRANSIENT")),
    Row("HV", "H_SVM_INIT_START", N, "the UV refuses a memslot", "H_PARAMETER", "kernel",
        lambda c: hpb.HSvmInitStartRequest(lpid=c.lpid), setup="uv-refuses-slot"),
    Row("HV", "H_SVM_INIT_START", T, "again during ESM", "H_SUCCESS",
        "kernel (unguarded re-entry; every slot registered again, which the firmware accepts by "
        "replacing it: also against pefsim's own UV, tests/inprocess/test_init_start_reentry.py. The "
        "kernel's comment table calls it an error; its side effect, a fresh zeroed GFN tracking "
        "array, is not modelled: pefsim's HV keeps its GFN states)",
        lambda c: hpb.HSvmInitStartRequest(lpid=c.lpid)),
    Row("HV", "H_SVM_INIT_START", SEC, "after INIT_DONE", "H_SUCCESS",
        "kernel (unguarded: the assignment secure_guest = INIT_START makes the VM transient again; "
        "against pefsim's own UV too, the replaced slot's secure pages then gone)",
        lambda c: hpb.HSvmInitStartRequest(lpid=c.lpid),
        then=("VM transient again", lambda c, r: c.vm_state() == "VM_TRANSIENT")),
    # H_SVM_INIT_DONE ----------------------------------------------------------------------------
    Row("HV", "H_SVM_INIT_DONE", T, "made by the guest", "H_UNSUPPORTED", "kernel 8c47b6ff29e3",
        lambda c: hpb.HSvmInitDoneRequest(lpid=c.lpid), caller="guest"),
    Row("HV", "H_SVM_INIT_DONE", NONE, "no VM with the lpid", "H_PARAMETER", "pefsim",
        lambda c: hpb.HSvmInitDoneRequest(lpid=c.lpid)),
    Row("HV", "H_SVM_INIT_DONE", N, "before INIT_START", "H_UNSUPPORTED", "kernel and doc",
        lambda c: hpb.HSvmInitDoneRequest(lpid=c.lpid)),
    Row("HV", "H_SVM_INIT_DONE", T, "during ESM", "H_SUCCESS", "kernel",
        lambda c: hpb.HSvmInitDoneRequest(lpid=c.lpid),
        then=("VM secure; every GFN secure (the 5.9+ sweep, no copy)",
              lambda c, r: c.vm_state() == "VM_SECURE" and c.gfn_count("GFN_SECURE_IN") == c.npages)),
    Row("HV", "H_SVM_INIT_DONE", SEC, "again", "H_SUCCESS", "kernel",
        lambda c: hpb.HSvmInitDoneRequest(lpid=c.lpid)),
    # H_SVM_INIT_ABORT ---------------------------------------------------------------------------
    Row("HV", "H_SVM_INIT_ABORT", N, "a normal VM", "H_UNSUPPORTED",
        "kernel and doc; where it goes: book3s_64_entry.S (HRFI_TO_GUEST when secure_guest == 0)", _abort,
        then=("the result goes to the guest, not the UV: the vCPU resumed once with H_UNSUPPORTED at srr0; "
              "the UV's context never resumes (returned_to GUEST)",
              lambda c, r: r.returned_to == AbortReturn.ABORT_RETURN_GUEST and c.resumed_once(0x11004, H.H_UNSUPPORTED))),
    Row("HV", "H_SVM_INIT_ABORT", NONE, "no VM with the lpid", "H_PARAMETER", "pefsim", _abort),
    Row("HV", "H_SVM_INIT_ABORT", SEC, "after INIT_DONE", "H_STATE", "kernel (respin) and doc", _abort,
        then=("back to the UV (UV_RETURN: secure_guest != 0), no resume of the vCPU",
              lambda c, r: r.returned_to == AbortReturn.ABORT_RETURN_UNSPECIFIED and not c.resumes())),
    Row("HV", "H_SVM_INIT_ABORT", T, "during ESM", "H_PARAMETER", "kernel (merged v5.6)", _abort,
        setup="paged-in",
        then=("every page back with its content, secure_guest 0, UV_SVM_TERMINATE, the vCPU "
              "resumed once with H_PARAMETER at srr0",
              lambda c, r: c.hv_page(2) == c.content(2) and c.vm_state() == "VM_NORMAL"
              and c.terminated() and c.resumed_once(0x11004))),
    Row("HV", "H_SVM_INIT_ABORT", T, "made by the guest's own vCPU", "H_PARAMETER",
        "kernel e3326ae3d59e (no MSR[S] check: the VM state decides)", _abort, caller="guest"),
    Row("HV", "H_SVM_INIT_ABORT", N, "made by the guest of a normal VM", "H_UNSUPPORTED", "kernel",
        _abort, caller="guest"),
    Row("HV", "H_SVM_INIT_ABORT", T, "with abort_return = uv (v10)", "H_SUCCESS",
        "the v10 proposal (pefsim switch): INIT_ABORT cleared on the hcall's own exit path "
        "(check_svm_abort) before its last UV_RETURN", _abort, setup="v10",
        then=("every page back, the VM normal already, memslots unregistered, no UV_SVM_TERMINATE and "
              "no resume from the HV", lambda c, r: c.secure_guest() == 0 and c.hv_page(2) == c.content(2)
              and c.unregistered() == 1 and not c.terminated() and not c.resumes())),
    # control surface ----------------------------------------------------------------------------
    Row("HV", "ResetVm", N, "a normal VM", "OK", "kernel (KVM_PPC_SVM_OFF: nothing to do)",
        lambda c: hpb.ResetVmRequest(lpid=c.lpid)),
    Row("HV", "ResetVm", SEC, "a vCPU running", "EBUSY", "kernel", lambda c: hpb.ResetVmRequest(lpid=c.lpid),
        setup="running"),
    Row("HV", "ResetVm", SEC, "vCPUs stopped", "OK", "kernel (pefsim for the scrubbed HV page: the kernel's replacement page is not zeroed)",
        lambda c: hpb.ResetVmRequest(lpid=c.lpid), setup="paged-in",
        then=("no page-out; memslots unregistered; terminated; VM normal, HV page scrubbed",
              lambda c, r: c.vm_state() == "VM_NORMAL" and c.unregistered() == 1 and c.terminated()
              and not c.page_outs() and c.hv_page_zero(2))),
    Row("HV", "ResetVm", SEC, "UV_SVM_TERMINATE fails", "EINVAL", "kernel",
        lambda c: hpb.ResetVmRequest(lpid=c.lpid), setup="uv-refuses-terminate"),
    Row("HV", "ResetVm", NONE, "no VM", "ENOENT", "pefsim", lambda c: hpb.ResetVmRequest(lpid=c.lpid)),
    Row("HV", "DestroyVm", SEC, "a secure VM", "OK", "kernel", lambda c: hpb.DestroyVmRequest(lpid=c.lpid),
        then=("UV_SVM_TERMINATE issued", lambda c, r: r.terminated and c.terminated())),
    Row("HV", "DestroyVm", N, "a normal VM", "OK", "kernel", lambda c: hpb.DestroyVmRequest(lpid=c.lpid),
        then=("no UV_SVM_TERMINATE", lambda c, r: not r.terminated and not c.terminated())),
    Row("HV", "DestroyVm", NONE, "no VM", "ENOENT", "pefsim", lambda c: hpb.DestroyVmRequest(lpid=c.lpid)),
    Row("HV", "CreateVm", NONE, "no memslot", "EINVAL", "pefsim",
        lambda c: hpb.CreateVmRequest(name="x", vcpu_endpoint="127.0.0.1:1"), caller="operator"),
    Row("HV", "CreateVm", NONE, "overlapping memslots", "EINVAL", "pefsim (KVM: EEXIST)",
        lambda c: hpb.CreateVmRequest(name="x", vcpu_endpoint="127.0.0.1:1", memslots=[
            cpb.Memslot(slot_id=0, base_gfn=0, npages=4), cpb.Memslot(slot_id=1, base_gfn=2, npages=4)]),
        caller="operator"),
    Row("HV", "CreateVm", NONE, "a memslot past 2^64", "EINVAL", "pefsim",
        lambda c: hpb.CreateVmRequest(name="x", vcpu_endpoint="127.0.0.1:1", memslots=[
            cpb.Memslot(slot_id=0, base_gfn=(1 << 48) - 1, npages=2)]), caller="operator"),
    Row("HV", "CreateVm", NONE, "a vCPU endpoint that is no host:port (unix: path)", "EINVAL", "pefsim",
        lambda c: hpb.CreateVmRequest(name="x", vcpu_endpoint="unix:/tmp/vcpu.sock", memslots=[
            cpb.Memslot(slot_id=0, base_gfn=0, npages=1)]), caller="operator"),
    Row("HV", "CreateVm", NONE, "made by the UV", "PERMISSION_DENIED", "pefsim (the VMM's call)",
        lambda c: hpb.CreateVmRequest(name="x", vcpu_endpoint="127.0.0.1:1"), caller="uv"),
    Row("HV", "VcpuLoad", N, "gpa not aligned", "EINVAL", "pefsim",
        lambda c: hpb.VcpuLoadRequest(lpid=c.lpid, gpa=8, npages=1), caller="guest", check="gpa"),
    Row("HV", "VcpuLoad", N, "0 pages", "EINVAL", "pefsim",
        lambda c: hpb.VcpuLoadRequest(lpid=c.lpid, gpa=0, npages=0), caller="guest", check="npages"),
    Row("HV", "VcpuLoad", SEC, "a secure page, from the vCPU", "EFAULT",
        "pefsim (a normal-mode access to secure memory faults)",
        lambda c: hpb.VcpuLoadRequest(lpid=c.lpid, gpa=0, npages=1), caller="guest"),
    Row("HV", "VcpuStore", N, "not a whole page", "EINVAL", "pefsim",
        lambda c: hpb.VcpuStoreRequest(lpid=c.lpid, gpa=0, data=b"x"), caller="guest", check="data"),
    Row("HV", "VcpuStore", N, "gpa not aligned", "EINVAL", "pefsim",
        lambda c: hpb.VcpuStoreRequest(lpid=c.lpid, gpa=8, data=bytes(PAGE_SIZE)), caller="guest",
        check="gpa"),
    Row("HV", "HostReadPage", SEC, "a secure page", "OK", "kernel (migrate_to_ram: UV_PAGE_OUT)",
        lambda c: hpb.HostReadPageRequest(lpid=c.lpid, gpa=c.gpa(2)), setup="paged-in", caller="operator",
        then=("the host sees what the UV handed out, GFN paged out",
              lambda c, r: r.data == c.uv_sent(2) and c.gfn_state(2) == "GFN_SECURE_OUT")),
    Row("HV", "HostReadPage", SEC, "gpa not aligned", "EINVAL", "pefsim",
        lambda c: hpb.HostReadPageRequest(lpid=c.lpid, gpa=8), caller="operator", check="gpa"),
    Row("HV", "HostReadPage", SEC, "more pages than one call reads", "EINVAL", "pefsim",
        lambda c: hpb.HostReadPageRequest(lpid=c.lpid, gpa=0, npages=65), caller="operator", check="npages"),
    Row("HV", "HostReadPage", SEC, "three pages, the middle one secure", "OK", "pefsim (one touch a page)",
        lambda c: hpb.HostReadPageRequest(lpid=c.lpid, gpa=c.gpa(1), npages=3), setup="paged-in",
        caller="operator",
        then=("the secure page is paged out in place, the others read as they are",
              lambda c, r: len(r.data) == 3 * PAGE_SIZE and r.data[PAGE_SIZE:2 * PAGE_SIZE] == c.uv_sent(2)
              and c.gfn_state(2) == "GFN_SECURE_OUT")),
    Row("HV", "HostUnmapPage", SEC, "gpa not aligned", "EINVAL", "pefsim",
        lambda c: hpb.HostUnmapPageRequest(lpid=c.lpid, gpa=8), caller="operator", check="gpa"),
    Row("HV", "HostUnmapPage", SEC, "a shared page", "OK", "kernel (kvm_unmap_radix: UV_PAGE_INVAL)",
        lambda c: hpb.HostUnmapPageRequest(lpid=c.lpid, gpa=c.gpa(2)), caller="operator",
        setup="shared", then=("UV_PAGE_INVAL issued", lambda c, r: c.invalidated() == 1)),
    Row("HV", "SetFailpoint", SEC, "made by the UV", "PERMISSION_DENIED", "pefsim (operator only)",
        lambda c: cpb.SetFailpointRequest(spec="hv.abort.page_out"), caller="uv"),
    Row("HV", "SetFailpoint", SEC, "an unknown failpoint", "EINVAL", "pefsim",
        lambda c: cpb.SetFailpointRequest(spec="hv.nowhere"), caller="operator"),
    Row("HV", "SetFailpoint", SEC, "=lose where no answer arrives", "EINVAL", "pefsim",
        lambda c: cpb.SetFailpointRequest(spec="hv.abort.before_resume=lose"), caller="operator"),
    Row("HV", "SetFailpoint", SEC, "clear one not armed", "EINVAL", "pefsim",
        lambda c: cpb.SetFailpointRequest(spec="hv.esm.init_done", clear=True), caller="operator"),
]



def _control_rows() -> list[Row]:
    """The VMM's calls in every VM state: ENOENT without a VM, otherwise what a plain, valid
    request gives in that state."""
    requests = {
        "RunVm": (lambda c: hpb.RunVmRequest(lpid=c.lpid), "operator"),
        "StopVm": (lambda c: hpb.StopVmRequest(lpid=c.lpid), "operator"),
        "ResetVm": (lambda c: hpb.ResetVmRequest(lpid=c.lpid), "operator"),
        "DestroyVm": (lambda c: hpb.DestroyVmRequest(lpid=c.lpid), "operator"),
        "SetMemslot": (lambda c: hpb.SetMemslotRequest(
            lpid=c.lpid, slot=cpb.Memslot(slot_id=1, base_gfn=1000, npages=4)), "operator"),
        "VcpuLoad": (lambda c: hpb.VcpuLoadRequest(lpid=c.lpid, gpa=0, npages=1), "guest"),
        "VcpuStore": (lambda c: hpb.VcpuStoreRequest(lpid=c.lpid, gpa=0, data=bytes(PAGE_SIZE)), "guest"),
        "HostReadPage": (lambda c: hpb.HostReadPageRequest(lpid=c.lpid, gpa=0), "operator"),
        "HostUnmapPage": (lambda c: hpb.HostUnmapPageRequest(lpid=c.lpid, gpa=0), "operator"),
        "VmSession": (lambda c: hpb.VmSessionRequest(lpid=c.lpid), "guest"),
    }
    # what differs from OK; a secure VM's pages are secure, so the vCPU's normal-mode access faults
    special = {("VcpuLoad", SEC): "EFAULT", ("VcpuStore", SEC): "EFAULT"}
    why = {
        "EFAULT": "pefsim (a normal-mode access to secure memory faults)",
        "ENOENT": "pefsim (no VM with the lpid)",
        "OK": "kernel / KVM ioctl semantics",
    }
    rows = []
    for call, (build, who) in requests.items():
        for state in (NONE, N, T, SEC):
            expect = "ENOENT" if state == NONE else special.get((call, state), "OK")
            rows.append(Row("HV", call, state, "a plain request", expect, why[expect], build,
                            caller=who))
    return rows


HV_ROWS += _control_rows()
ROWS = UV_ROWS + HV_ROWS


# -- the choices, where the sources leave one (rendered at the top of docs/conformance.md) -----

CHOICES = [
    ("The guest after a failed UV_ESM",
     "As Linux: any result other than U_SUCCESS (an abort's H_PARAMETER, a refused check) makes the "
     "guest call ibm,os-term (prom_init's setup_secure_guest: prom_rtas_os_term(\"Switch to secure mode "
     "failed.\")); its VMM stops the VM (StopVm), and the VM and its memory stay with the HV, read "
     "through the host (HostReadPage), until it is destroyed. `--on-esm-failure continue` keeps the "
     "older pefsim behaviour, a guest that carries on as a normal VM. The demo, `pefsim chaos` and "
     "`pefsim sim` print which one their guests ran.", "prom_init.c (setup_secure_guest)"),
    ("Ultracall return codes",
     "Linux's values where Linux defines the name (U_BUSY = +1, not the firmware's -2 that equals "
     "U_FUNCTION); the firmware's for the names only it has (U_RETRY -5, U_STATE -75, U_BAD_MODE "
     "-59). U_INVAL (allocator-internal), U_INVALID and U_NO_KEY (no value in any source) are never "
     "produced.", "ultravisor-api.h, uapi_uvcall.h"),
    ("UV_ESM synchronous checks",
     "UV code order and numbering: kbase 0 -> U_P2, fdt 0 -> U_P3, LPID 0 or MSR[HV|PR] -> "
     "U_PERMISSION, an existing SVM (even a secure one) -> U_RETRY. The doc's 'already secure -> "
     "U_SUCCESS' is not implemented anywhere.", "UV code"),
    ("ESM failures reach the guest as H_PARAMETER",
     "Every failure after H_SVM_INIT_START (memslot registration, page-in, FDT, blob signature or "
     "digest, INIT_DONE) goes through H_SVM_INIT_ABORT; the guest sees H_PARAMETER (-4) as UV_ESM's "
     "result, never the doc's U_PERMISSION.", "UV code, kernel"),
    ("H_SVM_INIT_ABORT (default: merged kernel)",
     "The HV pages every secure page out WITH its content, sets secure_guest = 0, issues "
     "UV_SVM_TERMINATE and resumes the guest itself with H_PARAMETER at SRR0 (an HRFID: no return "
     "to the UV). Memslots are not unregistered (the UV forgets them with the SVM). `--abort-return "
     "uv` runs the v10 proposal instead: the HV pages everything out, unregisters the memslots, "
     "sets secure_guest = INIT_ABORT and clears it again on the abort hcall's own exit path "
     "(check_svm_abort, before the last UV_RETURN: no other call ever sees VM_ABORTING), makes no "
     "UV_SVM_TERMINATE, and returns H_SUCCESS to the UV, which terminates the SVM and resumes the "
     "guest. Not modelled in v10 mode: v10's H_SVM_INIT_ABORT tests only INIT_START, so an abort "
     "after INIT_DONE would go ahead there; pefsim answers H_STATE in both modes.",
     "kernel v5.6+, [PATCH v10 7/8]"),
    ("UV_PAGE_OUT while aborting",
     "Returns the page's plaintext (the SVM never went secure, so nothing leaves the UV that the HV "
     "did not hand it) and keeps the page until UV_SVM_TERMINATE, so asking again is harmless. The "
     "open-source UV returns 0 without copying anything: the merged abort would then hand the guest "
     "garbage. That bug is not copied.", "pefsim"),
    ("Scrubbing",
     "The UV zeroes every secure frame it is given back (page-out, share, memslot removal, "
     "UV_SVM_TERMINATE) before the frame is free again: a background task does it between calls, "
     "and an allocation that finds no free frame scrubs one itself, so a free frame always holds "
     "zeros and UV_SVM_TERMINATE does not wait for a memset of the SVM's memory. The open-source "
     "UV does not scrub. The HV "
     "zeroes its page when a GFN goes secure (the kernel frees it) and when it becomes shared. "
     "UV_SHARE_PAGE then zeroes each page it shared itself, as ultravisor.rst says and the firmware "
     "does (commit_all_gfns_as_shared's memset), so an HV that maps a stale page (the kernel's "
     "kvmppc_share_page does not zero) shows the SVM zeros, not host data.", "pefsim"),
    ("A page-out refused during the abort",
     "When the UV refuses a page's UV_PAGE_OUT during the abort, the HV logs it and the page is lost. "
     "pefsim gives the GFN back to the guest as a zero page, so the guest's own memory check reports "
     "it; the kernel (kvmppc_uvmem_drop_pages) only logs \"Can't page out gpa\" and leaves the GFN "
     "device-backed, so a later touch goes through kvmppc_uvmem_migrate_to_ram, whose UV_PAGE_OUT "
     "against the terminated SVM fails: VM_FAULT_SIGBUS to the VMM.", "pefsim"),
    ("A page-in without data",
     "H_SVM_PAGE_IN may answer H_SUCCESS without a UV_PAGE_IN for a GFN the HV never backed "
     "(book3s_hv_uvmem.c kvmppc_svm_page_in: `if (spage)`); the UV then takes the page as zeros, as "
     "the kernel leaves it, and the ESM goes on. An HV that claims page-ins it never made can thus "
     "make a page read as zeros: in a measured region the digest check aborts the ESM; an unmeasured "
     "page is zeros in the secure guest (tests/conformance/test_uv_conformance.py).", "kernel"),
    ("Encrypted page-out",
     "After ESM a page leaves the UV only as AES-256-GCM ciphertext under a per-SVM key; the nonce is "
     "a random 4-byte prefix and a 64-bit counter, the tag stays in the UV, and the AAD binds lpid, "
     "GFN and a per-page version, so a tampered, replayed (older) or moved ciphertext fails with "
     "U_P3 and the page stays paged out and intact.", "UV code (page_encrypt.c), pefsim (AAD)"),
    ("The ESM blob",
     "A signed manifest (Ed25519, `cryptography`) of SHA-512 digests of the kernel (`kernel-size` "
     "bytes at kbase), the initrd and the bootargs, placed in guest memory and found through the "
     "FDT's linux,esm-blob-start/end; it stands in for the TPM-wrapped lockbox. RTAS is not "
     "modelled. Bad format, bad signature, a missing item or a mismatch all abort.", "pefsim"),
    ("Which pages ESM copies",
     "`--esm-copy all` (default) pages every GFN in with its content, so an abort has the whole "
     "guest to give back; `--esm-copy measured` pages in only the FDT, blob, kernel and initrd and "
     "lets H_SVM_INIT_DONE sweep the rest to secure without copying (5.9+).", "kernel dfaa973ae960"),
    ("H_SVM_INIT_START",
     "secure_guest = INIT_START first and unconditionally (the failure returns through the UV); "
     "H_AUTHORITY without the secure-guest capability; any memslot refused -> H_PARAMETER after "
     "unregistering every slot registered before it (the kernel's loop appears to delete the failing "
     "slot repeatedly; not copied). Re-entry is unguarded, as in the kernel. The doc's H_STATE is "
     "never produced.", "kernel"),
    ("An SVM's own hcalls",
     "A secure guest's `sc 1` traps to the UV (SvmHcall), which reflects it to the HV as the UV's call, "
     "the HV seeing MSR[S] set, or answers it itself. The kernel's MSR[S] check (8c47b6ff29e3) assumes "
     "the UV keeps H_SVM_* from an SVM; the open Ultravisor does not (it reflects every hcall but "
     "H_RANDOM). pefsim's default is the firmware's (`--svm-hcalls firmware`): an SVM can page its own "
     "pages out (to the HV, encrypted; they fault back in), repeat INIT_DONE (H_SUCCESS) or ask for an "
     "abort (H_STATE: it is secure), and hurts no one, itself included "
     "(tests/inprocess/test_svm_hcalls.py). `--svm-hcalls filter` answers them H_FUNCTION in the UV. "
     "Hcalls pefsim's HV does not model, H_RANDOM included, are answered H_FUNCTION by the UV.",
     "8c47b6ff29e3; open Ultravisor; pefsim"),
    ("Caller checks",
     "The kernel's MSR[S]-in-SRR1 test (8c47b6ff29e3) is modelled by the caller's role: only the UV "
     "may make H_SVM_* (a secure vCPU's hcalls reach the HV through it: \"An SVM's own hcalls\"); "
     "others get H_UNSUPPORTED. H_SVM_INIT_ABORT is exempt (e3326ae3d59e) and the "
     "VM state decides. HV-only ucalls from anyone else -> U_PERMISSION; SVM-only ucalls need a "
     "secure supervisor vCPU (MSR[S]=1, HV=PR=0). In insecure mode the role is asserted in request "
     "metadata; with mTLS it comes from the certificate.", "kernel, UV code"),
    ("Unknown lpids",
     "UV calls for an lpid with no SVM: U_PARAMETER (UV code; for UV_REGISTER_MEM_SLOT the code "
     "would pass a NULL SVM on), except UV_SVM_TERMINATE (U_SUCCESS, as the code) and the SVM's own "
     "calls (U_PERMISSION: the caller cannot be secure). HV hcalls for an lpid with no VM: "
     "H_PARAMETER (in KVM the calling vCPU's VM always exists).", "UV code, pefsim"),
    ("Memslot hot-plug while secure",
     "A new memslot is registered with the UV and its GFNs made secure without copy; a UV refusal "
     "is reported as ENOSPC and the slot is removed again (the kernel ignores the error: a TODO "
     "there).", "kernel, pefsim"),
    ("When the HV does not take the abort",
     "Where the answer goes is the kernel's exit path: secure_guest decides (book3s_64_entry.S). "
     "H_UNSUPPORTED for a VM already normal (its abort finished and the UV asks again after a lost "
     "answer, or its ESM never reached the HV) is HRFID'd to the guest at srr0 under the abort's "
     "token; the UV's context never resumes. The vCPU takes it only if it still waits in that "
     "`sc 2` (a repeat of a resume it took is acknowledged by its token; a VM reset since gets "
     "none: pefsim tracks the `sc 2` token H_SVM_INIT_START carried). The UV then forgets the SVM "
     "itself (pefsim: no UV_SVM_TERMINATE will come for a VM the HV holds as normal; the firmware "
     "would keep it). H_STATE (after INIT_DONE) comes back to the UV through UV_RETURN: the UV "
     "terminates the SVM itself and resumes the guest with H_PARAMETER. If the HV cannot be "
     "reached, the SVM stays in SVM_ABORT with all its pages (reported in UvStatus as "
     "abort_pending_s) until an HV terminates it: the cost of an absent HV is that one SVM.",
     "book3s_64_entry.S; pefsim"),
]


# Rows where the kernel documentation (ultravisor.rst), the kernel code and the firmware (the open
# Ultravisor) disagree: (call, state, input) of a row above -> what each says. docs/conformance.md
# shows the three side by side (the audit: ../shared/reference/kernel-crosscheck.md, section 3).
NA = "n/a (not its call to check)"
DISAGREE = {
    ("UV_ESM", "SVM_ABSENT", "kbase 0"): (
        "U_PARAMETER for a bad first argument (esm_blob_addr)", "n/a (prom_init never passes kbase 0)",
        "U_P2 (uvcall.c: `if (!kbase) return U_P2`)"),
    ("UV_ESM", "SVM_ABSENT", "fdt 0"): ("U_P2 (`fdt is invalid`)", NA, "U_P3 (uvcall.c: the numbering is shifted)"),
    ("UV_ESM", "SVM_SECURE", "UV_ESM when already secure"): (
        "U_SUCCESS (including if the VM is already secure)", NA, "U_RETRY (an SVM exists for the lpid)"),
    ("UV_REGISTER_MEM_SLOT", "SVM_SECURE", "start_gpa not 64 KiB aligned"): (
        "U_P2 (`start_gpa is invalid`)", "n/a (always passes base_gfn << PAGE_SHIFT)",
        "U_PARAMETER (create_memslot)"),
    ("UV_REGISTER_MEM_SLOT", "SVM_SECURE", "size 0"): (
        "U_P3 (`size is invalid`)", NA, "takes update_memslots' delete path (pefsim: U_PARAMETER)"),
    ("UV_REGISTER_MEM_SLOT", "SVM_SECURE", "start_gpa + size wraps"): ("U_P3", NA, "U_PARAMETER"),
    ("UV_REGISTER_MEM_SLOT", "SVM_SECURE", "slotid >= SVM_MEM_SLOTS_NUM"): (
        "U_P5 (`the slotid parameter is unsupported`)", NA, "U_PARAMETER"),
    ("UV_PAGE_OUT", "SVM_SECURE", "a shared page"): (
        "U_SUCCESS (`already a shared page`)", NA, "U_PARAMETER"),
    ("UV_PAGE_INVAL", "SVM_SECURE", "gpa outside every slot"): ("U_P2 (`guest_pa is invalid`)", NA, "U_P3"),
    ("UV_SVM_TERMINATE", "SVM_ABSENT", "no SVM for the lpid"): (
        "U_PARAMETER (`lpid is invalid`)", "ignores the result (but kvmhv_svm_off: != U_SUCCESS -> -EINVAL)",
        "U_SUCCESS (uv_svm_terminate returns 0)"),
    ("UV_SVM_TERMINATE", "SVM_ACTIVE", "during ESM"): (
        "U_INVALID (`VM is not secure`; no value anywhere)", "the merged abort terminates a never-secure SVM",
        "U_SUCCESS"),
    ("UV_SVM_TERMINATE", "SVM_ABORT", "an aborting SVM (the merged abort's last ucall)"): (
        "U_INVALID (`VM is not secure`)", "kvmppc_h_svm_init_abort: uv_svm_terminate(lpid)", "U_SUCCESS"),
    ("UV_SHARE_PAGE", "SVM_SECURE", "caller MSR[S] clear"): (
        "U_INVALID (`the VM is not secure`; no value)", "ignores the result (set_memory_decrypted)",
        "U_PERMISSION (uvcall.c dispatcher)"),
    ("UV_SHARE_PAGE", "SVM_ABSENT", "no SVM for the lpid"): ("U_INVALID (no value)", NA, "U_PERMISSION"),
    ("UV_SHARE_PAGE", "SVM_ACTIVE", "during ESM"): ("U_INVALID (no value)", NA, "U_PERMISSION (not secure)"),
    ("UV_SHARE_PAGE", "SVM_ABORT", "while aborting"): ("U_INVALID (no value)", NA, "U_PERMISSION (never secure)"),
    ("UV_SHARE_PAGE", "SVM_SECURE", "range outside every slot"): (
        "U_PARAMETER (`gfn is invalid`)", NA, "U_P2 (svm_host.c)"),
    ("UV_UNSHARE_PAGE", "SVM_SECURE", "caller MSR[S] clear"): (
        "U_INVALID (no value)", "ignores the result (set_memory_encrypted)", "U_PERMISSION"),
    ("UV_UNSHARE_PAGE", "SVM_ABSENT", "no SVM for the lpid"): ("U_INVALID (no value)", NA, "U_PERMISSION"),
    ("UV_UNSHARE_PAGE", "SVM_ACTIVE", "during ESM"): ("U_INVALID (no value)", NA, "U_PERMISSION"),
    ("UV_UNSHARE_PAGE", "SVM_ABORT", "while aborting"): ("U_INVALID (no value)", NA, "U_PERMISSION"),
    ("UV_UNSHARE_PAGE", "SVM_SECURE", "range outside every slot"): (
        "U_PARAMETER (`gfn is invalid`)", NA, "U_P2 (svm_host.c)"),
    ("UV_UNSHARE_ALL_PAGES", "SVM_SECURE", "caller MSR[S] clear"): (
        "U_INVAL (`VM is not secure`)", "ignores the result (the kexec path)", "U_PERMISSION"),
    ("UV_UNSHARE_ALL_PAGES", "SVM_ABSENT", "no SVM for the lpid"): ("U_INVAL", NA, "U_PERMISSION"),
    ("UV_UNSHARE_ALL_PAGES", "SVM_ACTIVE", "during ESM"): ("U_INVAL", NA, "U_PERMISSION"),
    ("UV_UNSHARE_ALL_PAGES", "SVM_ABORT", "while aborting"): ("U_INVAL", NA, "U_PERMISSION"),
    ("H_SVM_PAGE_OUT", "VM_SECURE", "made by the guest"): (
        "silent", "H_UNSUPPORTED unless MSR[S] in SRR1 (8c47b6ff29e3, assuming the UV filters)",
        "reflects every hcall but H_RANDOM: an SVM's H_SVM_PAGE_OUT passes the MSR[S] check (SvmHcall)"),
    ("H_SVM_INIT_START", "VM_NORMAL", "without KVM_CAP_PPC_SECURE_GUEST"): (
        "lists only H_SUCCESS / H_STATE", "H_AUTHORITY, secure_guest set first (377f02d487b5)", NA),
    ("H_SVM_INIT_START", "VM_NORMAL", "the UV refuses a memslot"): (
        "H_STATE", "H_PARAMETER (the failing slot deleted)", NA),
    ("H_SVM_INIT_START", "VM_TRANSIENT", "again during ESM"): (
        "H_STATE", "H_SUCCESS (unguarded re-entry; its comment table says Error)", "accepts the re-registration"),
    ("H_SVM_INIT_START", "VM_SECURE", "after INIT_DONE"): (
        "H_STATE", "H_SUCCESS (unguarded: the assignment clears INIT_DONE; its comment table says Error)",
        "accepts the re-registration"),
}
