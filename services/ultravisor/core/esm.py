"""The UV's ESM context: what runs after UV_ESM's synchronous checks (protocol reference 3.3).

  1. H_SVM_INIT_START            (the HV registers every memslot with UV_REGISTER_MEM_SLOT)
  2. page-in with H_SVM_PAGE_IN  (ESM_COPY_ALL: every GFN; ESM_COPY_MEASURED: FDT, blob, kernel,
                                  initrd only)
  3. read the FDT, check the ESM blob (signature, kernel / initrd / bootargs digests)
  4. H_SVM_INIT_DONE
  5. SVM_SECURE: the guest resumes at kbase with MSR[S] = 1

Any failure after step 1 is a full abort: SVM_ABORT, then H_SVM_INIT_ABORT in the guest's UV_ESM
context. With the merged design the HV pages everything out, terminates the SVM and resumes the
guest itself with H_PARAMETER; the UV's context simply ends. With the v10 proposal
(``abort_return = uv``) the HV answers H_SUCCESS and the UV terminates the SVM and resumes the
guest with H_PARAMETER.

The context runs as its own task: a guest that goes away does not cancel it half-way.
"""
from __future__ import annotations

import json
import logging
from array import array


from pefsim import clock
from pefsim.abi import (PAGE_SHIFT, PAGE_SIZE, AbortReturn, EsmCopy, GpfState, H, PageInFlag,
                        SvmState, U, gfn_of, gpa_of, rc_name)
from pefsim import faults
from pefsim.blob import BlobError, kernel_size, measure, new_measurement, verify_blob
from pefsim.image import FDT_MAGIC
from pefsim.v1 import common_pb2, hypervisor_pb2 as hpb, ultravisor_pb2 as pb
from services.ultravisor.core import hv

log = logging.getLogger("pefsim.uv.esm")


class EsmFailed(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} {detail}".strip())
        self.reason = reason


async def hcall(uv, name: str, request):
    """An hcall of the ESM context: an HV that cannot be reached fails the ESM."""
    try:
        return await hv.hcall(uv, name, request)
    except hv.HvUnreachable as exc:
        raise EsmFailed("hv-unreachable", str(exc)) from None


async def run_esm(uv, svm, req: pb.UvEsmRequest) -> pb.UvEsmResponse:
    t0 = clock.monotonic()
    try:
        resp = await _secure(uv, svm, req)
        uv.metrics.esm_seconds.labels("secure").observe(clock.monotonic() - t0)
        log.info("lpid %d went secure", svm.lpid)
        return resp
    except EsmFailed as failure:
        uv.metrics.esm_failures.labels(failure.reason).inc()
        log.warning("lpid %d: ESM failed (%s); aborting", svm.lpid, failure)
        resp = await abort(uv, svm, req, failure)
        resp.failure = str(failure)  # for the guest's timeline: the ABI's R3 says only that it failed
        uv.metrics.esm_seconds.labels("aborted").observe(clock.monotonic() - t0)
        return resp


