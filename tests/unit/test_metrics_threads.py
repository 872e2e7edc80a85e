"""/metrics while the event loop churns VMs: prometheus-client collects in its HTTP server's
thread, the loop changes the state the gauges describe meanwhile. A collector that iterated
``state.svms`` or ``state.vms`` there raised "dictionary changed size during iteration" (HTTP 500
in 2 of 1,343 scrapes of the red-team run). Here the loop's tables refuse any read from another
thread, so a collector that reads them off the loop fails every scrape, not one in hundreds."""
from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from pefsim.abi import SvmState, VmState
from services.hypervisor.core.metrics import HvMetrics
from services.ultravisor.core.metrics import UvMetrics
from services.ultravisor.core.state import SecurePool

STATE_GAUGES = {"svms": ["pefsim_uv_svms", "pefsim_uv_secure_pages", "pefsim_uv_abort_pending_seconds",
                         "pefsim_uv_hcall_unanswered_seconds"],
                "vms": ["pefsim_hv_vms"]}


class LoopOwned(dict):
    """The loop's table of SVMs or VMs: any read of it from another thread raises, so a collector
    that reads it in the HTTP server's thread fails every scrape (deterministically; the race it
    stands for failed 2 in 1,343)."""

    owner: int | None = None

    def _mine(self) -> None:
        if self.owner is not None and threading.get_ident() != self.owner:
            raise AssertionError("the loop's state read from another thread")

    def __iter__(self):
        self._mine()
        return super().__iter__()

    def __len__(self):
        self._mine()
        return super().__len__()

    def values(self):
        self._mine()
        return super().values()

    def items(self):
        self._mine()
        return super().items()

    def keys(self):
        self._mine()
        return super().keys()


def uv_state():
    svm = lambda n: SimpleNamespace(state=(SvmState.SVM_ACTIVE, SvmState.SVM_SECURE, SvmState.SVM_ABORT)[n % 3],
                                    unanswered=("H_SVM_INIT_DONE", 1) if n % 5 == 0 else None,
                                    abort_issued_ns=n)
    return SimpleNamespace(svms=LoopOwned(), pool=SecurePool(16, populate=False)), svm


def hv_state():
    vm = lambda n: SimpleNamespace(state=(VmState.VM_NORMAL, VmState.VM_SECURE)[n % 2])
    return SimpleNamespace(vms=LoopOwned()), vm


def scrape_while_the_loop_churns(build, field, scrape, scrapes: int) -> list:
    """Build the metrics on a running loop (as the services do), then scrape ``scrapes`` times
    from a thread while the loop keeps adding and dropping entries; every exception is returned."""
    errors: list[BaseException] = []

    async def main():
        state, make = build()
        table = getattr(state, field)
        for n in range(20):
            table[n] = make(n)
        table.owner = threading.get_ident()
        metrics = (UvMetrics if field == "svms" else HvMetrics)(state)
        for snapshot in getattr(metrics, "snapshots", ()):
            snapshot.max_age = 0.0  # a fresh one from the loop for every read: the refresh path
        target = scrape(metrics, field)

        def scraper():
            for _ in range(scrapes):
                try:
                    target()
                except Exception as exc:  # noqa: BLE001 - counted, and the test shows them
                    errors.append(exc)
        scraping = asyncio.ensure_future(asyncio.to_thread(scraper))
        n = 20
        while not scraping.done():
            table[n] = make(n)
            table.pop(n - 20, None)
            n += 1
            await asyncio.sleep(0)
        await scraping

    asyncio.run(main())
    return errors


def in_thread(metrics, field):
    """What the HTTP server's thread does for a scrape, for the gauges of loop-owned state."""
    registry = metrics.registry.restricted_registry(STATE_GAUGES[field])
    return lambda: generate_latest(registry)


def over_http(metrics, field):
    port = metrics.serve("127.0.0.1:0")
    return lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()


@pytest.mark.parametrize("field, build", [("svms", uv_state), ("vms", hv_state)], ids=["uv", "hv"])
def test_collecting_in_another_thread_never_reads_the_loops_state(field, build):
    errors = scrape_while_the_loop_churns(build, field, in_thread, 50)
    assert not errors, f"{len(errors)} of 50 scrapes failed, first: {errors[0]!r}"


def test_http_scrapes_never_fail_while_the_loop_churns():
    errors = scrape_while_the_loop_churns(uv_state, "svms", over_http, 20)
    assert not errors, f"{len(errors)} of 20 scrapes failed, first: {errors[0]!r}"


def test_a_busy_loop_gets_its_last_value_served_after_one_wait():
    """A loop that does not answer (busy in a long step) makes a scrape wait ``timeout`` once,
    then serve the last value; the other gauges of the scrape do not wait again."""
    from pefsim.metrics import LoopSnapshot

    async def main():
        counter = iter(range(1000))
        snap = LoopSnapshot(lambda: next(counter), max_age=0.0, timeout=0.2)
        got: list[tuple[int, float]] = []

        def scrape():
            for _ in range(3):
                t = time.monotonic()
                got.append((snap.get(), time.monotonic() - t))

        thread = threading.Thread(target=scrape)
        thread.start()
        time.sleep(1.0)  # the loop is blocked: nothing answers the scrape
        thread.join()
        await asyncio.sleep(0)  # the loop runs the request it was sent: a fresh value again
        return got, await asyncio.to_thread(snap.get)

    got, after = asyncio.run(main())
    assert [value for value, _ in got] == [0, 0, 0]
    assert 0.15 < got[0][1] < 0.9 and got[1][1] < 0.05 and got[2][1] < 0.05, got
    assert after >= 1
