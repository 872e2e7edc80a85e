"""The clock port: a clock a test installs is the time the cores see, so waits cost no wall-clock
time (what the simulator, issue 15, builds on)."""
from __future__ import annotations

import asyncio
import time

from pefsim import clock
from pefsim.backoff import Backoff


class SteppedClock:
    """Virtual time: a sleep advances it at once."""

    def __init__(self):
        self.now, self.slept = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def wall_ns(self) -> int:
        return int(self.now * 1e9)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def test_a_minute_of_backoff_in_no_time():
    async def scenario():
        with clock.use(SteppedClock()) as fake:
            backoff, waits = Backoff(within=60.0), 0
            while not backoff.expired:
                await backoff.wait()
                waits += 1
            return fake, waits
    t0 = time.perf_counter()
    fake, waits = asyncio.run(scenario())
    assert time.perf_counter() - t0 < 1.0
    assert fake.now - 1000.0 > 60.0 and waits == len(fake.slept)
    assert fake.slept[:4] == [0.05, 0.1, 0.2, 0.4] and max(fake.slept) == 2.0
    assert isinstance(clock.CLOCK, clock.SystemClock)  # restored after the block
