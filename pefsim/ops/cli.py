"""The ``pefsim`` command: a model of POWER's Protected Execution Facility (UV, HV, guests).

  pefsim demo [--json]                   the secure-VM life cycle on a fresh local stack
  pefsim up [--guests N] [--supervise]   UV, HV and N secure guests as local processes, until Ctrl-C
  pefsim status|down --stack FILE        what a running stack holds / stop it
  pefsim kill|pause|resume|restart hv --stack FILE    one service of a running stack
  pefsim failpoint set hv.abort.page_out:3 --stack FILE    arm a failpoint in the running HV or UV
  pefsim guest add g-bad --tamper kernel --stack FILE      add a guest whose ESM the UV aborts
  pefsim vm destroy|reset|touch LPID --stack FILE   an operator's action on one VM
  pefsim chaos --fault kill-hv --during abort --runs 20   fault runs through real processes
  pefsim sim --runs 1000 [--exhaustive]  the same cores in one process on virtual time, seeded
  pefsim bench [--json]                  page transfer against memcpy and raw TCP
  pefsim keys|certs|blob ...             signing keys, mTLS certificates, ESM blobs

Exit codes: 0 ok, 1 a check or invariant failed, 2 usage, 3 environment (port, stack file, tool),
130 interrupted. --debug shows a traceback instead of the one-line error.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pefsim
from pefsim.abi import PAGE_SIZE


def _stack_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--run-dir", type=Path, help="where logs, keys, histories and guest RAM go "
                    "(default: a new temporary directory)")
    ap.add_argument("--pool-pages", type=int, default=4096,
                    help="UV secure memory in 64 KiB pages (default 4096 = 256 MiB)")
    ap.add_argument("--esm-copy", choices=["all", "measured"], default="all",
                    help="ESM pages in every GFN (default) or only the measured regions")
    ap.add_argument("--abort-return", choices=["guest", "uv"], default="guest",
                    help="H_SVM_INIT_ABORT resumes the guest from the HV (merged kernel, "
                         "default) or returns to the UV (the v10 proposal)")
    _guest_policy_arg(ap)


def _guest_policy_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--on-esm-failure", choices=["os-term", "continue"], default="os-term",
                    help="what a guest does after a UV_ESM that did not switch it to secure mode: os-term "
                         "(Linux's prom_init, default: its VMM stops it, its memory stays with the HV) or "
                         "continue as a normal VM")


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 (pick a free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= port <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"not a port: {port} (0 picks a free one; at most 65535)")
    return port


def _interrupted(signum, _frame):
    """SIGTERM / SIGHUP (a closed terminal, `timeout`, a CI cancel) stop a command the way Ctrl-C
    does: its cleanup runs and stops every service it started."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _temp_run_dir(a, prefix: str = "pefsim-") -> Path:
    """The run directory the user named, or a temporary one, remembered so the command removes it
    when it is done (it holds the stack's CA and keys) unless something failed."""
    if a.run_dir:
        return Path(a.run_dir)
    a.temp_run_dir = Path(tempfile.mkdtemp(prefix=prefix))
    return a.temp_run_dir


def _done_with(a, failed: bool) -> None:
    """Remove the temporary run directory, or, when something failed, say where it is kept."""
    temp = getattr(a, "temp_run_dir", None)
    if temp is None:
        return
    if failed and temp.is_dir() and any(temp.iterdir()):  # a stack ran there: its evidence stays
        print(f"pefsim {a.cmd}: logs, histories and keys kept in {temp}", file=sys.stderr)
    else:
        shutil.rmtree(temp, ignore_errors=True)


def _stack_config(a, **kw):
    from pefsim.ops.stack import StackConfig

    run_dir = _temp_run_dir(a)
    return StackConfig(run_dir=run_dir, pool_pages=a.pool_pages, esm_copy=a.esm_copy,
                       abort_return=a.abort_return, on_esm_failure=a.on_esm_failure, **kw)


def _counts(text: str) -> str:
    """--scaling: positive integers separated by commas (kept as the text the bench parses)."""
    if text and not all(part.isdecimal() and int(part) > 0 for part in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r} is not positive integers separated by commas (e.g. 1,4,16)")
    return text


def _mem_bytes(mib: float) -> int:
    mem = int(mib * (1 << 20))
    if mem <= 0 or mem % PAGE_SIZE:
        raise SystemExit("--mem-mib must be a positive multiple of 64 KiB (0.0625 MiB)")
    return mem


def cmd_demo(a) -> int:
    from pefsim.ops import demo
    from pefsim.ops.stack import LocalStack, StackError

    mem = _mem_bytes(a.mem_mib)
    if a.timeline and a.compose:
        print("pefsim demo: --timeline draws a local stack's histories; a compose stack keeps them in its "
              "containers", file=sys.stderr)
        return 2
    if a.compose:
        from pefsim.chaos.docker_backend import DockerBackend

        backend = DockerBackend(project=a.compose_project)
        backend.start()
        try:
            summary = asyncio.run(demo.run_demo(backend, mem))
        finally:
            backend.stop()  # the demo's own guest containers
    elif a.stack:
        stack = LocalStack.attach(Path(a.stack))
        try:
            summary = asyncio.run(demo.run_demo(stack, mem))
        finally:
            stack.stop()  # only the demo's own guests
    else:
        try:
            with LocalStack(_stack_config(a)) as stack:
                summary = asyncio.run(demo.run_demo(stack, mem))
        except StackError as exc:
            print(f"pefsim demo: the stack did not start: {exc}", file=sys.stderr)
            _done_with(a, failed=True)
            return 2
        except BaseException:
            _done_with(a, failed=True)
            raise
    print(demo.public(summary) if a.json else demo.render(summary))
    if a.timeline:  # (a local stack: refused above for --compose)
        print(f"timeline: {demo.write_timeline(stack, summary, a.timeline)} (open it in a browser)", file=sys.stderr)
    _done_with(a, failed=not demo.succeeded(summary))
    return 0 if demo.succeeded(summary) else 1


