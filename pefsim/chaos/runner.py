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
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import json_format

from pefsim.abi import PAGE_SIZE, Errno
from pefsim.blob import make_blob
from pefsim.chaos import checker
from pefsim.chaos.metrics import ChaosMetrics
from pefsim.ops.demo import Operator
from pefsim.image import GuestImage, page_digest
from pefsim.v1 import guest_pb2, hypervisor_pb2 as hpb, ultravisor_pb2 as upb

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


@dataclass
class FaultRecord:
    injected: bool = False
    t_inject: float = 0.0
    t_heal: float = 0.0
    detail: str = ""


@dataclass
class RunCtx:
    cfg: ChaosConfig
    backend: object
    run: int
    plan: Plan
    op: Operator
    names: dict = field(default_factory=dict)  # role -> guest name
    lpids: dict = field(default_factory=dict)  # role -> lpid
    metrics: object = None


async def poll(cond, timeout: float, every: float = 0.005):
    """Wait until ``await cond()`` is truthy; returns it, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = await cond()
        except grpc.aio.AioRpcError:
            value = None
        if value:
            return value
        await asyncio.sleep(every)
    return None


async def svm_state(ctx: RunCtx, role: str) -> str:
    lpid = ctx.lpids.get(role)
    status = await ctx.op.uv.stub.UvStatus(upb.UvStatusRequest(), timeout=2)
    return next((s.state for s in status.svms if s.lpid == lpid), "")


async def vm_of(ctx: RunCtx, role: str):
    status = await ctx.op.hv.stub.HvStatus(hpb.HvStatusRequest(), timeout=2)
    return next((v for v in status.vms if v.lpid == ctx.lpids.get(role)), None)


async def lpid_of(ctx: RunCtx, role: str) -> int:
    rep = (await ctx.op.guest(ctx.names[role]).GuestStatus(guest_pb2.GuestStatusRequest(), timeout=2)).report
    if rep.lpid:
        ctx.lpids[role] = rep.lpid
    return rep.lpid


async def trigger(ctx: RunCtx, victim_boot: asyncio.Future) -> bool:
    """Wait for the moment the plan names; False if the victim finished first."""
    await poll(lambda: lpid_of(ctx, "victim"), 30)
    during = ctx.plan.during
    if during == "abort":
        async def cond():
            return victim_boot.done() or await svm_state(ctx, "victim") == "SVM_ABORT"
    elif during == "esm":
        async def cond():
            vm = await vm_of(ctx, "victim")
            return victim_boot.done() or (vm is not None and vm.state == "VM_TRANSIENT")
    else:
        async def cond():
            return victim_boot.done()
    await poll(cond, ctx.cfg.final_bound_s)
    if during == "secure":
        return True
    await asyncio.sleep(ctx.plan.delay_s)
    return not victim_boot.done()


async def touch_secure_victim(ctx: RunCtx, victim_boot: asyncio.Future) -> None:
    """Once the victim is secure, the host touches its first data page: the HV pages it out (and
    its armed failpoint kills it once the UV has answered)."""
    rep = await asyncio.shield(victim_boot)
    if rep.outcome != "secure":
        return
    gpa = GuestImage.of_size(ctx.names["victim"], ctx.cfg.mem_bytes).data_start
    try:
        await ctx.op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=rep.lpid, gpa=gpa), timeout=10)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:  # anything but the HV dying under the call
            raise


async def nemesis(ctx: RunCtx, victim_boot: asyncio.Future) -> FaultRecord:
    fault, backend, rec = ctx.plan.fault, ctx.backend, FaultRecord()
    if ctx.plan.failpoint.endswith("=stop"):
        return await at_breakpoint(ctx, victim_boot, fault, rec)
    if ctx.plan.failpoint:
        # the armed HV kills itself at the failpoint: wait for it (or for the run to end without)
        async def hv_died_or_run_over():
            return not backend.alive("hv") or victim_boot.done()

        async def hv_died():
            return not backend.alive("hv")
        if ctx.plan.failpoint.startswith("hv.secure.page_out"):
            await touch_secure_victim(ctx, victim_boot)
            died = await poll(hv_died, 10, 0.002)
        else:
            died = await poll(hv_died_or_run_over, ctx.cfg.final_bound_s, 0.002)
        if died and not backend.alive("hv"):
            with fault_window(ctx, fault, rec):
                rec.detail = f"HV killed itself at {ctx.plan.failpoint}"
                await asyncio.to_thread(backend.restart, "hv")  # disarmed
        else:
            await asyncio.to_thread(backend.restart, "hv")  # disarmed
            rec.t_heal = time.time()
        return rec
    if not await trigger(ctx, victim_boot):
        rec.detail, rec.t_heal = "the victim finished before the fault point", time.time()
        return rec
    with fault_window(ctx, fault, rec):
        await inject(ctx, fault, rec)
    return rec


@contextlib.contextmanager
def fault_window(ctx: RunCtx, fault: str, rec: FaultRecord):
    """The block is the fault's time in effect: recorded as injected (counted, shown active)
    when it starts, healed when it ends."""
    rec.injected, rec.t_inject = True, time.time()
    ctx.metrics.faults.labels(fault).inc()
    ctx.metrics.active.labels(fault).set(1)
    try:
        yield
    finally:
        ctx.metrics.active.labels(fault).set(0)
        rec.t_heal = time.time()


async def at_breakpoint(ctx: RunCtx, victim_boot: asyncio.Future, fault: str, rec: FaultRecord) -> FaultRecord:
    """The HV stops itself at the plan's breakpoint; the fault is put in place while it is
    stopped, the HV is let go, and the fault runs its course."""
    backend = ctx.backend

    async def hv_stopped_or_run_over():
        return backend.stopped("hv") or victim_boot.done()
    await poll(hv_stopped_or_run_over, ctx.cfg.final_bound_s, 0.002)
    if not backend.stopped("hv"):
        rec.detail, rec.t_heal = "the victim finished before the breakpoint", time.time()
        return rec
    with fault_window(ctx, fault, rec):
        try:
            await inject(ctx, fault, rec, release=lambda: backend.cont("hv"))
        finally:
            backend.cont("hv")  # whatever happened, the HV is not left stopped
    rec.detail += f" (the HV stopped at {ctx.plan.failpoint.removesuffix('=stop')})"
    return rec


async def inject(ctx: RunCtx, fault: str, rec: FaultRecord, release=lambda: None) -> None:
    """Put the fault in place, call ``release`` (it lets a stopped HV go on: see at_breakpoint),
    and heal it."""
    backend = ctx.backend
    if fault in ("kill-hv", "kill-uv"):
        svc = fault.removeprefix("kill-")
        backend.kill(svc)
        release()
        await asyncio.to_thread(backend.restart, svc)
        rec.detail = f"kill -9 {svc} ({ctx.plan.during}), restarted"
    elif fault == "pause-hv":
        backend.pause("hv")
        await asyncio.sleep(ctx.cfg.pause_s)
        backend.cont("hv")
        rec.detail = f"SIGSTOP hv for {ctx.cfg.pause_s} s"
    elif fault == "kill-guest":
        backend.kill_guest(ctx.names["victim"])
        release()
        rec.detail = "kill -9 the victim guest mid-ESM"
    elif fault.startswith("net-"):
        kind = fault.removeprefix("net-")
        backend.net_fault(kind, ctx.plan.value)
        release()
        await asyncio.sleep(ctx.cfg.fault_s)
        backend.net_heal()
        rec.detail = f"HV<->UV {kind} {ctx.plan.value or ''} for {ctx.cfg.fault_s} s"


def guest_name(run: int, role: str) -> str:
    return f"r{run}-{role}"


def victim_name(run: int) -> str:
    return guest_name(run, "victim")


async def start_guest(ctx: RunCtx, role: str, blob_ok: bool = True, extra: tuple[str, ...] = ()) -> dict:
    name = guest_name(ctx.run, role)
    image = GuestImage.of_size(name, ctx.cfg.mem_bytes)
    blob = make_blob(image, ctx.backend.signing_key(), override=None if blob_ok else {"kernel": "0" * 128})
    addr = await asyncio.to_thread(ctx.backend.add_guest, name, ctx.cfg.mem_bytes, blob, extra)
    ctx.op.guest(name, addr)
    ctx.names[role] = name
    return {"name": name, "mem_bytes": ctx.cfg.mem_bytes, "blob_hex": blob.hex(), "role": role}


async def boot(ctx: RunCtx, role: str):
    return (await ctx.op.guest(ctx.names[role]).Boot(guest_pb2.BootRequest())).report


async def one_run(cfg: ChaosConfig, backend, run: int, plan: Plan, store: Path, metrics=None) -> dict:
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


async def settle(ctx: RunCtx, victim_boot: asyncio.Future, fault: FaultRecord) -> float | None:
    """Wait (bounded) until every guest of the run is in a final state; returns when."""
    try:
        await asyncio.wait_for(asyncio.shield(victim_boot), ctx.cfg.final_bound_s)
    except asyncio.TimeoutError:
        return None
    except grpc.aio.AioRpcError:
        if ctx.plan.fault != "kill-guest":
            return None
        # the VMM is gone: final once the HV destroyed its VM and the UV forgot its SVM
        async def gone():
            return await vm_of(ctx, "victim") is None and await svm_state(ctx, "victim") == ""
        if not await poll(gone, ctx.cfg.final_bound_s, 0.05):
            return None
        return time.time()
    return time.time() if await poll(lambda: settled(ctx), ctx.cfg.final_bound_s, 0.05) else None


async def settled(ctx: RunCtx) -> bool:
    """No abort still under way, no VM left depending on a UV that was reset, and every guest
    told what happened to it."""
    status = await ctx.op.hv.stub.HvStatus(hpb.HvStatusRequest(), timeout=2)
    mine = {v.lpid: v for v in status.vms if v.lpid in ctx.lpids.values()}
    if any(v.aborting for v in mine.values()):
        return False
    uv = await ctx.op.uv.stub.UvStatus(upb.UvStatusRequest(), timeout=2)
    svms = {s.lpid for s in uv.svms}
    for role, name in ctx.names.items():
        vm = mine.get(ctx.lpids.get(role))
        if vm is not None and vm.state in ("VM_TRANSIENT", "VM_SECURE") and vm.lpid not in svms:
            return False  # the UV lost it (reset) and the HV has not failed the VM yet
        rep = (await ctx.op.guest(name).GuestStatus(guest_pb2.GuestStatusRequest(), timeout=2)).report
        if rep.outcome in ("created", "booting") or (vm is not None and vm.failed and rep.outcome != "failed"):
            return False
    return True


async def inspect(ctx: RunCtx, record: dict) -> None:
    """Read memory back, touch a secure page from the host, collect reports and status."""
    for role, g in record["guests"].items():
        if role == "victim" and ctx.plan.fault == "kill-guest":
            g["outcome"] = "killed" if await vm_of(ctx, "victim") is None else "not-destroyed"
            continue
        stub = ctx.op.guest(g["name"])
        try:
            rep = (await stub.GuestStatus(guest_pb2.GuestStatusRequest(), timeout=10)).report
            if rep.outcome in ("secure", "aborted", "normal"):
                rep = (await stub.Verify(guest_pb2.VerifyRequest(), timeout=60)).report
            if rep.outcome == "secure":
                record["host_touches"].append(await host_touch(ctx, g, rep.lpid))
        except grpc.aio.AioRpcError as exc:
            g["outcome"] = f"unreachable ({exc.code().name})"
            continue
        g["report"] = json_format.MessageToDict(rep)
        g["report"]["lpid"] = rep.lpid
        g["outcome"] = rep.outcome if rep.outcome != "booting" else "not-final"
    record["uv_status"] = json_format.MessageToDict(await ctx.op.uv.stub.UvStatus(upb.UvStatusRequest()))
    record["hv_status"] = json_format.MessageToDict(await ctx.op.hv.stub.HvStatus(hpb.HvStatusRequest()))


async def host_touch(ctx: RunCtx, g: dict, lpid: int) -> dict:
    """The host reads a data page of a secure guest: it must get ciphertext."""
    image = GuestImage.of_size(g["name"], g["mem_bytes"])
    gpa = image.data_start
    resp = await ctx.op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=lpid, gpa=gpa))
    plain = image.page(gpa // PAGE_SIZE, bytes.fromhex(g["blob_hex"]))
    return {"guest": g["name"], "errno": Errno(resp.errno).name, "data_sha": page_digest(resp.data),
            "plaintext": resp.errno == Errno.OK and resp.data == plain}


async def teardown(ctx: RunCtx, record: dict) -> None:
    for role in ctx.names:
        if role not in ctx.lpids:
            await poll(lambda: lpid_of(ctx, role), 5, 0.05)
    for role, lpid in ctx.lpids.items():
        try:
            await ctx.op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=lpid), timeout=30)
        except grpc.aio.AioRpcError:
            pass
    status = await poll(lambda: ctx.op.uv.stub.UvStatus(upb.UvStatusRequest(), timeout=2), 30)
    record["uv_after"] = json_format.MessageToDict(status, always_print_fields_with_no_presence=True)


def read_history(path: Path, window: list[float]) -> list[dict]:
    """The history lines of one window (a line cut short by a kill -9 is skipped)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if window[0] <= event.get("t", 0) <= window[1]:
            out.append(event)
    return out


