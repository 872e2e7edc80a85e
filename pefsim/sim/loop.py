"""Virtual time for the in-process stack: an asyncio event loop whose clock only moves when every
task is waiting for a timer, and then jumps to the next one. Deadlines, backoffs, grace periods
and timeouts cost no wall-clock time, and the order in which tasks run depends only on the
program and its inputs (no real I/O happens in process), so a run replays exactly.

A loop with nothing ready and no timer would wait forever: that is a hang of the simulated system,
raised as Stalled instead of blocking the process.
"""
from __future__ import annotations

import asyncio
import selectors

EPOCH_NS = 1_700_000_000 * 10**9  # the virtual wall clock's zero: a fixed date, the same every run


class Stalled(RuntimeError):
    """Every task waits and no timer is set: the simulated system hung."""


class _VirtualSelector(selectors.BaseSelector):
    """A selector with nothing to select (in process there is no socket): ``select(timeout)``
    advances the loop's virtual clock by ``timeout`` instead of sleeping."""

    def __init__(self):
        self._map: dict = {}
        self.loop: "VirtualLoop | None" = None

    def register(self, fileobj, events, data=None):
        key = selectors.SelectorKey(fileobj, id(fileobj), events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj):
        return self._map.pop(fileobj)

    def select(self, timeout=None):
        if timeout is None:
            raise Stalled("every task is waiting and no timer is set")
        if timeout > 0:
            self.loop.now += timeout
        return []

    def get_map(self):
        return self._map

    def close(self):
        self._map.clear()


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (``now``, seconds from 0).

    With ``schedule`` (a seeded random.Random), the order in which the callbacks that are ready
    together run (a task's next step, a future's done callback, a message's delivery) is drawn
    from it at each turn, not first come first served: any order of ready work is one a real
    system can take (threads, processes and the network promise nothing between them), and the
    seed makes it replay. Callbacks that become ready during a turn run in a later turn, as
    asyncio's own loop does."""

    def __init__(self, schedule=None):
        selector = _VirtualSelector()
        self.now = 0.0
        self.schedule = schedule
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self.now

    def _run_once(self):
        if self.schedule is not None and len(self._ready) > 1:
            ready = list(self._ready)
            self.schedule.shuffle(ready)
            self._ready.clear()
            self._ready.extend(ready)
        super()._run_once()


class LoopClock:
    """The clock port (pefsim.clock) on the running loop's time: under a VirtualLoop every
    reading and sleep of the cores is virtual."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def wall_ns(self) -> int:
        return EPOCH_NS + int(asyncio.get_running_loop().time() * 1e9)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def run(main, schedule=None):
    """Run a coroutine to its end on a fresh VirtualLoop (ready work ordered by ``schedule``, a
    seeded random.Random, if given), with the clock port on its time."""
    from pefsim import clock

    loop = VirtualLoop(schedule)
    try:
        with clock.use(LoopClock()):
            return loop.run_until_complete(main)
    finally:
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in left:  # as asyncio.run does: whatever still runs is cancelled and let end
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
