"""The in-process adapter: a UV core, an HV core and guests' vCPUs wired through their ports in one
event loop, with no sockets (TF-RMM's fake host is the model). The cores are the same code the
services run; only the transport differs:

* every call goes through the callee's call table (``CallTable.run`` / ``stream`` / ``bidi``: the
  same caller, owner, argument and state checks, handler, metrics and history as over gRPC), as
  the identity the gRPC adapter would present (``uv``/``hv`` acting for a guest, ``guest:<name>``);
* every message is copied through its wire encoding (protobuf, or the data plane's raw frames),
  so no side ever holds the other's objects;
* each call runs as a task owned by the service that serves it, as a server's handler would: a
  caller that gives up (its deadline) does not stop the callee, and a crash of the callee ends
  the call for its caller as a transport failure (UNAVAILABLE).

Faults are ports that fail on cue: a :class:`Link` can be cut (every call fails before the callee
acts) or told to lose the answer of a call after the callee acted; a failpoint armed with
``=crash`` (pefsim.faults) crashes the HV core where it is reached. ``Machine.crash_hv`` is a
``kill -9``: every task of the HV core is cancelled and its object dropped. What a restarted HV
(``Machine.restart_hv``) finds on disk is kept by :class:`Disk`, with a kill's semantics: exactly
what the data directory held at the crash's instant, nothing the dead core's unwinding tasks did
after it (a real kill runs no ``finally``). (A power cut, which also loses what the page cache
held, is not modelled here: docs/recovery.md.)

``Machine.reset_uv`` is a machine reset as the UV sees it (a new UV core, a new boot id).

Guests: ``Machine.add_guest`` runs a guest core (the boot program the guest process runs) whose
ports are :class:`LocalCalls`; the HV reaches its vCPU through the guest's own call table. A test
may also drive a VM itself, the HV then reaching a :class:`LocalVcpu` that holds the guest's
resume semantics (one resume per abort token; a repeat acknowledged as a duplicate).
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pefsim import faults
from pefsim.abi import H, Role
from pefsim.calltable import Caller
from pefsim.dataplane import decoder
from pefsim.v1 import guest_pb2, hypervisor_pb2 as hpb, ultravisor_pb2 as upb
from pefsim.calltable import CallTable, Denied, NoResult, message_classes
from pefsim.history import History
from pefsim.transport import Unreachable
from services.guest import calltable as guest_calltable
from services.guest.core.metrics import GuestMetrics
from services.guest.core.program import GuestConfig, GuestProgram
from services.hypervisor.core.hypervisor import HvConfig, Hypervisor
from services.hypervisor.ports import UvUnreachable, VcpuUnreachable
from services.ultravisor.core.ultravisor import Ultravisor, UvConfig
from services.ultravisor.ports import HvUnreachable


log = logging.getLogger("pefsim.local")


def _methods(pb2, service: str) -> dict[str, tuple[Any, Any]]:
    """RPC name -> (request class, response class) of a service."""
    desc = pb2.DESCRIPTOR.services_by_name[service]
    return {m.name: message_classes(m) for m in desc.methods}


UV_METHODS = _methods(upb, "UltravisorService")
HV_METHODS = _methods(hpb, "HypervisorService")
GUEST_METHODS = _methods(guest_pb2, "GuestService")


def _copy(message):
    """A message as the other side would parse it off the wire."""
    return type(message).FromString(message.SerializeToString())


class Lost(Exception):
    """The link lost a call's answer after the callee acted (Link.lose)."""


