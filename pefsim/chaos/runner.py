"""``pefsim chaos``: seeded fault scenarios against a stack the harness starts, judged by the
checkers on what was recorded (the nemesis / checker split of Jepsen).

A run:
  1. arm the nemesis (for failpoint faults the HV is restarted with the failpoint armed);
  2. boot a bystander SVM to secure (and, for kill-uv, a normal VM);
  3. boot the victim: with a blob that does not match (``--during abort``) or a good one
     (``--during esm`` / ``secure``), and inject the fault at the point the plan chose;
  4. heal (restart, SIGCONT, proxy healed), wait for every guest to reach a final state;
  5. read every guest's memory back, let the host touch a page of each secure guest, collect the
     guests' reports and the UV's and HV's status, destroy the run's VMs, collect again;
  6. store the record and the services' histories for the run's window; check the invariants.

Everything random comes from ``--seed``; each run stores its record, verdicts and history slices
under the results directory (``latest`` points at the newest).

Jepsen's split: generator.py (the plan of each run), client.py (what the harness does as operator
and owner), nemesis.py (the faults, by family), checker.py (the invariants, judged on what was
recorded), store.py (the records); backend.py / docker_backend.py (where the stack runs); this
module only composes them.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time

from pefsim.abi import PAGE_SIZE
from pefsim.chaos import checker
from pefsim.chaos.client import RunCtx, boot, inspect, poll, settle, start_guest, teardown, victim_name
from pefsim.chaos.generator import ChaosConfig, Plan, plan_run
from pefsim.chaos.metrics import ChaosMetrics
from pefsim.chaos.nemesis import nemesis
from pefsim.chaos.store import Store, read_history
from pefsim.timeline import auto as timeline
from pefsim.ops.demo import Operator
from pefsim.v1 import ultravisor_pb2 as upb

async def one_run(cfg: ChaosConfig, backend, run: int, plan: Plan, metrics=None) -> dict:
    op = Operator.of(backend)
    ctx = RunCtx(cfg=cfg, backend=backend, run=run, plan=plan, op=op, metrics=metrics or ChaosMetrics())
    t0 = time.time()
    record = {"run": run, "plan": plan.as_json(), "final_bound_s": cfg.final_bound_s, "guests": {},
              "host_touches": []}
    try:
        if plan.failpoint:
            await asyncio.to_thread(backend.restart, "hv", (plan.failpoint,))
        uv0 = await poll(lambda: op.uv.stub.UvStatus(upb.UvStatusRequest(), timeout=2), 30)
        record["pool_before"] = uv0.pool_pages_in_use
        guests = record["guests"]
        guests["bystander"] = await start_guest(ctx, "bystander")
        by = await boot(ctx, "bystander")
        ctx.lpids["bystander"] = by.lpid
        if cfg.fault == "kill-uv":
            guests["normal"] = await start_guest(ctx, "normal", extra=("--no-svm",))
            ctx.lpids["normal"] = (await boot(ctx, "normal")).lpid
        guests["victim"] = await start_guest(ctx, "victim", blob_ok=cfg.during != "abort")
        victim_boot = asyncio.ensure_future(boot(ctx, "victim"))
        fault = await nemesis(ctx, victim_boot)
        record["fault"] = fault.__dict__
        t_final = await settle(ctx, victim_boot, fault)
        record["recovery_s"] = (t_final - fault.t_heal) if fault.injected and t_final else None
        await inspect(ctx, record)
        if cfg.fault == "kill-uv" and fault.injected:
            record["pool_before"] = 0  # a restarted UV starts empty
        await teardown(ctx, record)
    finally:
        await op.close()
        for name in ctx.names.values():
            await asyncio.to_thread(backend.stop_guest, name)
    record["window"] = [t0, time.time()]
    return record


def run_chaos(cfg: ChaosConfig, backend, log=print, before_runs=None) -> dict:
    """Run the scenarios; returns the summary (the JSON ``pefsim chaos --json`` prints).
    ``before_runs`` is called once the stack is up and the harness's metrics are published."""
    rng = random.Random(cfg.seed)
    store = Store(cfg.results, cfg.fault, cfg.during, cfg.seed)
    violations: list[checker.Violation] = []
    recoveries: list[float] = []
    policies: set[str] = set()  # what the guests did after a failed UV_ESM (their reports say)
    injected = 0
    npages = cfg.mem_bytes // PAGE_SIZE
    metrics = ChaosMetrics()
    metrics.prepare(cfg.fault, checker.INVARIANTS)
    port = metrics.serve(cfg.metrics_listen)
    backend.start()
    if port is not None:
        backend.publish_metrics(f"{cfg.metrics_listen.rsplit(':', 1)[0]}:{port}")
    if before_runs is not None:
        before_runs()
    t0, done, todo = time.monotonic(), 0, 1 if cfg.only_run else cfg.runs
    try:
        for run in range(1, cfg.runs + 1):
            run_rng = random.Random(rng.getrandbits(64))  # drawn for every run: run N's plan is the same alone
            if cfg.only_run and run != cfg.only_run:
                continue
            done += 1
            plan = plan_run(cfg, run_rng, npages, backend, victim_name(run))
            record = asyncio.run(one_run(cfg, backend, run, plan, metrics))
            history = {svc: read_history(path, record["window"]) for svc, path in backend.histories().items()}
            found = checker.check(record, history)
            violations += found
            injected += record["fault"]["injected"]
            policies.update(g["report"].get("onEsmFailure", "") for g in record["guests"].values() if "report" in g)
            metrics.runs.inc()
            for v in found:
                metrics.violations.labels(v.invariant).inc()
            if record.get("recovery_s") is not None:
                recoveries.append(record["recovery_s"])
                metrics.recovery_seconds.observe(record["recovery_s"])
            drawn = timeline.chaos_run(cfg, store.write_run(run, record, found, history), failed=bool(found))
            if cfg.progress:
                rec_s = record.get("recovery_s")
                left = (time.monotonic() - t0) / done * (todo - done)
                log(f"run {run}/{cfg.runs}: {record['fault']['detail'] or 'no fault'}; "
                    f"{len(found)} violations; recovery {'-' if rec_s is None else f'{rec_s:.2f} s'}; "
                    f"about {left:.0f} s left" + (f"; timeline {drawn}" if drawn else ""))
    finally:
        backend.stop()
    summary = {"runs": done, "faults_injected": injected, "guest_policy": ", ".join(sorted(policies)),
               "violations": [v.as_json() for v in violations],
               "recovery_s": quantiles(recoveries), "results": str(store.root)}
    store.write_summary(summary)
    timeline.chaos_campaign(cfg, store.root)  # index.html: every run, its verdicts, its timeline
    return summary


def quantiles(values: list[float]) -> dict:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"p50": round(statistics.median(ordered), 4), "p99": round(p99, 4), "max": round(ordered[-1], 4)}