def cmd_up(a) -> int:
    from pefsim.ops import observability
    from pefsim.ops.stack import LocalStack, free_port

    if a.prometheus and observability.prometheus_binary() is None:
        print(f"pefsim up --prometheus: {observability.INSTALL_HINT}", file=sys.stderr)
        return 2
    stack = LocalStack(_stack_config(a, uv_port=a.uv_port, hv_port=a.hv_port, supervised=a.supervise))
    prom, failed = None, True
    try:
        stack.start()
        if a.prometheus:
            config = observability.write_config(stack.run_dir / "prometheus.yml", [stack.target_dir])
            storage = stack.run_dir / "prometheus-data"
            prom = observability.Prometheus(config, storage, a.prometheus_port or free_port(),
                                            stack.run_dir / "logs" / "prometheus.log")
            prom.wait_ready()
        from pefsim.blob import make_blob
        from pefsim.image import GuestImage

        mem = _mem_bytes(a.mem_mib)
        for i in range(a.guests):
            name = f"guest{i}"
            blob = make_blob(GuestImage.of_size(name, mem), stack.signing_key())
            stack.add_guest(name, mem, blob, boot=True)
        info = json.loads((stack.run_dir / "stack.json").read_text())
        print(f"pefsim stack up (run dir {stack.run_dir})")
        print(f"  ultravisor  {stack.uv_addr}   metrics http://{info['metrics'].get('uv', '-')}/metrics")
        print(f"  hypervisor  {stack.hv_addr}   metrics http://{info['metrics'].get('hv', '-')}/metrics")
        for name, addr in info["guests"].items():
            print(f"  {name:<11} {addr}")
        print(f"  stack file  {stack.run_dir / 'stack.json'}   (pefsim demo --stack / status --stack)")
        if stack.tls("operator") is not None:  # every service serves gRPC reflection
            t = stack.tls_dir
            print(f"  grpcurl     grpcurl -cacert {t}/ca.pem -cert {t}/operator.pem -key {t}/operator.key "
                  f"{stack.uv_addr} list")
        if prom is not None:
            print(f"  prometheus  {prom.url}   (config {stack.run_dir / 'prometheus.yml'}; rules and "
                  f"dashboards in deploy/)")
        if a.supervise:
            print(f"  supervised  a UV or HV that dies is restarted (try: pefsim kill hv --stack "
                  f"{stack.run_dir / 'stack.json'})")
        print("Ctrl-C stops everything.", flush=True)
        stop = False
        restarts: list[float] = []  # when the supervisor restarted a service (a crash loop gives up)

        def _stop(*_):
            nonlocal stop
            stop = True

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stop)
        while not stop:
            dead = [n for n, p in stack.procs.items() if not p.alive]
            if dead and a.supervise:
                dead = _supervise(stack, dead, restarts)
            if dead:
                print(f"stopped: {', '.join(dead)} exited; see {stack.run_dir / 'logs'}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        failed = False
    finally:
        if prom is not None:
            prom.stop()
        codes = stack.stop()
        print("stopped: " + ", ".join(f"{n} ({c})" for n, c in codes.items()), flush=True)
        _done_with(a, failed=failed)
    return 0


def _ours(pid: int) -> bool:
    """Whether ``pid`` is still a pefsim process (a service or the command that launched it), not
    a process that reused the number since stack.json was written."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(part.startswith((b"services.", b"pefsim")) or part.endswith(b"/pefsim") for part in cmdline)


RESTARTS_PER_MINUTE = 5  # more is a crash loop: the supervisor gives up, as compose's restart policy backs off


def _supervise(stack, dead: list[str], restarts: list[float]) -> list[str]:
    """Restart a UV or HV that died, as compose's restart policy does (the HV recovers from its data
    directory, a UV comes back as a new machine); returns what it will not restart. A guest is not
    restarted: its process is its VM (it is reported once and forgotten)."""
    for name in dead:
        proc = stack.procs[name]
        code = proc.popen.returncode
        if name.startswith("guest-"):
            print(f"{name} exited ({code}): its VM ends with it; not restarted", file=sys.stderr, flush=True)
            del stack.procs[name]
            stack.write_stack_file()
            continue
        now = time.monotonic()
        restarts[:] = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > RESTARTS_PER_MINUTE:
            print(f"{name} exited ({code}) again: more than {RESTARTS_PER_MINUTE} restarts in a minute, giving up",
                  file=sys.stderr, flush=True)
            return [name]
        print(f"{name} exited ({code}); restarting it (log {proc.log_path})", file=sys.stderr, flush=True)
        proc.start()
        proc.wait_ready()
        stack.write_stack_file()
        print(f"{name} is back (pid {proc.popen.pid}); see pefsim status --stack {stack.run_dir / 'stack.json'}",
              file=sys.stderr, flush=True)
    return []


SIGNALS = {"kill": signal.SIGKILL, "pause": signal.SIGSTOP, "resume": signal.SIGCONT}


def _stack_pids(a) -> tuple[dict[str, int], int] | None:
    """The service pids and the launcher's pid (0: none recorded) in ``a.stack``; None, said in one
    line, for a stack file that cannot be read."""
    try:
        info = json.loads(Path(a.stack).read_text())
        return {str(name): int(pid) for name, pid in info["pids"].items()}, int(info.get("launcher") or 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"pefsim {a.cmd}: cannot read the stack file {a.stack}: {exc}", file=sys.stderr)
        return None


def cmd_signal(a) -> int:
    """kill / pause / resume one service of a running stack, by the pid its stack.json records."""
    path, read = Path(a.stack), _stack_pids(a)
    if read is None:
        return 3
    pids = read[0]
    name = a.service if a.service in pids else f"guest-{a.service}"
    if name not in pids or not _ours(pids[name]):
        print(f"pefsim {a.cmd}: no running {a.service!r} in {path} (there are: "
              f"{', '.join(n.removeprefix('guest-') for n in pids)})", file=sys.stderr)
        return 3
    os.kill(pids[name], SIGNALS[a.cmd])
    what = {"kill": "killed (SIGKILL)", "pause": "paused (SIGSTOP)", "resume": "resumed (SIGCONT)"}[a.cmd]
    print(f"{name} (pid {pids[name]}) {what}")
    if a.cmd == "kill" and name in ("uv", "hv"):
        print(f"  under `pefsim up --supervise` it comes back (the HV recovers from its data directory); "
              f"otherwise the stack stops. Watch: pefsim status --stack {path}; draw it: pefsim timeline {path.parent}")
    elif a.cmd == "pause":
        print(f"  its peers' calls now wait or time out; `pefsim resume {a.service} --stack {path}` lets it go on")
    return 0


def cmd_restart(a) -> int:
    """Restart the UV or the HV of a supervised stack: SIGTERM (it stops cleanly) and its launcher
    starts it again, as `docker compose restart` does; waits until the new process serves."""
    path, read = Path(a.stack), _stack_pids(a)
    if read is None:
        return 3
    pids, _ = read
    if a.service not in ("uv", "hv"):
        print(f"pefsim restart: {a.service!r}: only uv and hv restart (a guest's process is its VM: "
              f"`pefsim kill {a.service}` ends it, `pefsim guest add` starts another)", file=sys.stderr)
        return 2
    if not json.loads(path.read_text()).get("supervised"):
        print(f"pefsim restart: the stack of {path} is not supervised: nothing would start {a.service} again "
              f"(start it with `pefsim up --supervise`; `pefsim kill {a.service}` stops it)", file=sys.stderr)
        return 3
    old = pids.get(a.service, 0)
    if not old or not _ours(old):
        print(f"pefsim restart: no running {a.service} in {path}", file=sys.stderr)
        return 3
    os.kill(old, signal.SIGTERM)
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:  # the launcher rewrites stack.json once the new one serves
        read = _stack_pids(a)
        new = read[0].get(a.service, 0) if read else 0
        if new and new != old and _ours(new):
            print(f"{a.service} restarted: pid {old} stopped (SIGTERM), pid {new} serves"
                  + (" (it recovered its VMs from its data directory)" if a.service == "hv" else
                     " (a new machine: the HV fails the secure VMs it had)"))
            print(f"  see: pefsim status --stack {path}")
            return 0
        time.sleep(0.1)  # a bounded wait for the launcher
    print(f"pefsim restart: {a.service} did not come back within {a.timeout:g} s; see {path.parent / 'logs'}",
          file=sys.stderr)
    return 1


def _attach(a):
    from pefsim.ops.stack import LocalStack

    return LocalStack.attach(Path(a.stack))


async def _with_operator(stack, call):
    """``call(operator)`` (a coroutine function) against ``stack``; the operator's channels are
    closed after it."""
    from pefsim.ops.demo import Operator

    op = Operator.of(stack)
    try:
        return await call(op)
    finally:
        await op.close()


FAILPOINT_ACTIONS = {"kill": "the process SIGKILLs itself there: under `pefsim up --supervise` it comes back "
                             "(the HV recovers from its data directory), else the stack stops",
                     "stop": "the process SIGSTOPs itself there: `pefsim resume {svc} --stack {stack}` lets it go on",
                     "lose": "the answer that just arrived is dropped there, as if the network lost it"}


def cmd_failpoint(a) -> int:
    """Arm or disarm one failpoint in the running UV or HV of a stack (the point's prefix names the
    service) through its SetFailpoint RPC, as the operator."""
    from pefsim.abi import Errno
    from pefsim.faults import POINTS
    from pefsim.v1 import common_pb2

    svc = a.spec.split(".", 1)[0]
    if svc not in ("uv", "hv"):
        print(f"pefsim failpoint: {a.spec!r} is not a failpoint of a running UV or HV; theirs: "
              f"{', '.join(p for p in POINTS if p.startswith(('uv.', 'hv.')))}", file=sys.stderr)
        return 2
    req = common_pb2.SetFailpointRequest(spec=a.spec, clear=a.action == "clear")
    r = asyncio.run(_with_operator(_attach(a), lambda op: (op.uv if svc == "uv" else op.hv).stub.SetFailpoint(req)))
    if r.errno != Errno.OK:
        print(f"pefsim failpoint: the {svc.upper()} refused {a.spec!r}: {r.error}", file=sys.stderr)
        return 2
    print(f"{svc}: {'disarmed' if a.action == 'clear' else 'armed'} {a.spec}; armed now: {', '.join(r.armed) or 'none'}")
    if a.action == "set":
        action = a.spec.rpartition("=")[2] if "=" in a.spec else "kill"
        print("  " + FAILPOINT_ACTIONS[action].format(svc=svc, stack=a.stack))
        print(f"  its hits are counted from now; `pefsim failpoint clear {a.spec.split('=')[0]} --stack {a.stack}` disarms it")
    return 0


def cmd_guest(a) -> int:
    """Add a guest to a running stack (a deliberately bad blob with --tamper/--omit): boot it,
    print its outcome and, for an aborted ESM, the calls across the processes; then keep it
    until Ctrl-C (its process is its VM) or, with --report-only, remove it."""
    from pefsim.ops import demo
    from pefsim.v1 import guest_pb2

    mem, stack = _mem_bytes(a.mem_mib), _attach(a)
    blob = _blob(a.name, mem, stack.signing_key(), a.omit, a.tamper)

    async def boot(op):
        addr = await asyncio.to_thread(stack.add_guest, a.name, mem, blob)
        return (await op.guest(a.name, addr).Boot(guest_pb2.BootRequest())).report

    try:
        rep = asyncio.run(_with_operator(stack, boot))
        print(f"guest {a.name}: lpid {rep.lpid}, {rep.outcome}; UV_ESM -> {demo.esm_rc_name(rep.esm_rc, rep.outcome)}; "
              f"memory {'intact' if rep.memory_intact else 'DAMAGED'} ({rep.pages_checked} pages checked)")
        if rep.esm_failure:
            print(f"  the UV aborted its ESM: {rep.esm_failure}")
        if rep.outcome != "secure":
            print("  then " + ("ibm,os-term: its VMM stopped the VM; its memory stays with the HV" if rep.os_term
                               else "it runs on as a normal VM"))
            print("\n".join("  " + line for line in demo.sequence_lines(demo.abort_sequence(stack, rep.lpid))))
        log = stack.procs[f"guest-{a.name}"].log_path
        print(f"  log {log}; see pefsim status --stack {a.stack}; draw it: pefsim timeline {Path(a.stack).parent}")
        if not a.report_only:
            print(f"guest {a.name} stays until Ctrl-C (its process is its VM: then the HV destroys it)", flush=True)
            while stack.procs[f"guest-{a.name}"].alive:
                time.sleep(0.2)
            print(f"guest {a.name} exited; see {log}", file=sys.stderr)
        return 0 if rep.memory_intact else 1
    finally:
        stack.stop()


def cmd_down(a) -> int:
    """Stop the stack a stack.json describes: its launcher (`pefsim up`, `pefsim demo`) is asked to
    stop as Ctrl-C would (it stops every service it started); services left without a launcher
    (it was killed) get SIGTERM themselves; whatever still runs after --timeout gets SIGKILL.
    Exit 0 when nothing of the stack is left, 1 when something is, 3 for a stack file that cannot
    be read."""
    path, read = Path(a.stack), _stack_pids(a)
    if read is None:
        return 3
    pids, launcher = read
    running = {name: pid for name, pid in pids.items() if _ours(pid)}
    if launcher and _ours(launcher):
        running["launcher"] = launcher
        os.kill(launcher, signal.SIGTERM)
    else:
        for pid in running.values():
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + a.timeout
    while running and time.monotonic() < deadline:
        running = {name: pid for name, pid in running.items() if _ours(pid) and not _zombie(pid)}
        time.sleep(0.1)  # a bounded wait for the processes to end
    for name, pid in running.items():
        print(f"pefsim down: {name} (pid {pid}) still runs after {a.timeout:g} s: SIGKILL", file=sys.stderr)
        os.kill(pid, signal.SIGKILL)
    left = [name for name, pid in running.items() if _ours(pid) and not _zombie(pid)]
    print(f"pefsim down: {path.parent} stopped" + (f"; still running: {', '.join(left)}" if left else ""))
    return 1 if left else 0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def cmd_vm(a) -> int:
    """An operator's action on one VM of a running stack: destroy it (UV_SVM_TERMINATE if it was
    secure), reset it (KVM_PPC_SVM_OFF; its vCPUs stopped first, as QEMU does), or touch a page
    as the host (a secure page is paged out first: the host sees ciphertext)."""
    from pefsim.abi import Errno, GfnState, U, rc_name
    from pefsim.v1 import hypervisor_pb2 as hpb

    async def act(op) -> tuple[bool, str]:
        if a.action == "destroy":
            r = await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=a.lpid))
            term = f"; UV_SVM_TERMINATE -> {rc_name(r.terminate_rc, U)} in {r.terminate_latency_s * 1e3:.1f} ms" \
                if r.terminated else " (it was not secure: no UV_SVM_TERMINATE)"
            return r.errno == Errno.OK, f"DestroyVm lpid {a.lpid}: {Errno(r.errno).name}{term if r.errno == 0 else ''}"
        if a.action == "reset":
            await op.hv.stub.StopVm(hpb.StopVmRequest(lpid=a.lpid))
            r = await op.hv.stub.ResetVm(hpb.ResetVmRequest(lpid=a.lpid))
            return r.errno == Errno.OK, f"ResetVm (KVM_PPC_SVM_OFF) lpid {a.lpid}: {Errno(r.errno).name}"
        r = await op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=a.lpid, gpa=a.gpa))
        return r.errno == Errno.OK, (f"host read lpid {a.lpid} gpa 0x{a.gpa:x}: {Errno(r.errno).name}, the page "
                                     f"now {GfnState(r.state).name}, first bytes {r.data[:16].hex()}")
    ok, said = asyncio.run(_with_operator(_attach(a), act))
    print(said)
    print(f"  see: pefsim status --stack {a.stack}; draw it: pefsim timeline {Path(a.stack).parent}")
    return 0 if ok else 1


def cmd_status(a) -> int:
    from pefsim.v1 import hypervisor_pb2 as hpb, ultravisor_pb2 as upb

    async def fetch(op):
        return (await op.uv.stub.UvStatus(upb.UvStatusRequest()), await op.hv.stub.HvStatus(hpb.HvStatusRequest()))

    uv, hv = asyncio.run(_with_operator(_attach(a), fetch))
    if a.output == "json":
        print(json.dumps({"uv": plain(uv), "hv": plain(hv)}, indent=2))
        return 0
    print(f"ultravisor (boot {uv.boot_id}): pool {uv.pool_pages_in_use}/{uv.pool_pages_total} pages in use, "
          f"{uv.pool_pages_reserved} reserved; {len(uv.terminated_lpids)} SVMs terminated")
    print(f"  {'lpid':>5} {'state':<11} {'secure':>6} {'paged-out':>9} {'shared':>6} {'abort pending':>13}  asking")
    for s in uv.svms:
        asking = f"{s.unanswered_hcall} for {s.unanswered_s:.1f} s" if s.unanswered_hcall else "-"
        print(f"  {s.lpid:>5} {s.state:<11} {s.secure_pages:>6} {s.pagedout_pages:>9} {s.shared_pages:>6} "
              f"{(f'{s.abort_pending_s:.1f} s' if s.abort_pending_s else '-'):>13}  {asking}")
    print(f"hypervisor (boot {hv.boot_id}): {len(hv.vms)} VMs, {hv.vms_recovered} recovered at start")
    print(f"  {'lpid':>5} {'name':<16} {'state':<13} {'pages':>6} {'running':<7} {'session':<7} notes")
    for v in hv.vms:
        notes = ", ".join(filter(None, ["aborting" if v.aborting else "", f"failed: {v.failed}" if v.failed else ""]))
        print(f"  {v.lpid:>5} {v.name[:16]:<16} {v.state:<13} {v.npages:>6} {str(v.running).lower():<7} "
              f"{str(v.session).lower():<7} {notes or '-'}")
    return 0


def plain(message) -> dict:
    """A message as JSON-able data with every field (zero ones too), protobuf's field names, and
    64-bit integers as numbers (protobuf's JSON mapping drops zeros and quotes int64s)."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = {k: plain(v) if hasattr(v, "DESCRIPTOR") else v for k, v in value.items()}
        elif field.is_repeated:
            value = [plain(v) if hasattr(v, "DESCRIPTOR") else v for v in value]
        elif field.message_type is not None:
            value = plain(value)
        elif field.enum_type is not None:
            value = field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
        elif isinstance(value, bytes):
            value = value.hex()
        out[field.name] = value
    return out


def cmd_chaos(a) -> int:
    from pefsim.chaos.backend import LocalBackend
    from pefsim.chaos.generator import FAULTS, ChaosConfig, default_results
    from pefsim.chaos.runner import run_chaos

    if a.during is None:  # the first moment the fault has (kill-guest has only esm)
        a.during = FAULTS[a.fault][0]
    if a.during not in FAULTS[a.fault]:
        raise SystemExit(f"--fault {a.fault} runs --during {' or '.join(FAULTS[a.fault])}")
    if a.runs < 1:
        raise SystemExit("--runs must be at least 1")
    if not 0 <= a.only_run <= a.runs:
        raise SystemExit(f"--only-run must be one of the {a.runs} runs")
    cfg = ChaosConfig(fault=a.fault, during=a.during, runs=a.runs, seed=a.seed, only_run=a.only_run,
                      mem_bytes=_mem_bytes(a.mem_mib), pause_s=a.pause, fault_s=a.fault_time,
                      final_bound_s=a.final_bound, results=a.results or default_results(), backend=a.backend,
                      mutants=tuple(a.mutant), abort_return=a.abort_return, progress=True,
                      metrics_listen=a.metrics_listen, timeline=a.timeline)
    run_dir = _temp_run_dir(a, "pefsim-chaos-")
    if a.backend == "docker":
        from pefsim.chaos.docker_backend import DockerBackend

        backend = DockerBackend(a.compose_file, project=a.compose_project)
    else:
        backend = LocalBackend(run_dir, proxies=a.fault.startswith("net-"), mutants=tuple(a.mutant),
                               abort_return=a.abort_return, pool_pages=a.pool_pages,
                               on_esm_failure=a.on_esm_failure)
    try:
        summary = run_chaos(cfg, backend, log=lambda s: print(s, file=sys.stderr if a.json else sys.stdout, flush=True))
    except BaseException:
        _done_with(a, failed=True)
        raise
    _done_with(a, failed=bool(summary["violations"]))
    if a.json:
        config = {"fault": a.fault, "during": a.during, "runs": a.runs, "seed": a.seed, "mem_mib": a.mem_mib,
                  "backend": a.backend, "abort_return": a.abort_return, "on_esm_failure": a.on_esm_failure,
                  "mutants": list(a.mutant)}
        print(json.dumps({**summary, "config": config}))
    else:
        print(f"guests ran with --on-esm-failure {summary['guest_policy'] or a.on_esm_failure}")
        print(f"{summary['runs']} runs, {summary['faults_injected']} faults injected, "
              f"{len(summary['violations'])} violations; recovery p50 {summary['recovery_s']['p50']} s, "
              f"p99 {summary['recovery_s']['p99']} s, max {summary['recovery_s']['max']} s")
        for v in summary["violations"]:
            print(f"  run {v['run']}: {v['invariant']}: {v['detail']}\n    replay: pefsim chaos --fault {a.fault} "
                  f"--during {a.during} --seed {a.seed} --runs {a.runs} --only-run {v['run']} --mem-mib {a.mem_mib:g}"
                  + "".join(f" --mutant {m}" for m in a.mutant))
        print(f"records: {summary['results']}")
    return 1 if summary["violations"] else 0


def _sim_results() -> Path:
    """Failing simulated runs go beside the chaos records (the user's state directory)."""
    from pefsim.chaos.generator import default_results

    return default_results().parent / "sim-failures"


def cmd_sim(a) -> int:
    """The deterministic simulator (pefsim/sim/): the real cores in one process on virtual time."""
    import logging

    from pefsim.sim.campaign import SimConfig, chaos_rate, run_campaign
    from pefsim.sim.scenario import DURINGS, FAULTS

    if a.runs < 1:
        raise SystemExit("--runs must be at least 1")
    if a.jobs < 1 or a.compare_chaos < 0:
        raise SystemExit("--jobs must be at least 1, --compare-chaos at least 0")
    if os.environ.get("PYTHONHASHSEED") != "0":  # str hashes (set orders) the same in every replay
        import subprocess

        return subprocess.call([sys.executable, "-m", "pefsim", *a.argv], env={**os.environ, "PYTHONHASHSEED": "0"})
    logging.disable(logging.CRITICAL if a.json else logging.ERROR)  # the services' own lines, thousands of runs

    def progress(done: int, total: int) -> None:
        if not a.json and (done == total or done % 100 == 0):
            print(f"  {done}/{total} runs", file=sys.stderr, flush=True)
    cfg = SimConfig(runs=a.runs, seed=a.seed, faults=tuple(a.fault) or FAULTS, durings=tuple(a.during) or DURINGS,
                    mutants=tuple(a.mutant), exhaustive=a.exhaustive, stop_at_first=a.stop_at_first,
                    progress=progress, schedule=a.schedule, jobs=a.jobs, results=a.results)
    summary = run_campaign(cfg, only=a.only)
    if a.compare_chaos:
        summary["chaos"] = chaos = chaos_rate(a.compare_chaos, a.seed)
        summary["speedup"] = round(summary["runs_per_minute"] / chaos["runs_per_minute"], 1)
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['runs']} runs ({summary['mode']}), {summary['faults_injected']} faults, "
              f"{len(summary['violations'])} violations in {summary['seconds']} s "
              f"({summary['runs_per_minute']} runs a minute; {summary['virtual_seconds']} s simulated); "
              f"history sha256 {summary['history_sha256'][:16]}")
        for v in summary["violations"][:20]:
            print(f"  seed {v['seed']} ({v['plan']}): {v['invariant']}: {v['detail']}\n    replay: {v['replay']}"
                  + (f"\n    record and histories: {v['history']}" if v.get("history") else ""))
        if a.compare_chaos:
            print(f"real processes ({chaos['command']}): {chaos['runs']} runs in {chaos['seconds']} s, "
                  f"{chaos['runs_per_minute']} runs a minute, {chaos['violations']} violations; "
                  f"the simulator is {summary['speedup']}x faster")
    return 1 if summary["violations"] or summary.get("chaos", {}).get("violations") else 0