async def _secure(uv, svm, req) -> pb.UvEsmResponse:
    lpid = svm.lpid
    rc = (await hcall(uv, "H_SVM_INIT_START", hpb.HSvmInitStartRequest(lpid=lpid, vcpu_owner=svm.owner,
                                                                       token=svm.token))).rc
    if rc != H.H_SUCCESS:
        raise EsmFailed("init-start", rc_name(rc, H))
    measured_only = uv.cfg.esm_copy == EsmCopy.ESM_COPY_MEASURED
    if not measured_only:
        await page_in_all(uv, svm)
    fdt = await read_fdt(uv, svm, req.fdt)
    chosen = fdt["chosen"]
    blob_start, blob_end = chosen["linux,esm-blob-start"], chosen["linux,esm-blob-end"]
    blob = await read_region(uv, svm, blob_start, blob_end - blob_start)
    try:
        ksize = kernel_size(blob)
        kernel = await measure_region(uv, svm, req.kbase, ksize)
        initrd_start, initrd_end = chosen["linux,initrd-start"], chosen["linux,initrd-end"]
        initrd = await measure_region(uv, svm, initrd_start, initrd_end - initrd_start)
        if uv.trusted is None:
            raise BlobError("no-trusted-key")
        verify_blob(blob, uv.trusted, {"kernel": kernel, "initrd": initrd,
                                       "bootargs": measure(str(chosen.get("bootargs", "")).encode())})
    except BlobError as bad:
        raise EsmFailed(f"blob-{bad.reason}") from None
    # H_SVM_INIT_DONE succeeds again when repeated, so a lost answer is asked for again: giving
    # up would abort an SVM the HV may already hold as secure.
    resp = await hv.hcall_until_answered(uv, svm, "H_SVM_INIT_DONE", hpb.HSvmInitDoneRequest(lpid=lpid),
                                      uv.cfg.hcall_timeout_s)
    if resp is None or svm.destroyed:
        raise EsmFailed("terminated")
    if resp.rc != H.H_SUCCESS:
        raise EsmFailed("init-done", rc_name(resp.rc, H))
    uv.state.set_svm_state(svm, SvmState.SVM_SECURE)
    return pb.UvEsmResponse(rc=U.U_SUCCESS, resumed=True, msr_s=True, nip=req.kbase)


BULK_PAGES = 16384  # pages per HSvmPageInBulk call (1 GiB)


async def page_in_all(uv, svm) -> None:
    """Every GFN of every slot, with its content: one H_SVM_PAGE_IN a page (--transfer unary), or
    HSvmPageInBulk (the same per-page semantics, batched; the default)."""
    t0 = clock.monotonic()
    if uv.cfg.transfer == "unary":
        for gfn in svm.gfns():
            await page_in(uv, svm, gfn)
        uv.metrics.page_in_seconds.labels("unary").observe(clock.monotonic() - t0)
        return
    for slot in svm.slots_in_order():
        for idx in range(0, slot.npages, BULK_PAGES):
            if svm.destroyed:
                raise EsmFailed("terminated")
            n, first = min(BULK_PAGES, slot.npages - idx), gpa_of(slot.base + idx)
            chunk = array("Q", range(first, first + n * PAGE_SIZE, PAGE_SIZE))  # not a list of ints
            resp = await hcall(uv, "HSvmPageInBulk", hpb.HSvmPageInBulkRequest(
                lpid=svm.lpid, guest_pa=chunk, flags=PageInFlag.H_PAGE_IN_NONSHARED, order=PAGE_SHIFT))
            if resp.rc != H.H_SUCCESS:
                bad = next(i for i, rc in enumerate(resp.rcs) if rc != H.H_SUCCESS) if resp.rcs else 0
                raise EsmFailed("page-in", f"gpa 0x{chunk[bad]:x}: {rc_name(resp.rc, H)}")
            if slot.gone:
                raise EsmFailed("page-in", f"gfn {slot.base}: memslot unregistered under the ESM")
            if slot.first_not(GpfState.GPF_SECURE, idx, idx + n) is not None:
                await zero_fill(uv, svm, slot, idx, n)
    uv.metrics.page_in_seconds.labels(uv.cfg.transfer).observe(clock.monotonic() - t0)


