"""The simulator's virtual-time loop: timers fire in order without wall-clock time passing, the
clock port reads virtual time, and a hang is Stalled, not a blocked process."""
from __future__ import annotations

import asyncio
import time

import pytest

from pefsim import clock
from pefsim.backoff import Backoff
from pefsim.sim.loop import EPOCH_NS, Stalled, run


def test_an_hour_of_timers_in_no_time():
    order = []

    async def sleeper(name: str, s: float):
        await asyncio.sleep(s)
        order.append((name, asyncio.get_running_loop().time()))

    async def main():
        await asyncio.gather(sleeper("c", 3600), sleeper("a", 1), sleeper("b", 60))
        return clock.monotonic(), clock.wall_ns()
    t0 = time.perf_counter()
    now, wall = run(main())
    assert time.perf_counter() - t0 < 1.0
    assert order == [("a", 1.0), ("b", 60.0), ("c", 3600.0)]
    assert now == 3600.0 and wall == EPOCH_NS + 3600 * 10**9


def test_backoff_and_timeouts_are_virtual():
    async def main():
        backoff = Backoff(within=30.0)
        while not backoff.expired:
            await backoff.wait()
        try:
            await asyncio.wait_for(asyncio.Event().wait(), 5)
        except TimeoutError:
            return clock.monotonic()
    assert 35.0 < run(main()) < 40.0


def test_a_hang_is_stalled():
    with pytest.raises(Stalled):
        run(asyncio.Event().wait())
