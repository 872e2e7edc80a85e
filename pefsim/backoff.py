"""One retry policy for every call pefsim makes again after a transport failure: wait ``first``
seconds, then twice as long each time up to ``cap``; optionally give up once ``within`` seconds
have passed since the first failure (or since the last ``reset``).

Who retries, and why it is safe to (each loop says so where it retries):

  the HV's abort (abort.persist)            page-outs and UV_SVM_TERMINATE: idempotent while the
                                            UV keeps an aborting SVM; until the UV answers
  the HV's resume (abort.resume_vcpu)       VcpuResume with the abort's token: a repeat is
                                            acknowledged; for up to --resume-retry
  the UV's INIT_DONE / INIT_ABORT           idempotent at the HV; until answered or terminated
  (ultravisor/hv.hcall_until_answered)
  the guest's calls to the HV (program._hv) for up to --hv-wait
  the guest's VM session (program.hold_session)  reconnect for up to --hv-wait

The caller decides what to retry; this only says how long to wait and when to stop.
"""
from __future__ import annotations

from pefsim import clock


class Backoff:
    def __init__(self, first: float = 0.05, cap: float = 2.0, within: float | None = None):
        self.first, self.cap, self.within = first, cap, within
        self.reset()

    def reset(self) -> None:
        """Back to the first wait, and a new ``within`` window (the operation succeeded)."""
        self.delay = self.first
        self.deadline = None if self.within is None else clock.monotonic() + self.within

    @property
    def expired(self) -> bool:
        """Whether the ``within`` window is over (never, without one)."""
        return self.deadline is not None and clock.monotonic() > self.deadline

    async def wait(self) -> None:
        """Sleep the current delay, then double it (up to the cap)."""
        await clock.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)