def cmd_certs(a) -> int:
    from pefsim.tls import file_name, make_ca, make_cert

    out = Path(a.out)
    make_ca(out)
    for identity in a.identity or ["uv", "hv", "operator"]:
        make_cert(out, identity)
        print(out / f"{file_name(identity)}.pem")
    return 0


def cmd_keys(a) -> int:
    from pefsim.blob import new_signing_key, save_keypair

    existing = Path(a.out) / "esm-signing.key"
    if a.if_missing and existing.exists():
        print(f"{existing} exists: kept")
        return 0
    try:
        priv, pub = save_keypair(new_signing_key(), Path(a.out), force=a.force)
    except FileExistsError:  # a new key would invalidate every blob signed with this one
        raise SystemExit(f"{existing} exists: not replaced (--force replaces it, and every blob "
                         "signed with it stops verifying; --if-missing keeps it)") from None
    print(f"{priv}\n{pub}")
    return 0


def cmd_blob(a) -> int:
    from pefsim.blob import load_private_key

    mem = _mem_bytes(a.mem_mib)
    blob = _blob(a.name, mem, load_private_key(a.key), a.omit, a.tamper)
    Path(a.output).write_bytes(blob)
    print(f"{a.output}: {len(blob)} bytes for guest {a.name} ({mem // PAGE_SIZE} pages)")
    return 0