@dataclass
class Link:
    """One direction of a link between two services, failing on cue.

    ``cut``: every call fails before the callee sees it (a partition, a dead peer). ``lose``: a
    predicate on (call name, n-th call of that name on this link): true loses that call's answer
    after the callee acted (the caller sees a transport failure). ``crash``: a predicate on (call
    name, n-th answer or stream item of that name arriving): true crashes the caller right as it
    arrives, before it acts on it (a kill between two frames of a bulk stream)."""

    cut: bool = False
    lose: Callable[[str, int], bool] | None = None
    # (call name, n-th answer or stream item of that name) -> crash the caller as it arrives
    crash: Callable[[str, int], bool] | None = None
    # (call name, n-th call of that name) -> called as the call is about to go (it may cut the link)
    on_call: Callable[[str, int], None] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    arrived: dict[str, int] = field(default_factory=dict)
    # the guests (a call's on_behalf) whose calls the callee never answers, alive as it is for every
    # other guest: each such call waits out its caller's deadline (DEADLINE_EXCEEDED)
    ignore: set[str] = field(default_factory=set)
    ignored_in_flight: int = 0  # such calls waiting now

    async def ignored(self, on_behalf: str, timeout: float) -> None:
        """A call on behalf of an ignored guest: no answer before the caller's deadline."""
        if on_behalf in self.ignore:
            self.ignored_in_flight += 1
            try:
                await asyncio.sleep(timeout)
            finally:
                self.ignored_in_flight -= 1
            raise TimeoutError

    def before(self, name: str) -> bool:
        """Whether the call may go through; counts it. False: it never reached the callee."""
        if self.cut:
            return False
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.on_call is not None:
            self.on_call(name, self.counts[name])
        return not self.cut

    def reset(self) -> None:
        """Forget what went through (the counts a plan's n-th call is counted from) and heal."""
        self.cut, self.lose, self.crash, self.on_call = False, None, None, None
        self.counts.clear()
        self.arrived.clear()
        self.ignore.clear()

    def loses(self, name: str) -> bool:
        return self.lose is not None and self.lose(name, self.counts.get(name, 0))

    def crashes(self, name: str) -> bool:
        """An answer (or a stream's item) of ``name`` arrives: whether the caller crashes now."""
        self.arrived[name] = n = self.arrived.get(name, 0) + 1
        return self.crash is not None and self.crash(name, n)


CURRENT: contextvars.ContextVar["Service | None"] = contextvars.ContextVar("pefsim_local_service", default=None)


def _owning_task_factory(loop, coro, **kw):
    """Every task belongs to the service whose task (or call) created it (CURRENT), as a thread
    of its process would: so a crash cancels an abort task the HV started from a handler too."""
    task = asyncio.Task(coro, loop=loop, **kw)
    service = (kw.get("context") or contextvars.copy_context()).get(CURRENT)
    if service is not None:
        service.adopt(task)
    return task


