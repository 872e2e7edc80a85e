"""UV_ESM (guest -> UV) and UV_SVM_TERMINATE (HV -> UV): the SVM object's birth and death."""
from __future__ import annotations

import asyncio
import logging

from pefsim import clock
from pefsim import faults
from pefsim.abi import SvmState, U
from pefsim.v1 import ultravisor_pb2 as pb
from services.ultravisor.core import esm
from services.ultravisor.core.guard import guarded

log = logging.getLogger("pefsim.uv")


async def uv_esm(uv, req: pb.UvEsmRequest, caller) -> pb.UvEsmResponse:
    """Create the SVM (SVM_ACTIVE) and run the ESM context (esm.py) to its end. The context is
    its own task, shielded from the caller: a guest that hangs up does not stop it half-way."""
    if (len(uv.state.svms) >= uv.cfg.max_svms
            or sum(s.owner == caller.name for s in uv.state.svms.values()) >= uv.cfg.max_svms_per_owner):
        return pb.UvEsmResponse(rc=U.U_RETRY, resumed=True)  # no room for another SVM object (of this guest)
    svm = uv.state.create_svm(req.vcpu.lpid, caller.name)
    task = asyncio.ensure_future(esm.run_esm(uv, svm, req))
    svm.esm_task = task
    return await asyncio.shield(task)


async def uv_svm_terminate(uv, req: pb.UvSvmTerminateRequest, caller) -> pb.UvSvmTerminateResponse:
    """Destroy the SVM: every secure page given back to the pool (scrubbed before any reuse,
    state.py), slots, GPF map and key dropped."""
    svm = uv.state.svms[req.lpid]
    t0, state = clock.monotonic(), SvmState(svm.state).name
    async with guarded(uv, "UV_SVM_TERMINATE", req, svm):  # a second terminate waits, then U_SUCCESS
        freed = uv.state.destroy_svm(req.lpid)
    uv.metrics.terminate_seconds.labels(state).observe(clock.monotonic() - t0)
    log.info("lpid %d terminated, %d secure pages freed (to be scrubbed)", req.lpid, freed)
    if faults.mutant("uv-terminate-bad-rc"):
        return pb.UvSvmTerminateResponse(rc=U.U_P2, pages_freed=freed)
    return pb.UvSvmTerminateResponse(rc=U.U_SUCCESS, pages_freed=freed)