def _blob(name: str, mem: int, key, omit: list[str], tamper: list[str]) -> bytes:
    """The ESM blob of guest ``name``'s image, signed with ``key``; items in ``omit`` left out,
    those in ``tamper`` with a wrong digest (a deliberately bad blob: the UV aborts its ESM)."""
    from pefsim.blob import ITEMS, make_blob
    from pefsim.image import GuestImage

    for item in omit + tamper:
        if item not in ITEMS:
            raise SystemExit(f"unknown blob item {item!r}; items: {', '.join(ITEMS)}")
    return make_blob(GuestImage.of_size(name, mem), key, omit=tuple(omit),
                     override={item: "0" * 128 for item in tamper})


EXAMPLES = {  # each command's `--help` ends with one (what a newcomer types first)
    "demo": "pefsim demo            # four guests: secure, aborted (bad blob), terminated, reset",
    "up": "pefsim up --supervise --run-dir rd     # then: pefsim status --stack rd/stack.json",
    "vm": "pefsim vm touch 1 --gpa 0x10000 --stack rd/stack.json   # the host sees ciphertext",
    "kill": "pefsim kill hv --stack rd/stack.json    # under --supervise it comes back",
    "pause": "pefsim pause uv --stack rd/stack.json   # the HV's ucalls wait; pefsim resume uv lets it go",
    "resume": "pefsim resume uv --stack rd/stack.json",
    "restart": "pefsim restart hv --stack rd/stack.json",
    "guest": "pefsim guest add g-bad --tamper kernel --report-only --stack rd/stack.json",
    "down": "pefsim down --stack rd/stack.json",
    "status": "pefsim status --stack rd/stack.json -o json",
    "chaos": "pefsim chaos --fault kill-hv --during abort --runs 20 --seed 1",
    "sim": "pefsim sim --runs 2000 --jobs 2      # or: pefsim sim --exhaustive",
    "bench": "pefsim bench --guest-mib 256 --scaling 1,4,16 --json",
    "certs": "pefsim certs --out tls --identity uv --identity hv --identity guest:g1",
    "keys": "pefsim keys --out keys --if-missing",
    "timeline": "pefsim timeline ~/.local/state/pefsim/chaos-results/RUN -o run.html   # then open it",
    "blob": "pefsim blob --name g1 --mem-mib 4 --key keys/esm-signing.key -o g1.blob --tamper kernel",
}


