"""The UV's calls to the HV, in one place for every caller (the ESM context, shares, the SVM's
accesses to shared pages, evictions): each names the guest it serves (on_behalf), a transport
failure is HvUnreachable, and an hcall whose effect is idempotent can be made until it is answered.
"""
from __future__ import annotations

import logging
import time

import grpc

from pefsim import rpc
from pefsim.backoff import Backoff

log = logging.getLogger("pefsim.uv.hv")


class HvUnreachable(Exception):
    """The hcall failed in transport: the HV died, froze or is cut off (it may or may not have acted)."""


def on_behalf(uv, lpid: int) -> tuple[tuple[str, str], ...]:
    """Metadata naming the guest an hcall serves (its SVM's owner): the HV counts the UV's calls
    for each guest apart (rpc.Admission), so one guest's stuck calls cannot use up the others'."""
    svm = uv.state.svms.get(lpid)
    return ((rpc.ON_BEHALF_HEADER, svm.owner if svm is not None else ""),)


async def hcall(uv, name: str, request):
    """Make an hcall to the HV for ``request.lpid``'s guest; HvUnreachable on a transport failure."""
    try:
        return await getattr(uv.hv.stub, name)(request, timeout=uv.cfg.hcall_timeout_s, wait_for_ready=True,
                                                metadata=on_behalf(uv, request.lpid))
    except grpc.aio.AioRpcError as exc:
        raise HvUnreachable(f"{name}: {exc.code().name}") from None


async def hcall_until_answered(uv, svm, name: str, request, timeout_s: float):
    """Make an hcall whose effect is idempotent until the HV answers it: a transport failure
    (the HV died, froze or is cut off) leaves it unknown whether the HV acted, so the call is
    made again, backing off up to 2 s. Returns the answer, or None once the SVM is terminated
    (the HV finished the work and its answer was lost)."""
    backoff, attempts = Backoff(), 0
    svm.unanswered = (name, time.time_ns())  # UvStatus and pefsim_uv_hcall_unanswered_seconds
    try:
        while not svm.destroyed:
            try:
                return await getattr(uv.hv.stub, name)(request, timeout=timeout_s, wait_for_ready=True,
                                                        metadata=on_behalf(uv, svm.lpid))
            except grpc.aio.AioRpcError as exc:
                attempts += 1
                uv.metrics.hcall_retries.labels(name).inc()
                log.error("lpid %d: %s attempt %d failed in transport (%s); the SVM keeps its pages; "
                          "asking again in %.2f s", svm.lpid, name, attempts, exc.code().name, backoff.delay)
                await backoff.wait()
        return None
    finally:
        svm.unanswered = None