class Service:
    """The tasks one service core runs calls and background work in (a process's worth): what a
    crash cancels."""

    def __init__(self, name: str, latency: Callable[[], float] | None = None):
        self.name = name
        # each message to and from this service waits this long first (None: no wait): a seeded
        # draw makes the simulator try other interleavings of the services, as a network would
        self.latency = latency
        # in creation order (a dict, not a set: a set's order is the tasks' addresses, and a
        # crash cancelling them in that order would make a simulated run unrepeatable)
        self.tasks: dict[asyncio.Task, None] = {}
        self.alive = True

    def adopt(self, task: asyncio.Task) -> None:
        self.tasks[task] = None
        task.add_done_callback(lambda t: self.tasks.pop(t, None))

    def run(self, fn, *args):
        """``fn(*args)`` as this service (tasks it creates are this service's)."""
        ctx = contextvars.copy_context()
        ctx.run(CURRENT.set, self)
        return ctx.run(fn, *args)

    def spawn(self, coro) -> asyncio.Task:
        if not self.alive:
            coro.close()
            raise ServiceCrashed(self.name)
        return self.run(asyncio.ensure_future, coro)

    async def serve(self, coro, timeout: float):
        """Run one call as this service's task; its result for the caller, who waits at most
        ``timeout`` (then TimeoutError) and whose own cancellation leaves the call running. A
        crash of this service while the call runs is ServiceCrashed."""
        try:
            if self.latency is not None:
                await asyncio.sleep(self.latency())  # the request on its way
            task = self.spawn(coro)
        except BaseException:
            coro.close()  # never sent (the caller gave up, or the service is down)
            raise
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            raise TimeoutError
        if self.latency is not None:
            await asyncio.sleep(self.latency())  # the answer on its way back
        return self.outcome(task)

    def outcome(self, task: asyncio.Task):
        if task.cancelled() or isinstance(task.exception(), faults.Crash):
            raise ServiceCrashed(self.name)
        return task.result()

    async def relay(self, items, timeout: float):
        """Run an async iterator (a streamed call) as this service's task, relaying its items to
        the caller as they come (so a window of frames in flight works as over gRPC)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump():
            async for item in items:
                queue.put_nowait(item)

        task = self.spawn(pump())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                if not done:
                    raise TimeoutError
                while not queue.empty():
                    yield queue.get_nowait()
                self.outcome(task)
                return
        finally:
            if not task.done():
                task.cancel()  # the caller stopped reading (a cancelled stream)

    def kill(self) -> None:
        self.alive = False
        for task in list(self.tasks):
            task.cancel()


class ServiceCrashed(Exception):
    """The service serving a call crashed (or was down) before answering."""


@contextlib.contextmanager
def transport(cls: type[Unreachable], name: str, link: Link | None = None):
    """A call through the in-process transport as its caller's port sees it: refused by a cut
    link before the callee acts; the callee's side ending without an answer (a deadline, a crash,
    a caller it is not for) as ``cls`` with the gRPC code the wire would give; an answer the link
    loses after the callee acted. The one translation every local port uses."""
    if link is not None and not link.before(name):
        raise cls(name, "UNAVAILABLE")
    try:
        yield
    except TimeoutError:
        raise cls(name, "DEADLINE_EXCEEDED") from None
    except ServiceCrashed:
        raise cls(name, "UNAVAILABLE") from None
    except Denied:
        raise cls(name, "PERMISSION_DENIED") from None
    except NoResult:
        raise cls(name, "FAILED_PRECONDITION") from None
    if link is not None and link.loses(name):
        raise cls(name, "UNAVAILABLE")


class LocalUv:
    """The HV core's UvPort onto a UV core in this process."""

    def __init__(self, machine: "Machine", on_boot):
        self.machine, self.on_boot = machine, on_boot

    def _caller(self, on_behalf: str) -> Caller:
        return Caller(Role.ROLE_HV, "hv", on_behalf)

    def _arrived(self, name: str) -> None:
        """An answer (or stream item) reaches the HV: it crashes here if the link says so."""
        if self.machine.hv_to_uv.crashes(name):
            self.machine.crash_hv(f"{name} answer {self.machine.hv_to_uv.arrived[name]}")
            raise faults.Crash(name)

    def _transport(self, name: str):
        return transport(UvUnreachable, name, self.machine.hv_to_uv)

    async def ucall(self, name: str, request, *, on_behalf: str, timeout: float):
        uv = self.machine.uv
        call, (_, resp_cls) = uv.table.calls[name], UV_METHODS[name]
        with self._transport(name):
            resp = await self.machine.uv_service.serve(
                uv.table.run(call, resp_cls, _copy(request), self._caller(on_behalf)), timeout)
        self._arrived(name)
        self.on_boot(uv.state.boot_id)
        return _copy(resp)

    async def page_in_stream(self, frames, *, on_behalf: str, timeout: float):
        uv = self.machine.uv
        call = uv.table.calls["UvPageInStream"]

        async def requests():
            async for frame in frames:
                yield call.request_codec(bytes(frame))

        with self._transport("UvPageInStream"):
            async for result in self.machine.uv_service.relay(
                    uv.table.bidi(call, requests(), self._caller(on_behalf)), timeout):
                self._arrived("UvPageInStream")
                yield upb.PageBatchResult.FromString(result.SerializeToString())
        self.on_boot(uv.state.boot_id)

    async def page_out_stream(self, request, *, on_behalf: str, timeout: float):
        uv = self.machine.uv
        call = uv.table.calls["UvPageOutStream"]
        encode = call.response_codec or (lambda m: m.SerializeToString())
        parse = decoder(upb.PageOutBatch)
        with self._transport("UvPageOutStream"):
            async for item in self.machine.uv_service.relay(
                    uv.table.stream(call, upb.PageOutBatch, _copy(request), self._caller(on_behalf)), timeout):
                self._arrived("UvPageOutStream")
                yield parse(bytes(encode(item)))
        self.on_boot(uv.state.boot_id)

    async def status(self):
        return await self.ucall("UvStatus", upb.UvStatusRequest(), on_behalf="", timeout=2)

    async def close(self) -> None:
        pass


