"""Fixtures: real service processes on 127.0.0.1, layered by life-cycle stage.

* ``stack_factory`` starts a LocalStack (UV + HV as separate processes, and the guests a test
  adds) with a given config and owns it: at teardown it saves every service's /metrics under
  ``<run dir>/metrics/``, stops every process and asserts that each exited cleanly and that no
  log holds a traceback. The logs, histories and metrics stay in the run directory, whose path
  a failure report shows.
* ``stack`` is one default stack per test module.
* ``run`` runs a coroutine (each test makes its own gRPC channels inside it).
"""
from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from pefsim.ops.stack import LocalStack, StackConfig

_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def assert_clean_exit(stack: LocalStack, codes: dict | None = None) -> None:
    """Stop the stack (unless ``codes`` says it was stopped) and assert every process exited
    cleanly (or was killed on purpose) and no log holds a traceback."""
    codes = stack.stop() if codes is None else codes
    problems = [f"{name} exited {code}" for name, code in codes.items()
                if code not in (0, None) and not stack.procs[name].killed]
    for name, proc in stack.procs.items():
        text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
        if "Traceback" in text:
            problems.append(f"{name} logged a traceback:\n{proc.log_tail(40)}")
    assert not problems, "\n".join(problems) + f"\n(run dir {stack.run_dir})"


def keep_metrics(stack: LocalStack) -> None:
    """Every running service's /metrics, as text, in <run dir>/metrics/<service>.prom (a service
    that does not answer gets a line saying why)."""
    import urllib.request

    out = Path(stack.run_dir) / "metrics"
    out.mkdir(exist_ok=True)
    for name, addr in stack.metrics_targets().items():
        try:
            text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=2).read().decode()
        except OSError as exc:
            text = f"# not scraped: {exc}\n"
        (out / f"{name}.prom").write_text(text)


@pytest.fixture(scope="module")
def stack_factory(tmp_path_factory):
    stacks: list[LocalStack] = []

    def make(**kw) -> LocalStack:
        run_dir = tmp_path_factory.mktemp("stack")
        stack = LocalStack(StackConfig(run_dir=run_dir, **kw)).start()
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        keep_metrics(stack)
    stopped = [(stack, stack.stop()) for stack in stacks]  # every one, before any assertion
    for stack, codes in stopped:
        assert_clean_exit(stack, codes)


@pytest.fixture(scope="module")
def stack(stack_factory) -> LocalStack:
    return stack_factory()


@pytest.fixture
def run():
    return lambda coro: asyncio.run(coro)


def history(stack: LocalStack, service: str) -> list[dict]:
    import json

    path = Path(stack.run_dir) / f"{service}.history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