async def page_in(uv, svm, gfn: int) -> None:
    """Have the HV move one page in (H_SVM_PAGE_IN -> UV_PAGE_IN), unless it is already here."""
    if svm.destroyed:
        raise EsmFailed("terminated")
    if svm.pages_of(gfn) is None:
        raise EsmFailed("page-in", f"gfn {gfn}: no longer in a memslot")
    if svm.gpf(gfn).state == GpfState.GPF_SECURE:
        return
    rc = (await hcall(uv, "H_SVM_PAGE_IN", hpb.HSvmPageInRequest(
        lpid=svm.lpid, guest_pa=gpa_of(gfn), flags=PageInFlag.H_PAGE_IN_NONSHARED,
        order=PAGE_SHIFT))).rc
    if rc != H.H_SUCCESS:
        raise EsmFailed("page-in", f"gfn {gfn}: {rc_name(rc, H)}")
    slot = svm.pages_of(gfn)
    if slot is None:
        raise EsmFailed("page-in", f"gfn {gfn}: no longer in a memslot")
    if svm.gpf(gfn).state != GpfState.GPF_SECURE:
        await zero_fill(uv, svm, slot, gfn - slot.base, 1)


async def zero_fill(uv, svm, slot, idx: int, n: int) -> None:
    """H_SVM_PAGE_IN answered H_SUCCESS without a UV_PAGE_IN for some of the ``n`` pages from
    ``idx``: legal for a GFN the HV never backed (book3s_hv_uvmem.c kvmppc_svm_page_in, ``if
    (spage)``: an untouched page is migrated without its UV_PAGE_IN), so the UV takes each such
    page as zeros, as the kernel leaves it. A lying HV can therefore make a page the guest wrote
    read as zeros; in a measured region (kernel, initrd, FDT, blob) the digest check then fails
    the ESM."""
    async with svm.lock:
        for i in range(idx, idx + n):
            gpf = svm.gpf(slot.base + i)
            if gpf.state == GpfState.GPF_UNBACKED:
                uv.state.mark_secure(gpf, None)
                log.info("lpid %d: gfn 0x%x paged in without data (never backed by the HV): zeros",
                         svm.lpid, slot.base + i)


async def region(uv, svm, gpa: int, length: int):
    """The pieces of guest memory from ``gpa`` for ``length`` bytes, in order, as views of the
    secure pages (paging in what is missing): measured or copied without a copy of the whole."""
    if length < 0 or length > (64 << 20):
        raise EsmFailed("fdt", f"bad region length {length}")
    first, last = gfn_of(gpa), gfn_of(gpa + max(length, 1) - 1)
    start, left = gpa - gpa_of(first), length
    for gfn in range(first, last + 1):
        if svm.pages_of(gfn) is None:
            raise EsmFailed("fdt", f"region outside memory at gfn {gfn}")
        await page_in(uv, svm, gfn)
        piece = uv.state.pool.view(svm.gpf(gfn).frame)[start:start + left]
        start, left = 0, left - len(piece)
        yield piece


async def read_region(uv, svm, gpa: int, length: int) -> bytes:
    """Bytes of guest memory from secure pages (paging in what is missing)."""
    return b"".join([bytes(piece) async for piece in region(uv, svm, gpa, length)])


async def measure_region(uv, svm, gpa: int, length: int) -> str:
    """The digest of a region of guest memory (blob.measure), read page by page."""
    digest = new_measurement()
    async for piece in region(uv, svm, gpa, length):
        digest.update(piece)
    return digest.hexdigest()


async def read_fdt(uv, svm, fdt_gpa: int) -> dict:
    raw = await read_region(uv, svm, fdt_gpa, PAGE_SIZE)
    try:
        doc = json.loads(raw.rstrip(b"\0"))
        if doc.get("magic") != FDT_MAGIC:
            raise ValueError("no FDT magic")
        chosen = doc["chosen"]
        for key in ("linux,esm-blob-start", "linux,esm-blob-end", "linux,initrd-start",
                    "linux,initrd-end"):
            if not isinstance(chosen[key], int):
                raise ValueError(f"{key} is not a number")
    except (ValueError, KeyError, TypeError) as exc:
        raise EsmFailed("fdt", str(exc)) from None
    return doc


