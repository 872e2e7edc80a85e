"""The clock port: the only time the protocol cores read or wait on.

    monotonic()   seconds, for deadlines and durations (metrics)
    wall_ns()     Unix nanoseconds, for what is shown or compared across processes (trace
                  stamps, histories, timelines)
    sleep(s)      wait (backoffs, probes, the watchdog's period)

``CLOCK`` is the process's clock: the real one (``SystemClock``) in the services and tests; the
simulator (issue 15) installs a virtual one with ``use``, under which every deadline, backoff,
keepalive and grace period costs no wall-clock time. A core calls ``clock.now()`` etc. through
this module, never ``time`` or ``asyncio.sleep`` (tests/unit/test_layers.py holds it to that).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall_ns(self) -> int: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The process's clocks."""

    def monotonic(self) -> float:
        return time.perf_counter()

    def wall_ns(self) -> int:
        return time.time_ns()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


CLOCK: Clock = SystemClock()


def monotonic() -> float:
    return CLOCK.monotonic()


def wall_ns() -> int:
    return CLOCK.wall_ns()


async def sleep(seconds: float) -> None:
    await CLOCK.sleep(seconds)


@contextlib.contextmanager
def use(clock: Clock):
    """Make ``clock`` the process's clock for the block."""
    global CLOCK
    before, CLOCK = CLOCK, clock
    try:
        yield clock
    finally:
        CLOCK = before