def run_chaos(cfg: ChaosConfig, backend, log=print, before_runs=None) -> dict:
    """Run the scenarios; returns the summary (the JSON ``pefsim chaos --json`` prints).
    ``before_runs`` is called once the stack is up and the harness's metrics are published."""
    rng = random.Random(cfg.seed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(cfg.results) / f"{stamp}-{cfg.fault}-{cfg.during}-seed{cfg.seed}"
    root.mkdir(parents=True, exist_ok=True)
    latest = Path(cfg.results) / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(root.name)
    violations: list[checker.Violation] = []
    recoveries: list[float] = []
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
    try:
        for run in range(1, cfg.runs + 1):
            plan = plan_run(cfg, random.Random(rng.getrandbits(64)), npages, backend, victim_name(run))
            record = asyncio.run(one_run(cfg, backend, run, plan, root, metrics))
            history = {svc: read_history(path, record["window"]) for svc, path in backend.histories().items()}
            found = checker.check(record, history)
            violations += found
            injected += record["fault"]["injected"]
            metrics.runs.inc()
            for v in found:
                metrics.violations.labels(v.invariant).inc()
            if record.get("recovery_s") is not None:
                recoveries.append(record["recovery_s"])
                metrics.recovery_seconds.observe(record["recovery_s"])
            run_dir = root / f"run-{run:04d}"
            run_dir.mkdir()
            (run_dir / "record.json").write_text(json.dumps(record, indent=1, default=str))
            (run_dir / "verdicts.json").write_text(json.dumps([v.as_json() for v in found], indent=1))
            for svc, events in history.items():
                (run_dir / f"{svc}.history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
            if cfg.progress:
                rec_s = record.get("recovery_s")
                log(f"run {run}/{cfg.runs}: {record['fault']['detail'] or 'no fault'}; "
                    f"{len(found)} violations; recovery {'-' if rec_s is None else f'{rec_s:.2f} s'}")
    finally:
        backend.stop()
    summary = {"runs": cfg.runs, "faults_injected": injected,
               "violations": [v.as_json() for v in violations],
               "recovery_s": quantiles(recoveries), "results": str(root)}
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def quantiles(values: list[float]) -> dict:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"p50": round(statistics.median(ordered), 4), "p99": round(p99, 4), "max": round(ordered[-1], 4)}