async def abort(uv, svm, req: pb.UvEsmRequest, failure: EsmFailed) -> pb.UvEsmResponse:
    """SVM_ABORT, then H_SVM_INIT_ABORT in the guest's context (protocol reference 3.4).

    The UV keeps the SVM, every page and its memslots until UV_SVM_TERMINATE. If the call fails
    in transport (the HV died, froze or is cut off) it is made again, with the same token, until
    the HV answers or terminates the SVM: a restarted HV finishes the abort from its journal, and
    an HV that never answers costs this one SVM (reported in the abort metrics) and nothing else."""
    lpid, resume_at = svm.lpid, req.vcpu.nip
    if svm.destroyed:  # terminated under us (the VM was destroyed): nobody resumes this vCPU
        return pb.UvEsmResponse(rc=U.U_STATE, resumed=False)
    uv.state.set_svm_state(svm, SvmState.SVM_ABORT)
    if faults.mutant("uv-frees-at-abort"):  # the list's alternative: the pages go with the abort call
        async with svm.lock:
            for gfn in svm.gfns_in(GpfState.GPF_SECURE):
                uv.state.forget_page(svm.gpf(gfn))
    faults.reach("uv.esm.before_abort")
    token = svm.token
    trace = common_pb2.Trace(abort_issued_unix_ns=svm.abort_issued_ns)
    request = hpb.HSvmInitAbortRequest(lpid=lpid, srr0=resume_at, srr1_msr_s=False, trace=trace, token=token)
    t0 = clock.monotonic()
    resp = await hv.hcall_until_answered(uv, svm, "H_SVM_INIT_ABORT", request, uv.cfg.abort_attempt_timeout_s)
    if resp is None:
        # the HV finished the abort (its UV_SVM_TERMINATE arrived) but its answer was lost
        uv.metrics.abort_seconds.labels("terminated-by-hv").observe(clock.monotonic() - t0)
        return pb.UvEsmResponse(rc=H.H_PARAMETER, resumed=False)
    if resp.rc == H.H_PARAMETER and resp.returned_to == AbortReturn.ABORT_RETURN_GUEST:
        uv.metrics.abort_seconds.labels("resumed-by-hv").observe(clock.monotonic() - t0)
        return pb.UvEsmResponse(rc=H.H_PARAMETER, resumed=False)
    if resp.rc == H.H_UNSUPPORTED and resp.returned_to == AbortReturn.ABORT_RETURN_GUEST:
        # the HV's exit path took its refusal to the guest (H_UNSUPPORTED: its VM is normal, so
        # secure_guest was 0: the abort finished already, or the ESM never reached it). This
        # context never resumes, and no UV_SVM_TERMINATE will come for a VM the HV holds as
        # normal: the UV forgets the SVM itself (docs/conformance.md, "When the HV does not take
        # the abort").
        log.error("lpid %d: HV answered H_SVM_INIT_ABORT with %s, to the guest", lpid, rc_name(resp.rc, H))
        async with svm.lock:
            uv.state.destroy_svm(lpid)
        uv.metrics.abort_seconds.labels("refused").observe(clock.monotonic() - t0)
        return pb.UvEsmResponse(rc=resp.rc, resumed=False)
    # v10 (the HV returned H_SUCCESS to us), or the HV refused the abort back to us (H_STATE: its
    # VM went secure, secure_guest != 0, so the result came back through UV_RETURN): the UV
    # finishes the cleanup itself and resumes the guest with H_PARAMETER, under the abort's token.
    outcome = "returned-to-uv" if resp.rc == H.H_SUCCESS else "refused"
    if outcome == "refused":
        log.error("lpid %d: HV answered H_SVM_INIT_ABORT with %s", lpid, rc_name(resp.rc, H))
    async with svm.lock:
        uv.state.destroy_svm(lpid)
    uv.metrics.abort_seconds.labels(outcome).observe(clock.monotonic() - t0)
    return pb.UvEsmResponse(rc=H.H_PARAMETER, resumed=True, msr_s=False, nip=resume_at, trace=trace,
                            token=token)
