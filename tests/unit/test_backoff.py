"""pefsim.backoff: the one retry policy (waits double up to the cap; a window to give up in)."""
from __future__ import annotations

import asyncio
import time

from pefsim.backoff import Backoff


def test_waits_double_up_to_the_cap_and_reset_starts_over():
    async def scenario():
        b = Backoff(first=0.001, cap=0.004)
        seen = []
        for _ in range(5):
            seen.append(b.delay)
            await b.wait()
        b.reset()
        return seen, b.delay
    seen, after = asyncio.run(scenario())
    assert seen == [0.001, 0.002, 0.004, 0.004, 0.004] and after == 0.001


def test_the_window_expires_and_never_without_one():
    b = Backoff(within=0.0)
    time.sleep(0.001)
    assert b.expired
    assert not Backoff().expired
    b = Backoff(within=60)
    assert not b.expired