class LocalHv:
    """The UV core's HvPort onto the HV core in this process (whichever incarnation is up)."""

    def __init__(self, machine: "Machine"):
        self.machine = machine

    async def hcall(self, name: str, request, *, on_behalf: str, timeout: float):
        hv = self.machine.hv
        if hv is None:  # between a crash and the restart
            raise HvUnreachable(name, "UNAVAILABLE")
        call, (_, resp_cls) = hv.table.calls[name], HV_METHODS[name]
        with transport(HvUnreachable, name, self.machine.uv_to_hv):
            await self.machine.uv_to_hv.ignored(on_behalf, timeout)
            resp = await self.machine.hv_service.serve(
                hv.table.run(call, resp_cls, _copy(request), Caller(Role.ROLE_UV, "uv", on_behalf)), timeout)
        return _copy(resp)

    async def close(self) -> None:
        pass


class LocalCalls:
    """A guest core's port (services/guest/ports.Calls) onto the HV or UV core of the machine,
    as guest:<name>: each call through the core's call table, as a task of that service."""

    def __init__(self, machine: "Machine", service: str, name: str):
        self.machine, self.service, self.caller = machine, service, Caller(Role.ROLE_GUEST, name)
        self.methods = HV_METHODS if service == "hv" else UV_METHODS

    def _target(self):
        m = self.machine
        return (m.hv, m.hv_service) if self.service == "hv" else (m.uv, m.uv_service)

    async def _up(self, name: str, wait: bool, timeout: float | None):
        core, service = self._target()
        if core is None and wait:  # wait_for_ready: until the service is back, within the timeout
            with transport(Unreachable, name):
                await asyncio.wait_for(self.machine.hv_up.wait(), timeout)
            core, service = self._target()
        if core is None:
            raise Unreachable(name, "UNAVAILABLE")
        return core, service

    def _link(self) -> Link:
        return self.machine.guest_to_hv if self.service == "hv" else self.machine.guest_to_uv

    async def call(self, name: str, request, *, timeout: float | None = None, wait: bool = False):
        core, service = await self._up(name, wait, timeout)
        call, resp_cls = core.table.calls[name], self.methods[name][1]
        with transport(Unreachable, name, self._link()):
            return _copy(await service.serve(core.table.run(call, resp_cls, _copy(request), self.caller),
                                             timeout if timeout is not None else 1e9))

    async def stream(self, name: str, request):
        core, service = await self._up(name, False, None)
        call, resp_cls = core.table.calls[name], self.methods[name][1]
        with transport(Unreachable, name, self._link()):
            async for item in service.relay(core.table.stream(call, resp_cls, _copy(request), self.caller), 1e9):
                yield _copy(item)

    async def close(self) -> None:
        pass


@dataclass
class LocalVcpu:
    """A guest's vCPU as the HV's resumes and machine checks find it: waiting after its ``sc 2``
    (``waiting``), resumed once per abort token (a repeat is a duplicate), or stopped."""

    lpid: int
    waiting: bool = False
    taken_token: int = 0
    resumes: list = field(default_factory=list)  # every VcpuResumeRequest that took the vCPU
    duplicates: int = 0
    machine_checks: list[str] = field(default_factory=list)
    resumed: asyncio.Event = field(default_factory=asyncio.Event)

    def resume(self, req: guest_pb2.VcpuResumeRequest) -> guest_pb2.VcpuResumeResponse:
        if req.lpid != self.lpid:
            return guest_pb2.VcpuResumeResponse(rc=H.H_PARAMETER)
        if self.waiting:
            self.waiting, self.taken_token = False, req.token
            self.resumes.append(req)
            self.resumed.set()
            return guest_pb2.VcpuResumeResponse(rc=H.H_SUCCESS)
        if req.token and req.token == self.taken_token:
            self.duplicates += 1
            return guest_pb2.VcpuResumeResponse(rc=H.H_SUCCESS, duplicate=True)
        return guest_pb2.VcpuResumeResponse(rc=H.H_STATE)


