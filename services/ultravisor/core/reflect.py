"""A secure guest's hcalls: its `sc 1` traps to the UV, which reflects it to the HV.

On hardware an hcall made with MSR[S] = 1 goes to the UV first; the UV passes it on to the HV
(synthesising the interrupt, SRR1 with MSR[S] set) or answers it itself. The HV's only check for
the H_SVM_* calls is MSR[S] in SRR1 (8c47b6ff29e3; e3326ae3d59e exempts H_SVM_INIT_ABORT): its
commit message assumes the UV keeps them from an SVM, and the open Ultravisor does not. It reflects
every hcall but H_RANDOM, which it answers H_FUNCTION. pefsim offers both (``UvConfig.svm_hcalls``):

  firmware (default)  every H_SVM_* call is reflected, as the open Ultravisor does: an SVM can
                      ask the HV to page its own pages out, to repeat INIT_DONE, or to abort
                      (H_STATE: it is secure), and gets the HV's answer
  filter              the UV answers an SVM's H_SVM_* calls H_FUNCTION itself, as the kernel
                      commit assumes; nothing reaches the HV

Hcalls pefsim's HV does not model are answered H_FUNCTION by the UV, H_RANDOM included (docs/
conformance.md, "What is modelled").
"""
from __future__ import annotations

import logging

from pefsim.abi import H, Hcall
from pefsim.v1 import hypervisor_pb2 as hpb, ultravisor_pb2 as pb
from services.ultravisor.core import hv

log = logging.getLogger("pefsim.uv.reflect")

SVM_HCALLS = ("firmware", "filter")


def _request(svm, req: pb.SvmHcallRequest):
    """The HV's request for a reflected H_SVM_* call (args as the registers carry them), or None
    for one pefsim's HV does not model."""
    args = list(req.args) + [0] * 3
    if req.opcode == Hcall.H_SVM_PAGE_IN:
        return "H_SVM_PAGE_IN", hpb.HSvmPageInRequest(lpid=svm.lpid, guest_pa=args[0], flags=args[1], order=args[2])
    if req.opcode == Hcall.H_SVM_PAGE_OUT:
        return "H_SVM_PAGE_OUT", hpb.HSvmPageOutRequest(lpid=svm.lpid, guest_pa=args[0], flags=args[1],
                                                        order=args[2])
    if req.opcode == Hcall.H_SVM_INIT_START:
        return "H_SVM_INIT_START", hpb.HSvmInitStartRequest(lpid=svm.lpid, vcpu_owner=svm.owner, token=svm.token)
    if req.opcode == Hcall.H_SVM_INIT_DONE:
        return "H_SVM_INIT_DONE", hpb.HSvmInitDoneRequest(lpid=svm.lpid)
    if req.opcode == Hcall.H_SVM_INIT_ABORT:
        return "H_SVM_INIT_ABORT", hpb.HSvmInitAbortRequest(lpid=svm.lpid, srr0=req.vcpu.nip, token=svm.token)
    return None


async def svm_hcall(uv, req: pb.SvmHcallRequest, caller) -> pb.SvmHcallResponse:
    svm = uv.state.svms[req.vcpu.lpid]
    reflected = _request(svm, req)
    if reflected is None:
        return pb.SvmHcallResponse(rc=H.H_FUNCTION)
    if uv.cfg.svm_hcalls == "filter":
        log.info("lpid %d: the SVM's %s refused (--svm-hcalls filter)", svm.lpid, reflected[0])
        return pb.SvmHcallResponse(rc=H.H_FUNCTION)
    name, request = reflected
    try:
        resp = await hv.hcall(uv, name, request)
    except hv.HvUnreachable:
        return pb.SvmHcallResponse(rc=H.H_BUSY)  # the HV did not answer: the SVM may ask again
    log.info("lpid %d: the SVM's %s reflected to the HV: %d", svm.lpid, name, resp.rc)
    return pb.SvmHcallResponse(rc=resp.rc, reflected=True)
