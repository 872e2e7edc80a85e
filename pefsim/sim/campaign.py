"""``pefsim sim``: many simulated runs (scenario.py), sampled from a seed or enumerated
(``--exhaustive``), judged by the chaos checkers; one JSON summary.

Sampled: run i has seed ``seed + i``; its plan and everything random in it come from that seed,
so each failing run prints the one command that replays it. Exhaustive: every crash point of the
HV on the ESM and abort paths (each failpoint at each page, each frame of the bulk streams; for
the abort, a second crash at each of its steps while the restarted HV recovers), each
answer the HV<->UV link can lose, each call it can be cut at, and a UV reset at each of those
calls, once each.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.guest.core.program import GuestConfig
from pefsim.sim.scenario import (ABORT_POINTS, CUT_CALLS, DISK_POINT, DURINGS, FAULTS, GUEST_CUT_CALLS, HANG_CALLS,
                                 HELD_FOR_S, LOSABLE, PAGES,
                                 VM_JSON_WRITES, Plan, plan_of, run_one)


@dataclass
class SimConfig:
    runs: int = 100
    seed: int = 1
    faults: tuple[str, ...] = FAULTS
    durings: tuple[str, ...] = DURINGS
    mutants: tuple[str, ...] = ()
    exhaustive: bool = False
    stop_at_first: bool = False
    progress: object = None  # called with (done, total) now and then
    extra_args: list[str] = field(default_factory=list)
    schedule: str = "seeded"  # the order of ready work: drawn from each run's seed, or fifo
    results: Path | None = None  # where a failing run's record and histories are written (None: nowhere)
    jobs: int = 1  # worker processes (each run is independent: the summary is the same for any count)


def every_plan(durings: tuple[str, ...] = DURINGS) -> list[Plan]:
    """Every single fault of the small configuration, once: the HV crashing at each failpoint hit
    and as each answer or frame arrives, each answer lost, the link cut at each call."""
    plans: list[Plan] = []

    def add(**kw):
        plans.append(Plan(seed=len(plans), **kw))
    for during in durings:
        add(fault="none", during=during)
        points = [(p, n) for p in ABORT_POINTS for n in (range(1, PAGES + 1) if p == "hv.abort.page_out" else (1,))] \
            if during == "abort" else [("hv.esm.page_in", n) for n in range(1, PAGES + 1)] + [("hv.esm.init_done", 1)]
        points += [(DISK_POINT, n) for n in range(1, VM_JSON_WRITES[during] + 1)]
        for point, n in points:
            add(fault="kill-hv", during=during, failpoint=f"{point}:{n}@victim", for_s=1.0)
        if during == "abort":  # crash once, then again while the restarted HV finishes the abort
            for first in ("hv.abort.page_out:1", f"hv.abort.page_out:{PAGES}", "hv.abort.before_terminate"):
                for again in ABORT_POINTS:
                    add(fault="kill-hv", during=during, failpoint=f"{first}@victim", again=f"{again}:1@victim",
                        for_s=1.0)
        arrivals = (("UvPageOutStream", 1), ("UvPageOutStream", 2), ("UV_SVM_TERMINATE", 1)) if during == "abort" \
            else (("UvPageInStream", 1), ("UvPageInStream", 2), ("UV_REGISTER_MEM_SLOT", 1))
        for arrival in arrivals:
            add(fault="kill-hv", during=during, arrival=arrival, for_s=1.0)
        for link, calls in LOSABLE.items():
            for call in calls:
                add(fault="lose", during=during, link=link, lose=(call, 1))
        for call in CUT_CALLS[during]:
            add(fault="partition", during=during, cut_at=(call, 1), for_s=5.0)
            add(fault="reset-uv", during=during, cut_at=(call, 1))
        gone_at = ("hv.abort.page_out:1", "hv.abort.before_terminate:1") if during == "abort" \
            else ("hv.esm.page_in:1", "hv.esm.init_done:1")
        for point in gone_at:  # the HV dies there and stays down a minute
            add(fault="hv-gone", during=during, failpoint=f"{point}@victim", for_s=HELD_FOR_S)
        for call in GUEST_CUT_CALLS[during]:
            add(fault="partition", during=during, link="hv<->guest", cut_at=(call, 1), for_s=5.0)
        for call in HANG_CALLS[during]:
            add(fault="hang", during=during, cut_at=(call, 1))
    return plans


def replay_command(cfg: SimConfig, plan: Plan) -> str:
    if cfg.exhaustive:
        args = ["pefsim", "sim", "--exhaustive", "--only", str(plan.seed)]
    else:
        args = ["pefsim", "sim", "--seed", str(plan.seed), "--runs", "1"]
        args += [a for f in cfg.faults if cfg.faults != FAULTS for a in ("--fault", f)]
        args += [a for d in cfg.durings if cfg.durings != DURINGS for a in ("--during", d)]
    args += [a for m in cfg.mutants for a in ("--mutant", m)]
    args += ["--schedule", cfg.schedule] if cfg.schedule != "seeded" else []
    return " ".join(args)


def _run(job: tuple[Plan, tuple[str, ...], str]) -> tuple[str, list, float, dict | None]:
    """One run, as a worker process returns it: the outcome's digest, violations, virtual time,
    and for a failing run its record and histories."""
    plan, mutants, schedule = job
    out = run_one(plan, mutants, schedule=schedule)
    kept = {"record": out.record, "history": out.history} if out.violations else None
    return out.digest, [(v.invariant, v.detail) for v in out.violations], out.virtual_s, kept


def _keep(cfg: SimConfig, plan: Plan, found: list, kept: dict) -> str:
    """Write a failing run's plan, verdicts, record and histories (what the timeline draws);
    returns the file's path."""
    cfg.results.mkdir(parents=True, exist_ok=True)
    path = cfg.results / f"seed-{plan.seed}{'-' + '-'.join(cfg.mutants) if cfg.mutants else ''}.json"
    path.write_text(json.dumps({"plan": asdict(plan), "replay": replay_command(cfg, plan),
                                "violations": [{"invariant": i, "detail": d} for i, d in found], **kept},
                               sort_keys=True, default=str))
    from pefsim.timeline import auto as timeline

    timeline.sim_failure(path)  # seed-N….timeline.html beside it
    return str(path)


