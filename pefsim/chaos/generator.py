"""The chaos generator: which fault, when, drawn from the seed (Jepsen's generator). A run's
:class:`Plan` is all the nemesis needs to know; everything random comes from ``--seed``."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

FAULTS = {
    "kill-hv": ("abort", "esm", "secure"),
    "pause-hv": ("abort", "esm", "secure"),
    "kill-guest": ("esm",),
    "kill-uv": ("abort", "esm", "secure"),
    "net-reset": ("abort", "esm"),
    "net-blackhole": ("abort", "esm"),
    "net-latency": ("abort", "esm"),
    "net-bandwidth": ("abort", "esm"),
}
WHAT = {  # one line per fault kind, for `pefsim chaos --help`
    "kill-hv": "SIGKILL the HV at a failpoint between two steps (a page-out, terminate, resume)",
    "pause-hv": "SIGSTOP the HV for --pause seconds, then SIGCONT",
    "kill-guest": "SIGKILL the victim guest (its VMM) during its ESM",
    "kill-uv": "SIGKILL the UV (a machine reset: it comes back empty)",
    "net-reset": "the HV <-> UV proxy resets every connection",
    "net-blackhole": "the HV <-> UV proxy drops every byte for --fault-time seconds",
    "net-latency": "the HV <-> UV proxy adds latency for --fault-time seconds",
    "net-bandwidth": "the HV <-> UV proxy throttles bandwidth for --fault-time seconds",
}
ABORT_POINTS = ("hv.abort.page_out", "hv.abort.before_terminate", "hv.abort.before_resume")


def default_results() -> Path:
    """Where chaos records go unless told: the user's state directory ($XDG_STATE_HOME, else
    ~/.local/state) under pefsim/chaos-results, never the directory the command was run from."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "pefsim" / "chaos-results"


@dataclass
class ChaosConfig:
    fault: str
    during: str = "abort"
    runs: int = 1
    seed: int = 1
    mem_bytes: int = 64 << 20
    pause_s: float = 2.0
    fault_s: float = 2.0
    final_bound_s: float = 90.0
    results: Path = field(default_factory=lambda: default_results())
    backend: str = "local"
    mutants: tuple[str, ...] = ()
    abort_return: str = "guest"
    progress: bool = False
    metrics_listen: str | None = None  # serve the harness's own /metrics here
    only_run: int = 0  # run only this one of the runs (its plan drawn as in the whole campaign): a replay
    timeline: str = "failed"  # which runs get a timeline.html: failed, all or none (pefsim/timeline/auto.py)


@dataclass
class Plan:
    """What the nemesis will do in one run, drawn from the run's seed."""

    fault: str
    during: str
    failpoint: str = ""
    delay_s: float = 0.0  # after the trigger, before the fault
    value: float = 0.0  # latency (s) or bandwidth (bytes/s)

    def as_json(self) -> dict:
        return dict(self.__dict__)


def plan_run(cfg: ChaosConfig, rng: random.Random, npages: int, backend, victim: str) -> Plan:
    plan = Plan(cfg.fault, cfg.during)
    if cfg.fault == "kill-hv" and cfg.during == "secure" and backend.supports_failpoints:
        # one run in two: inside a host touch of the secure victim, after the UV paged the page
        # out and before the HV wrote the ciphertext (the others: kill -9 while it runs)
        if rng.random() < 0.5:
            plan.failpoint = f"hv.secure.page_out@{victim}"
    elif cfg.fault == "kill-hv" and cfg.during in ("abort", "esm") and backend.supports_failpoints:
        if cfg.during == "esm":
            # mostly between page-ins; one run in four after INIT_DONE, before its answer
            if rng.random() < 0.25:
                plan.failpoint = f"hv.esm.init_done@{victim}"
            else:
                plan.failpoint = f"hv.esm.page_in:{rng.randint(1, npages)}@{victim}"
        else:
            point = rng.choices(ABORT_POINTS, weights=(6, 2, 2))[0]
            nth = rng.randint(1, npages) if point == "hv.abort.page_out" else 1
            plan.failpoint = f"{point}:{nth}@{victim}"
    elif cfg.fault != "kill-hv" and cfg.during in ("abort", "esm") and backend.supports_failpoints:
        # a breakpoint: the HV stops itself at a seeded page of the window, the fault is put in
        # place, and the HV goes on (a window of a few milliseconds is hit every time)
        point = "hv.abort.page_out" if cfg.during == "abort" else "hv.esm.page_in"
        plan.failpoint = f"{point}:{rng.randint(1, npages)}@{victim}=stop"
    else:
        # a moment inside the window: page moves take about a millisecond each
        plan.delay_s = round(rng.uniform(0.0, min(0.05, npages * 0.0003)), 4)
    if cfg.fault == "net-latency":
        plan.value = round(rng.uniform(0.005, 0.05), 4)
    elif cfg.fault == "net-bandwidth":
        plan.value = rng.choice((2 << 20, 8 << 20, 32 << 20))
    return plan