class LocalVcpus:
    """The HV core's VcpuPort: onto a guest core's call table (VcpuResume, MachineCheck, as the
    HV) when a guest of the machine has the VM's vCPU endpoint, else onto the LocalVcpu of the VM
    (by lpid); ``reachable`` false makes every call fail in transport (cut off)."""

    def __init__(self):
        self.vcpus: dict[int, LocalVcpu] = {}
        self.guests: dict[str, CallTable] = {}  # vCPU endpoint -> the guest's call table
        self.gone: set[str] = set()  # endpoints of guests killed: nothing answers there
        self.reachable = True
        self.link = Link()  # HV -> guests' vCPUs

    def of(self, lpid: int) -> LocalVcpu:
        return self.vcpus.setdefault(lpid, LocalVcpu(lpid))

    async def _guest_call(self, table: CallTable, name: str, request):
        with transport(VcpuUnreachable, name, self.link):
            return _copy(await table.run(table.calls[name], GUEST_METHODS[name][1], _copy(request),
                                         Caller(Role.ROLE_HV, "hv")))

    async def resume(self, vm, request, *, timeout: float):
        if not self.reachable or vm.vcpu_endpoint in self.gone:
            raise VcpuUnreachable("vCPU", "UNAVAILABLE")
        guest = self.guests.get(vm.vcpu_endpoint)
        if guest is not None:
            return await self._guest_call(guest, "VcpuResume", request)
        return self.of(vm.lpid).resume(_copy(request))

    async def machine_check(self, vm, request, *, timeout: float) -> None:
        if not self.reachable or vm.vcpu_endpoint in self.gone:
            raise VcpuUnreachable("vCPU", "UNAVAILABLE")
        guest = self.guests.get(vm.vcpu_endpoint)
        if guest is not None:
            await self._guest_call(guest, "MachineCheck", request)
            return
        self.of(vm.lpid).machine_checks.append(request.reason)

    async def forget(self, lpid: int) -> None:
        pass

    async def close(self) -> None:
        pass


class Disk:
    """The HV's data directory through a crash, as a ``kill -9`` of the HV process leaves it.

    What survives: every write that completed before the crash's instant, in the page cache if
    not yet on the platters (file contents, renames, creations and removals, stores through the
    shared mappings of guest RAM and GFN states: all visible to the files). What does not: anything
    after that instant. In one process a crashed core's tasks still unwind (``except`` and
    ``finally`` run, and may write: ``write_durably`` removes its temporary); a killed process's
    never do. So ``crash`` takes an image of the directory at the instant and ``restore`` puts it
    back before the next HV starts, recording what the dead core changed after its death
    (``discarded``). A crash between two steps of a multi-step write (failpoint
    ``hv.disk.before_rename``: the temporary written and fsync'd, not yet renamed) leaves exactly
    the files a kill there leaves."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.image: dict[str, bytes | None] | None = None  # relative path -> bytes, None: a directory
        self.discarded: list[str] = []  # "changed PATH" / "removed PATH" / "created PATH", per crash

    def _read(self) -> dict[str, bytes | None]:
        found: dict[str, bytes | None] = {}
        for path in sorted(self.root.rglob("*")):
            rel = str(path.relative_to(self.root))
            found[rel] = None if path.is_dir() else path.read_bytes()
        return found

    def crash(self) -> None:
        """The crash's instant: what is on disk now is what the next HV will find."""
        self.image = self._read()

    def restore(self) -> None:
        """Undo what happened after the crash (the dead core's unwinding); before the HV restarts."""
        if self.image is None:
            return
        now, image, self.image = self._read(), self.image, None
        for rel in sorted(set(now) - set(image), reverse=True):  # files before their directories
            path = self.root / rel
            path.rmdir() if now[rel] is None else path.unlink()
            self.discarded.append(f"created {rel}")
        for rel in sorted(image):  # directories before their files
            path, data = self.root / rel, image[rel]
            if rel in now and now[rel] == data:
                continue
            self.discarded.append(f"{'removed' if rel not in now else 'changed'} {rel}")
            if data is None:
                path.mkdir(parents=True, exist_ok=True)
                continue
            with open(path, "r+b" if path.exists() else "wb") as fh:  # in place: no truncation under a map
                fh.write(data)
                fh.truncate()