def _worker_start() -> None:
    """A worker ends quietly when the pool ends it (SIGTERM) and leaves Ctrl-C to the parent, not
    with the command's own handlers (which it inherits by fork)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _outcomes(cfg: SimConfig, plans: list[Plan]):
    """Each plan's (digest, violations, virtual s), in the plans' order, from ``cfg.jobs`` worker
    processes (forked: the same code, the same PYTHONHASHSEED) or this one."""
    jobs = [(plan, cfg.mutants, cfg.schedule) for plan in plans]
    if cfg.jobs <= 1:
        yield from map(_run, jobs)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(cfg.jobs, _worker_start, maxtasksperchild=500) as pool:
        yield from pool.imap(_run, jobs, chunksize=4)


def run_campaign(cfg: SimConfig, only: int | None = None) -> dict:
    """Run the campaign; the summary ``pefsim sim --json`` prints."""
    plans = every_plan(cfg.durings) if cfg.exhaustive else \
        [plan_of(cfg.seed + i, cfg.faults, cfg.durings) for i in range(cfg.runs)]
    if only is not None:
        plans = [p for p in plans if p.seed == only]
    t0 = time.perf_counter()
    digest = hashlib.sha256()
    violations, injected, virtual_s = [], 0, 0.0
    for i, (plan, (run_digest, found, run_virtual_s, kept)) in enumerate(zip(plans, _outcomes(cfg, plans))):
        digest.update(run_digest.encode())
        injected += plan.fault != "none"
        virtual_s += run_virtual_s
        history = _keep(cfg, plan, found, kept) if kept is not None and cfg.results is not None else None
        for invariant, detail in found:
            violations.append({"seed": plan.seed, "invariant": invariant, "detail": detail,
                               "plan": plan.fault + ("" if not plan.fault else f" during {plan.during}"),
                               "replay": replay_command(cfg, plan), **({"history": history} if history else {})})
        if cfg.progress is not None:
            cfg.progress(i + 1, len(plans))
        if violations and cfg.stop_at_first:
            plans = plans[:i + 1]
            break
    seconds = time.perf_counter() - t0
    return {"runs": len(plans), "faults_injected": injected, "violations": violations,
            "seconds": round(seconds, 3), "runs_per_minute": round(len(plans) / seconds * 60, 1) if seconds else 0.0,
            "virtual_seconds": round(virtual_s, 3), "history_sha256": digest.hexdigest(),
            "mode": "exhaustive" if cfg.exhaustive else "sampled", "mutants": list(cfg.mutants),
            "schedule": cfg.schedule, "jobs": cfg.jobs, "guest_policy": GuestConfig.on_esm_failure}


def chaos_rate(runs: int, seed: int = 1) -> dict:
    """The same kind of run through real processes, for comparison: ``runs`` runs of
    ``pefsim chaos --fault kill-hv --during abort`` with 16-page guests, as the simulator's; their
    rate a minute (wall clock, stack start included)."""
    import shutil
    import tempfile
    from pathlib import Path

    from pefsim.chaos.backend import LocalBackend
    from pefsim.chaos.generator import ChaosConfig
    from pefsim.chaos.runner import run_chaos
    from pefsim.sim.scenario import MEM

    root = Path(tempfile.mkdtemp(prefix="pefsim-compare-"))
    try:
        cfg = ChaosConfig(fault="kill-hv", during="abort", runs=runs, seed=seed, mem_bytes=MEM,
                          results=root / "results")
        backend = LocalBackend(root / "run", proxies=False, mutants=(), abort_return="guest", pool_pages=4096)
        t0 = time.perf_counter()
        summary = run_chaos(cfg, backend, log=lambda s: None)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"runs": runs, "seconds": round(seconds, 3), "runs_per_minute": round(runs / seconds * 60, 1),
            "violations": len(summary["violations"]), "command": f"pefsim chaos --fault kill-hv --during abort "
                                                                   f"--runs {runs} --seed {seed} --mem-mib 1"}