class _HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default (unless its text already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _explain(sub) -> None:
    """Every command's --help: a description (its one-line help when it has no longer one), the
    defaults, and an example."""
    helps = {action.dest: action.help for action in sub._choices_actions}
    for name, p in sub.choices.items():
        p.formatter_class = _HelpWithDefaults
        p.description = p.description or helps.get(name)
        if name in EXAMPLES and not p.epilog:
            p.epilog = f"example:\n  {EXAMPLES[name]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pefsim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"pefsim {pefsim.version()}")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="run the life-cycle demo")
    _stack_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--mem-mib", type=float, default=4.0, help="memory per guest (default 4 MiB)")
    p.add_argument("--stack", help="stack.json of a running `pefsim up` (default: start one)")
    p.add_argument("--compose", action="store_true",
                   help="run against the running docker-compose stack (guests as containers)")
    p.add_argument("--compose-project", default="pefsim", help="its compose project name")
    p.add_argument("--timeline", type=Path, metavar="FILE.html",
                   help="also draw the four guests' calls across the processes as a timeline page (a local stack)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("up", help="start a local stack until Ctrl-C")
    _stack_args(p)
    p.add_argument("--guests", type=int, default=2, help="secure guests to boot (default 2)")
    p.add_argument("--mem-mib", type=float, default=4.0, help="memory per guest (default 4 MiB)")
    p.add_argument("--uv-port", type=_port, default=0, help="UV port (default: a free one)")
    p.add_argument("--hv-port", type=_port, default=0, help="HV port (default: a free one)")
    p.add_argument("--prometheus", action="store_true",
                   help="also start a local Prometheus (Debian's package) scraping the stack")
    p.add_argument("--prometheus-port", type=int, default=0, help="its port (default: a free one)")
    p.add_argument("--supervise", action="store_true",
                   help="restart a UV or HV that dies, as compose's restart policy does (to watch recovery by hand)")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("vm", help="destroy, reset or touch (as the host) one VM of a running stack")
    p.add_argument("action", choices=["destroy", "reset", "touch"])
    p.add_argument("lpid", type=int)
    p.add_argument("--gpa", type=lambda t: int(t, 0), default=0, help="touch: the guest physical address (default 0)")
    p.add_argument("--stack", required=True, help="stack.json of a running stack")
    p.set_defaults(func=cmd_vm)
    for verb, what in (("kill", "SIGKILL"), ("pause", "SIGSTOP"), ("resume", "SIGCONT")):
        p = sub.add_parser(verb, help=f"{what} one service of a running stack (uv, hv or a guest's name)")
        p.add_argument("service", help="uv, hv, or a guest's name")
        p.add_argument("--stack", required=True, help="stack.json of a running stack")
        p.set_defaults(func=cmd_signal)
    p = sub.add_parser("restart", help="restart the UV or the HV of a supervised stack (`pefsim up --supervise`)")
    p.add_argument("service", help="uv or hv")
    p.add_argument("--stack", required=True, help="stack.json of a running stack")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it to serve again (default 30)")
    p.set_defaults(func=cmd_restart)
    from pefsim.faults import POINTS

    p = sub.add_parser("failpoint", help="arm or disarm a failpoint in the running UV or HV of a stack",
                       description="Arm (set) or disarm (clear) a failpoint in a running UV or HV, through its "
                                   "SetFailpoint RPC as the operator. Points: " + "; ".join(
                                       f"{n}: {w}" for n, w in POINTS.items() if n.startswith(("uv.", "hv."))),
                       epilog="example:\n  pefsim failpoint set hv.abort.page_out:3@g-bad --stack rd/stack.json\n"
                              "  (the HV kills itself at the 3rd page it gets back while aborting g-bad)")
    p.add_argument("action", choices=["set", "clear"])
    p.add_argument("spec", metavar="NAME[:N][@VM][=kill|stop|lose]",
                   help="the point (its prefix names the service), the hit that fires it (default 1), only for "
                        "the VM named VM, and what it does (default kill)")
    p.add_argument("--stack", required=True, help="stack.json of a running stack")
    p.set_defaults(func=cmd_failpoint)
    p = sub.add_parser("guest", help="add a guest to a running stack (a bad blob with --tamper: watch its abort)")
    p.add_argument("action", choices=["add"])
    p.add_argument("name", help="the guest's name (its VM's name in the HV, the @VM of a failpoint)")
    p.add_argument("--stack", required=True, help="stack.json of a running stack")
    p.add_argument("--mem-mib", type=float, default=4.0, help="its memory (default 4 MiB)")
    p.add_argument("--tamper", action="append", default=[], metavar="ITEM",
                   help="give ITEM (kernel, initrd, ...: see pefsim blob) a wrong digest in its ESM blob: the UV "
                        "aborts its ESM (repeatable)")
    p.add_argument("--omit", action="append", default=[], metavar="ITEM", help="leave ITEM out of its blob")
    p.add_argument("--report-only", action="store_true",
                   help="print its boot report and remove it (default: keep it until Ctrl-C)")
    p.set_defaults(func=cmd_guest)
    p = sub.add_parser("down", help="stop the stack a stack.json describes (its launcher first)")
    p.add_argument("--stack", required=True, help="stack.json of a running stack")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds before what still runs gets SIGKILL")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="show what the UV and the HV hold")
    p.add_argument("--stack", required=True, help="stack.json of a running stack")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table",
                   help="a table (default), or JSON with every field and integers as numbers")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("chaos", help="seeded fault scenarios with checked invariants")
    from pefsim.chaos.generator import FAULTS
    from pefsim.faults import MUTANTS

    from pefsim.chaos.generator import WHAT

    p.description = "seeded fault scenarios through real processes, with checked invariants\n\nfault kinds " \
        "(and the --during moments each allows):\n" + "\n".join(
            f"  {k:<14} {WHAT[k]} ({'|'.join(FAULTS[k])})" for k in sorted(FAULTS))
    p.add_argument("--fault", required=True, choices=sorted(FAULTS), metavar="KIND",
                   help="the fault kind (above): " + ", ".join(sorted(FAULTS)))
    p.add_argument("--during", default=None, choices=["abort", "esm", "secure"],
                   help="when the fault hits the victim guest (default: the first the fault allows: abort, or esm for kill-guest)")
    p.add_argument("--runs", type=int, default=1, help="runs in the campaign")
    p.add_argument("--seed", type=int, default=1, help="the campaign's seed (run i draws its plan from it)")
    p.add_argument("--mem-mib", type=float, default=64.0, help="victim guest memory (default 64 MiB)")
    p.add_argument("--pause", type=float, default=2.0, help="pause-hv: seconds the HV stays stopped")
    p.add_argument("--fault-time", type=float, default=2.0, help="net-*: seconds the fault lasts")
    p.add_argument("--final-bound", type=float, default=90.0,
                   help="seconds after the heal within which every SVM must be final")
    p.add_argument("--results", type=Path, default=None,
                   help="where each run's record, verdicts and history go (default "
                        "$XDG_STATE_HOME/pefsim/chaos-results, else ~/.local/state/pefsim/chaos-results)")
    p.add_argument("--backend", choices=["local", "docker"], default="local",
                   help="services as local processes, or the docker-compose stack's containers")
    p.add_argument("--compose-file", type=Path, default=Path("docker-compose.yml"), help="with --backend docker")
    p.add_argument("--compose-project", default="pefsim", help="with --backend docker")
    p.add_argument("--mutant", action="append", default=[], choices=sorted(MUTANTS),
                   help="run a deliberately broken build (to see a checker catch it)")
    p.add_argument("--run-dir", type=Path, help="the local stack's directory (default: temporary)")
    p.add_argument("--pool-pages", type=int, default=8192, help="UV secure memory in 64 KiB pages")
    p.add_argument("--abort-return", choices=["guest", "uv"], default="guest")
    _guest_policy_arg(p)
    p.add_argument("--only-run", type=int, default=0, metavar="N",
                   help="run only run N of the campaign, with the plan it has in the whole one (a replay)")
    p.add_argument("--metrics-listen", help="serve the harness's metrics (faults, runs) on host:port")
    from pefsim.timeline import cli as timeline_cli
    p.add_argument("--timeline", choices=timeline_cli.MODES, default="failed",
                   help="which runs get a timeline.html beside their record (default: failed; all: every run)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_chaos)
    p = sub.add_parser("sim", help="the real cores in one process on virtual time: thousands of seeded "
                                   "fault schedules a minute, judged by the chaos checkers")
    from pefsim.sim.scenario import DURINGS as SIM_DURINGS, FAULTS as SIM_FAULTS

    p.add_argument("--fault", action="append", default=[], choices=SIM_FAULTS,
                   help="fault kinds to draw from (repeatable; default: all)")
    p.add_argument("--during", action="append", default=[], choices=SIM_DURINGS,
                   help="moments to draw from (repeatable; default: both)")
    p.add_argument("--runs", type=int, default=100, help="sampled runs (run i has seed SEED+i)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--exhaustive", action="store_true",
                   help="every single HV crash point, lost answer and cut of the small configuration, once each")
    p.add_argument("--only", type=int, help="with --exhaustive: only the plan with this number (a replay)")
    p.add_argument("--mutant", action="append", default=[], choices=sorted(MUTANTS),
                   help="run a deliberately broken build (to see a checker catch it)")
    p.add_argument("--stop-at-first", action="store_true", help="stop at the first run with a violation")
    p.add_argument("--schedule", choices=("seeded", "fifo"), default="seeded",
                   help="the order of work ready at once: drawn from each run's seed (default) or first come first served")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (the summary is the same for any number)")
    p.add_argument("--results", type=Path, default=_sim_results(),
                   help="where a failing run's record and call histories are written (default: %(default)s)")
    p.add_argument("--compare-chaos", type=int, default=0, metavar="N",
                   help="also run N real-process chaos runs of the same kind and print both rates")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_sim)
    timeline_cli.register(sub)
    p = sub.add_parser("bench", help="page transfer against memcpy and raw TCP, in one run")
    p.add_argument("--guest-mib", type=float, default=1024, help="guest size (default 1 GiB)")
    p.add_argument("--unary-mib", type=float, default=64,
                   help="guest size for the one-call-a-page run (default 64 MiB: it is slow)")
    p.add_argument("--hcalls", type=int, default=2000, help="hcalls timed for the latency (default 2000)")
    p.add_argument("--scaling", default="", metavar="N,N,...", type=_counts,
                   help="also N guests aborting at once, e.g. 1,4,16,64")
    p.add_argument("--scale-guest-mib", type=float, default=16, help="guest size in the scaling runs")
    p.add_argument("--channel-options", type=int, default=0, metavar="ROUNDS",
                   help="also the stream under each gRPC channel-option variant, ROUNDS paired rounds")
    p.add_argument("--options-guest-mib", type=float, default=256, help="guest size in the channel-option runs")
    p.add_argument("--sizes", default="", metavar="MIB,MIB,...", type=_counts,
                   help="also each of these guest sizes in MiB, e.g. 256,1024,4096,8192 "
                        "(the JSON's sizes array; default: none)")
    p.add_argument("--data-dir", metavar="DIR", default="",
                   help="where the bench's stacks keep their data, the HV's guest RAM files included "
                        "(default: the temp directory, $TMPDIR; /dev/shm puts guest RAM on tmpfs)")
    p.add_argument("--plot", metavar="DIR", default="",
                   help="draw the result as SVG and PNG into DIR "
                        "(default: none; needs matplotlib: pip install 'pefsim[plots]')")
    p.add_argument("--from", dest="from_json", metavar="RESULT.json", default="",
                   help="with --plot: draw a result saved with --json again, measuring nothing (default: measure)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=lambda a: __import__("pefsim.ops.bench", fromlist=["main"]).main(a))
    p = sub.add_parser("certs", help="a project CA and mTLS certificates (kept if already there)")
    p.add_argument("--out", required=True, help="directory for ca.pem/ca.key and <identity>.pem/.key")
    p.add_argument("--identity", action="append",
                   help="uv, hv, operator or guest:<name> (repeatable; default uv, hv, operator)")
    p.set_defaults(func=cmd_certs)
    p = sub.add_parser("keys", help="make an Ed25519 key pair for ESM blobs")
    p.add_argument("--out", required=True, help="directory for esm-signing.key / .pub")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--if-missing", action="store_true", help="keep a key pair that is already there")
    g.add_argument("--force", action="store_true",
                   help="replace a key pair that is already there (blobs signed with it stop verifying)")
    p.set_defaults(func=cmd_keys)
    p = sub.add_parser("blob", help="make an ESM blob for a guest image")
    p.add_argument("--name", required=True, help="guest name (seeds the image content)")
    p.add_argument("--mem-mib", type=float, default=4.0)
    p.add_argument("--key", required=True, type=Path, help="Ed25519 private key (PEM)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--omit", action="append", default=[], help="leave an item out (tests)")
    p.add_argument("--tamper", action="append", default=[], help="wrong digest for an item (tests)")
    p.set_defaults(func=cmd_blob)
    _explain(sub)
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(a, "uv_port", 0) and a.uv_port == getattr(a, "hv_port", 0):
        ap.error(f"--uv-port and --hv-port are both {a.uv_port}: give each service its own")
    from pefsim.ops.stack import StackTlsMissing

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    try:
        return a.func(a)
    except StackTlsMissing as exc:  # its message says what is missing and what to do: no traceback
        print(f"pefsim {a.cmd}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"pefsim {a.cmd}: interrupted{f' ({exc})' if str(exc) else ''}; every service it started is stopped",
              file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:  # the one error layer: a line that says what is wrong, and the exit code
        if a.debug:
            raise
        code, why = _what_went_wrong(exc)
        print(f"pefsim {a.cmd}: {why} (--debug shows the traceback)", file=sys.stderr)
        return code


EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_ENVIRONMENT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _what_went_wrong(exc: Exception) -> tuple[int, str]:
    """An exception that reached the CLI as (exit code, one line): the environment (a file, a
    port, a stack, a tool: 3), a value the command cannot use (2), or a bug in pefsim (1, named as
    one)."""
    from pefsim.ops.stack import StackError

    if isinstance(exc, FileNotFoundError):
        return EXIT_ENVIRONMENT, f"{exc.filename or exc}: no such file or directory"
    if isinstance(exc, PermissionError):
        return EXIT_ENVIRONMENT, f"{exc.filename or exc}: permission denied"
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return EXIT_ENVIRONMENT, f"{exc.filename or exc}: {exc.strerror}"
    if isinstance(exc, OSError):
        return EXIT_ENVIRONMENT, f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    if isinstance(exc, StackError):
        return EXIT_ENVIRONMENT, str(exc).splitlines()[0]
    if isinstance(exc, ValueError):
        return EXIT_USAGE, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return EXIT_CHECK_FAILED, f"internal error: {type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
