"""/metrics while the event loop churns VMs: prometheus-client collects in its HTTP server's
thread, the loop changes the state the gauges describe meanwhile. A collector that iterated
``state.svms`` or ``state.vms`` there raised "dictionary changed size during iteration" (HTTP 500
in 2 of 1,343 scrapes of the red-team run); every scrape must succeed, whatever the loop does."""
from __future__ import annotations

import asyncio
import sys
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from pefsim.abi import SvmState, VmState
from services.hypervisor.metrics import HvMetrics
from services.ultravisor.metrics import UvMetrics
from services.ultravisor.state import SecurePool

SCRAPES = 2500  # of the gauges that read loop-owned state: 30,000 reads of them for the UV
HTTP_SCRAPES = 200  # full ones
POPULATION = 200  # entries in the churned dict: a long iteration is a wide window
STATE_GAUGES = {"svms": ["pefsim_uv_svms", "pefsim_uv_secure_pages", "pefsim_uv_abort_pending_seconds",
                         "pefsim_uv_hcall_unanswered_seconds"],
                "vms": ["pefsim_hv_vms"]}


@pytest.fixture(autouse=True)
def switch_often():
    """Make the interpreter switch threads every few bytecodes, so a collector that iterates
    loop-owned state is interrupted mid-iteration in nearly every scrape, not in 1 of 700."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def uv_state():
    svm = lambda n: SimpleNamespace(state=(SvmState.SVM_ACTIVE, SvmState.SVM_SECURE, SvmState.SVM_ABORT)[n % 3],
                                    unanswered=("H_SVM_INIT_DONE", 1) if n % 5 == 0 else None,
                                    abort_issued_ns=n)
    return SimpleNamespace(svms={}, pool=SecurePool(16, populate=False)), svm


def hv_state():
    vm = lambda n: SimpleNamespace(state=(VmState.VM_NORMAL, VmState.VM_SECURE)[n % 2])
    return SimpleNamespace(vms={}), vm


def hammer(build, field, scrape, scrapes):
    """Build the metrics on a running loop (as the services do), churn ``state.<field>`` there
    (add one, drop one) while a thread scrapes ``scrapes`` times; every exception is returned."""
    errors: list[BaseException] = []

    async def main():
        state, make = build()
        table = getattr(state, field)
        metrics = (UvMetrics if field == "svms" else HvMetrics)(state)
        for snapshot in getattr(metrics, "snapshots", ()):
            snapshot.max_age = 0.0  # a fresh one from the loop for every read: the refresh path, hammered
        target = scrape(metrics, field)
        done = threading.Event()

        def scraper():
            try:
                for _ in range(scrapes):
                    try:
                        target()
                    except Exception as exc:  # noqa: BLE001 - counted, and the test shows them
                        errors.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        n = 0
        while not done.is_set():
            for _ in range(50):
                table[n] = make(n)
                table.pop(n - POPULATION, None)
                n += 1
            await asyncio.sleep(0)
        thread.join()

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
def test_collecting_in_another_thread_never_fails_while_the_loop_churns(field, build):
    errors = hammer(build, field, in_thread, SCRAPES)
    assert not errors, f"{len(errors)} of {SCRAPES} scrapes failed, first: {errors[0]!r}"


def test_http_scrapes_never_fail_while_the_loop_churns():
    errors = hammer(uv_state, "svms", over_http, HTTP_SCRAPES)
    assert not errors, f"{len(errors)} of {HTTP_SCRAPES} scrapes failed, first: {errors[0]!r}"


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