class Machine:
    """One UV core and one HV core (restartable) in this event loop, wired by the local ports.

    ``hv_config``: the HV's configuration (its ``data_dir`` is where a restarted HV recovers from).
    The HV's background tasks (the UV monitor, the watchdog) run only with ``background`` (they
    tick forever: on virtual time, the simulator's; a test of its own drives time without them)."""

    def __init__(self, hv_config: HvConfig, uv_config: UvConfig | None = None, trusted=None,
                 background: bool = False):
        self.hv_config = hv_config
        self.background = background  # run the HV's UV monitor and session watchdog (the simulator)
        self.uv_config = uv_config or UvConfig(pool_pages=256, lazy_pool=True)
        self.hv_to_uv, self.uv_to_hv = Link(), Link()
        self.guest_to_hv, self.guest_to_uv = Link(), Link()  # every guest's calls, as its VMM's and vCPU's
        self.vcpus = LocalVcpus()
        self.hv_to_guest = self.vcpus.link
        self.trusted = trusted
        self.latency: Callable[[], float] | None = None  # Service.latency for every service (set before start)
        self.uv_service = Service("uv")
        self.uv = self._new_uv()
        self.hv_service: Service = Service("hv")
        self.hv: Hypervisor | None = None
        self.crashed = asyncio.Event()
        self.hv_up = asyncio.Event()  # set while an HV core serves
        self.crashes: list[str] = []
        self.disk = Disk(hv_config.data_dir)  # what a restarted HV finds: the directory at the crash
        self.guests: dict[str, GuestProgram] = {}
        self._loop = asyncio.get_running_loop()
        self._factory = self._loop.get_task_factory()
        self._loop.set_task_factory(_owning_task_factory)

    def _new_uv(self) -> Ultravisor:
        uv = Ultravisor(self.uv_config).attach(LocalHv(self))
        uv.trusted = self.trusted
        return uv

    async def reset_uv(self) -> Ultravisor:
        """A machine reset as the UV sees it: the UV core and everything it held (secure memory,
        SVMs) gone, a new one with a new boot id in its place. The HV learns it from the next
        answer's boot id, as it does from a real UV's."""
        log.warning("UV reset")
        self.uv_service.kill()
        await asyncio.gather(*self.uv_service.tasks, return_exceptions=True)
        await self.uv.close()
        self.uv_service = Service("uv", self.latency)
        self.uv = self._new_uv()
        return self.uv

    def start_hv(self) -> Hypervisor:
        """An HV core on hv_config.data_dir, recovered from it (journalled aborts restart as its tasks)."""
        self.hv_service = Service("hv", self.latency)
        hv = Hypervisor(self.hv_config)
        hv.attach(LocalUv(self, hv.uv_answered), self.vcpus)
        self.hv = hv
        self.hv_service.run(hv.recover)
        if self.background:
            self.hv_service.run(hv.start_background)
        self.hv_up.set()
        return hv

    def add_guest(self, name: str, mem_bytes: int, blob: bytes = b"", **cfg) -> GuestProgram:
        """A guest core (its boot program: the VM's VMM and vCPU) on this machine, reaching the HV
        and UV cores through LocalCalls; the HV reaches its vCPU by its endpoint. ``cfg``:
        GuestConfig fields (svm, secure_capable, resume_timeout_s, ...)."""
        endpoint = f"{name}.local:1"
        program = GuestProgram(GuestConfig(name=name, mem_bytes=mem_bytes, hv="", uv="", blob=blob, **cfg),
                               endpoint=endpoint, hv=LocalCalls(self, "hv", name), uv=LocalCalls(self, "uv", name))
        self.vcpus.guests[endpoint] = CallTable(
            service=program, calls=guest_calltable.CALLS, state_table=guest_calltable.STATE_TABLE,
            state_of=guest_calltable.state_of, observer=GuestMetrics(), history=History(None, f"guest:{name}"))
        self.guests[name] = program
        return program

    def kill_guest(self, name: str, *tasks: asyncio.Future) -> None:
        """kill -9 of a guest process: its program's tasks (``tasks``: what the caller runs of it,
        its boot) and its VM session end, and its vCPU stops answering."""
        program = self.guests.pop(name)
        self.vcpus.guests.pop(program.endpoint, None)
        self.vcpus.gone.add(program.endpoint)
        for task in (*tasks, program.session):
            if task is not None:
                task.cancel()

    async def hv_call(self, name: str, request, caller: Caller, timeout: float = 30.0):
        """A call to the HV as ``caller`` (a guest's VMM, an operator), through its call table."""
        call, (_, resp_cls) = self.hv.table.calls[name], HV_METHODS[name]
        return _copy(await self.hv_service.serve(self.hv.table.run(call, resp_cls, _copy(request), caller), timeout))

    async def uv_call(self, name: str, request, caller: Caller, timeout: float = 30.0):
        call, (_, resp_cls) = self.uv.table.calls[name], UV_METHODS[name]
        return _copy(await self.uv_service.serve(self.uv.table.run(call, resp_cls, _copy(request), caller), timeout))

    def crash_hv(self, why: str = "") -> None:
        """kill -9 of the HV: every task of its core cancelled, the core dropped. Its except and
        finally clauses still run as the tasks unwind; ``stopping`` keeps a VmSession's end from
        destroying a VM, as a killed process's would not."""
        if self.hv is None:
            return
        log.warning("HV crashed%s", f" ({why})" if why else "")
        self.crashes.append(why)
        self.disk.crash()
        self.hv.stopping = True
        self.hv_service.kill()
        for vm in self.hv.state.vms.values():
            for slot in vm.slots.values():
                with contextlib.suppress(BufferError):  # a view still held by an unwinding task
                    slot.close()
        self.hv = None
        self.hv_up.clear()
        self.crashed.set()

    async def restart_hv(self) -> Hypervisor:
        """Let the dead HV's tasks unwind, then start a new one on the same data directory."""
        if self.hv is not None:
            self.crash_hv("restart")
        await asyncio.gather(*self.hv_service.tasks, return_exceptions=True)
        self.disk.restore()
        self.crashed.clear()
        return self.start_hv()

    @contextlib.contextmanager
    def crash_at(self, failpoint: str):
        """Arm ``failpoint`` (NAME[:N][@VM]) to crash the HV where it is reached."""
        faults.arm(f"{failpoint}=crash", on_crash=self.crash_hv)
        try:
            yield
        finally:
            faults.disarm(failpoint)

    async def close(self) -> None:
        for program in self.guests.values():
            if program.session is not None:
                program.session.cancel()
        if self.hv is not None:
            self.hv.stopping = True
            self.hv_service.kill()
            await asyncio.gather(*self.hv_service.tasks, return_exceptions=True)
            await self.hv.close()
            self.hv = None
        self.uv_service.kill()
        await asyncio.gather(*self.uv_service.tasks, return_exceptions=True)
        await self.uv.close()
        self._loop.set_task_factory(self._factory)


def machine(data_dir: Path, trusted=None, **hv_kw) -> Machine:
    """A Machine (call in the event loop) with an HV on ``data_dir`` (HvConfig fields in ``hv_kw``)."""
    return Machine(HvConfig(data_dir=data_dir, **hv_kw), trusted=trusted)
