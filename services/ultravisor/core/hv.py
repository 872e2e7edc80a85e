"""The UV's calls to the HV, in one place for every caller (the ESM context, shares, the SVM's
accesses to shared pages, evictions), made through the HV port (services/ultravisor/ports.py):
each names the guest it serves, a transport failure is HvUnreachable, and an hcall whose effect
is idempotent can be made until it is answered.
"""
from __future__ import annotations

import asyncio
import logging

from pefsim import clock, faults
from pefsim.backoff import Backoff
from services.ultravisor.ports import HvUnreachable

log = logging.getLogger("pefsim.uv.hv")

__all__ = ["HvUnreachable", "hcall", "hcall_until_answered"]


def on_behalf(uv, lpid: int) -> str:
    """The guest an hcall serves (its SVM's owner): the HV counts the UV's calls for each guest
    apart (rpc.Admission), so one guest's stuck calls cannot use up the others'."""
    svm = uv.state.svms.get(lpid)
    return svm.owner if svm is not None else ""


async def _hcall(uv, name: str, request, on_behalf: str, timeout: float):
    """The HV port's hcall; one at a time for the whole UV under the mutant that serialises them."""
    if not faults.mutant("uv-hcalls-one-at-a-time"):
        return await uv.hv.hcall(name, request, on_behalf=on_behalf, timeout=timeout)
    async with uv.__dict__.setdefault("_mutant_hcall_lock", asyncio.Lock()):
        return await uv.hv.hcall(name, request, on_behalf=on_behalf, timeout=timeout)


async def hcall(uv, name: str, request):
    """Make an hcall to the HV for ``request.lpid``'s guest; HvUnreachable on a transport failure."""
    return await _hcall(uv, name, request, on_behalf(uv, request.lpid), uv.cfg.hcall_timeout_s)


async def hcall_until_answered(uv, svm, name: str, request, timeout_s: float):
    """Make an hcall whose effect is idempotent until the HV answers it: a transport failure
    (the HV died, froze or is cut off) leaves it unknown whether the HV acted, so the call is
    made again, backing off up to 2 s. Returns the answer, or None once the SVM is terminated
    (the HV finished the work and its answer was lost)."""
    backoff, attempts = Backoff(), 0
    svm.unanswered = (name, clock.wall_ns())  # UvStatus and pefsim_uv_hcall_unanswered_seconds
    try:
        while not svm.destroyed:
            try:
                return await _hcall(uv, name, request, on_behalf(uv, svm.lpid), timeout_s)
            except HvUnreachable as exc:
                attempts += 1
                uv.metrics.hcall_retries.labels(name).inc()
                log.error("lpid %d: %s attempt %d failed in transport (%s); the SVM keeps its pages; "
                          "asking again in %.2f s", svm.lpid, name, attempts, exc.code, backoff.delay)
                await backoff.wait()
        return None
    finally:
        svm.unanswered = None
