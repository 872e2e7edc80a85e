"""Call tables, and running a call from one, with no transport: what every service's protocol core
and both adapters (gRPC, in-process) share.

A service declares its calls once, in its ``calltable.py``: one :class:`Call` row per RPC (who may
make it, the argument checks in the ABI's order, where the state check falls in that order, the
handler) and one allowed-calls-per-state table. :class:`CallTable` runs a call from those rows:
caller check, owner check, ordered checks, state table, handler; a handler re-checks the state
under the lock its change takes (``guard``); each call ends observed in the metrics and history.
The gRPC dispatcher (pefsim/rpc.py) and the in-process adapter (pefsim/local.py) both run calls
through it; the conformance tests read the same rows.

Two error channels stay apart:

* a PEF result (``rc``: H_* / U_* values, or ``errno`` for the HV control surface) always travels
  inside a successful response;
* a caller that may not make a call at all is :class:`Denied` (gRPC PERMISSION_DENIED); a bug in
  a handler is its exception (gRPC INTERNAL, with the traceback logged).

This module imports nothing of grpc (tests/unit/test_layers.py).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Mapping

from pefsim import clock
from pefsim.abi import Role, rc_name
from pefsim.history import History

log = logging.getLogger("pefsim.calls")


class _Allow:
    def __repr__(self) -> str:
        return "ALLOW"


ALLOW: Any = _Allow()
"""A state-table cell: the call proceeds to its handler in this state."""


class _StateCheck:
    def __repr__(self) -> str:
        return "STATE"


STATE: Any = _StateCheck()

"""Marks where, in a call's ordered checks, the allowed-calls-per-state table is consulted."""

DENIED: Any = object()
"""A precheck result: the caller may not make this call (no PEF result; PERMISSION_DENIED)."""


@dataclass(frozen=True)
class Check:
    """One argument check of a call, in the order the ABI's code performs it."""

    arg: str  # the argument, as the ABI names it (R4 lpid, order, ...)
    ok: Callable[[Any], bool]
    rc: int  # the result when ``ok(request)`` is false
    why: str  # one line for logs and docs/conformance.md


@dataclass(frozen=True)
class Call:
    """One row of a service's call table."""

    name: str  # the RPC name; for ucalls and hcalls exactly the ABI name
    handler: Callable[..., Awaitable[Any]]  # async handler(service, request, caller) -> response
    callers: frozenset  # roles that may make the call
    wrong_caller: int | None  # result for any other caller (U_PERMISSION, ...); None: the call
    # is not the caller's to make at all and it gets gRPC PERMISSION_DENIED
    checks: tuple = (STATE,)  # ordered; STATE is the state table's turn
    opcode: int | None = None  # Ucall/Hcall number, None for non-ABI RPCs
    result: str | None = "rc"  # response field with the PEF result ("rc", "errno"; None: none)
    family: Any = None  # enum of the result values (H, U, Errno): names for logs and metrics
    results: frozenset = frozenset()  # what the handler itself may answer (beyond the checks)
    owned: bool = False  # a guest may make it only for its own VM / SVM (the dispatcher's owner_of)
    # more fields of an answer the checks give (not the handler), from the request: UV_ESM's
    # refusal is the vCPU's return from `sc 2` and says so
    refusal: Callable[[Any], dict] | None = None
    # the call's exit path, run on its answer (the checks' or the handler's) before it goes back:
    # exit(service, request, response, caller) may route it elsewhere (the HV's hcall exit path)
    exit: Callable[[Any, Any, Any, Caller], None] | None = None
    request_codec: Callable[[bytes], Any] | None = None  # raw frames instead of protobuf
    response_codec: Callable[[Any], bytes] | None = None


@dataclass(frozen=True)
class Caller:
    role: int
    name: str = ""
    # the guest a UV or HV call serves (ON_BEHALF_HEADER), believed only from those two roles:
    # each such guest is an identity of its own for the admission bounds, and an owned call the
    # UV makes for one guest cannot touch another's VM
    on_behalf: str = ""

    @property
    def role_name(self) -> str:
        return Role(self.role).name


ROLE_NAMES = {"uv": Role.ROLE_UV, "hv": Role.ROLE_HV, "guest": Role.ROLE_GUEST, "operator": Role.ROLE_OPERATOR}


def message_classes(method) -> tuple[Any, Any]:
    """The request and response classes of an RPC's method descriptor (of any .proto file: a
    service's own messages, or common.proto's)."""
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(method.input_type), message_factory.GetMessageClass(method.output_type)


def request_lpid(request: Any) -> int | None:
    """The lpid a request is about (its own field, or the calling vCPU's LPIDR)."""
    lpid = getattr(request, "lpid", None)
    if lpid is not None:
        return lpid
    vcpu = getattr(request, "vcpu", None)
    return None if vcpu is None else vcpu.lpid


class StateChanged(Exception):
    """Raised by CallTable.guard: the object's state, looked at again under its lock, no longer
    allows the call; the call answers ``rc`` (the state table's cell for the new state)."""

    def __init__(self, rc: int, state: Any):
        super().__init__(f"state changed to {getattr(state, 'name', state)}")
        self.rc, self.state = rc, state


class CallObserver:
    """Receives one observation per dispatched call (the service's metrics implement it)."""

    def prepare_call(self, call: str, results: list[str]) -> None:
        """Told once, at start, every result a call can give (so its series exist from zero)."""

    def observe_call(self, call: str, result: str, seconds: float) -> None:  # pragma: no cover
        pass

    def observe_batch(self, call: str, result: str, count: int) -> None:
        """``count`` pages of a bulk batch got ``result`` of ``call``."""

    def call_running(self, call: str, delta: int) -> None:
        """A handler of ``call`` started (+1) or ended (-1)."""

    def observe_refused(self, call: str, reason: str) -> None:
        """A call was turned away by the admission bounds (``reason``: calls, bytes, arrival)."""


class Denied(PermissionError):
    """The caller may not make this call at all (no PEF result): gRPC PERMISSION_DENIED."""


class NoResult(Exception):
    """A check refused a call whose response has no result field (its answer is FAILED_PRECONDITION)."""

    def __init__(self, call: str, rc: int):
        super().__init__(f"{call}: {rc}")
        self.rc = rc


class CallTable:
    """A service's call table bound to the service: runs calls from it (``run``, ``stream``), and
    gives handlers the state check they repeat under their lock (``guard``)."""

    def __init__(self, *, service: Any, calls: Iterable[Call], state_table: Mapping[str, Mapping[Any, Any]],
                 state_of: Callable[[Any, Call, Any], Any] | None, observer: CallObserver, history: History,
                 owner_of: Callable[[Any, Any], str | None] | None = None, absent_state: Any = None,
                 passthrough: tuple[type[BaseException], ...] = ()):
        self.service = service
        # exceptions a transport raises through a handler (gRPC's abort of a stream): not bugs
        self.passthrough = passthrough
        self.calls = {c.name: c for c in calls}
        self.state_table = state_table
        self.state_of = state_of
        self.observer = observer
        self.history = history
        self.owner_of = owner_of
        self.absent_state = absent_state  # the state of an lpid with no object (recheck)
        for call in self.calls.values():
            self.observer.prepare_call(call.name, possible_results(call, state_table))

    def precheck(self, call: Call, request: Any, caller: Caller) -> tuple[int | None, Any]:
        """The result the checks give before any handler runs (None: go to the handler), and the
        state the table was consulted in (None if it was not reached)."""
        if caller.role not in call.callers:
            return (DENIED if call.wrong_caller is None else call.wrong_caller), None
        guest = caller.role == Role.ROLE_GUEST
        who = caller.name if guest else caller.on_behalf
        if call.owned and (guest or who) and self.owner_of is not None:
            # a guest, or the UV acting for one: None is no such object (the state table
            # answers); "" an object no guest owns (an operator made it), which only operators
            # and the privileged roles acting for no guest may touch
            owner = self.owner_of(self.service, request)
            if owner is not None and (owner != who or not who):
                return (DENIED if call.wrong_caller is None else call.wrong_caller), None
        state = None
        for check in call.checks:
            if check is STATE:
                state = self.state_of(self.service, call, request) if self.state_of else None
                cell = self.state_table[call.name][state]
                if cell is not ALLOW:
                    return cell, state
            elif not check.ok(request):
                return check.rc, state
        return None, state

    def recheck(self, name: str, request: Any, still: Callable[[], bool] | None = None) -> tuple[Any, Any]:
        """The state-table cell for call ``name`` now (None: ALLOW) and the state it saw; when
        ``still()`` says the object the handler looked up is no longer the one its lpid names
        (the UV reuses lpids), the state is the absent one."""
        if self.state_of is None:
            return None, None
        if still is not None and not still() and self.absent_state is not None:
            state = self.absent_state
        else:
            state = self.state_of(self.service, self.calls[name], request)
        cell = self.state_table[name][state]
        return (None if cell is ALLOW else cell), state

    @contextlib.asynccontextmanager
    async def guard(self, name: str, request: Any, lock: asyncio.Lock, still: Callable[[], bool] | None = None):
        """Hold ``lock`` (the object's lock the call's change takes) and look at the state table
        for call ``name`` again under it: the first check ran before the lock was taken, and
        another call holding it (an abort's page-out, a reset) may have changed the state since.
        Raises StateChanged (the call answers the table's cell) when the state no longer allows
        the call. Every handler whose call consults the state table takes its lock this way
        (tests/unit/test_calltables.py holds them to it)."""
        async with lock:
            rc, state = self.recheck(name, request, still)
            if rc is not None:
                raise StateChanged(rc, state)
            yield

    @staticmethod
    def refusal(call: Call, resp_cls: Any, request: Any, rc: int) -> Any:
        """The answer a check gives: the result, and what the call's row adds (Call.refusal)."""
        return resp_cls(**{call.result: rc}, **(call.refusal(request) if call.refusal else {}))

    def record_batch(self, name: str, batched: str, lpid: int, caller: Caller, rcs: list[int],
                     state: Any) -> None:
        """One history line per batch of a bulk call: how many pages got which result of the call
        it batches (``batched``), and the state the batch saw."""
        call = self.calls[batched]
        counts: dict[str, int] = {}
        for rc, n in collections.Counter(rcs).items():
            key = result_name(call, rc)
            counts[key] = counts.get(key, 0) + n
        for key, n in counts.items():
            self.observer.observe_batch(batched, key, n)
        self.history.record(call=name, batches=batched, caller=caller.role_name, who=caller.name, lpid=lpid,
                            state=None if state is None else state.name, pages=len(rcs), results=counts)

    def failed(self, call: Call, caller: Caller, request: Any, exc: BaseException) -> None:
        """A handler raised (a bug in pefsim): its traceback logged whole, a history line."""
        log.error("%s failed", call.name, exc_info=exc)
        self.history.record(call=call.name, caller=caller.role_name, who=caller.name,
                            lpid=None if request is None else request_lpid(request), error=repr(exc))

    def _denied(self, call: Call, caller: Caller) -> Denied:
        # not an ABI call: a refused caller is an authorization failure, not a PEF result
        self.history.record(call=call.name, caller=caller.role_name, who=caller.name, denied=True)
        return Denied(f"{call.name} is not for {caller.role_name}")

    async def run(self, call: Call, resp_cls: Any, request: Any, caller: Caller) -> Any:
        """One unary call: checks, handler, observation. Raises Denied for a caller the call is
        not for; a handler's exception (a bug) is logged and raised."""
        t0 = clock.monotonic()
        rc, state = self.precheck(call, request, caller)
        if rc is DENIED:
            raise self._denied(call, caller)
        try:
            if rc is None:
                self.observer.call_running(call.name, 1)
                try:
                    response = await call.handler(self.service, request, caller)
                finally:
                    self.observer.call_running(call.name, -1)
            else:
                response = self.refusal(call, resp_cls, request, rc)
        except StateChanged as changed:
            if call.result is None:
                raise
            response, state = self.refusal(call, resp_cls, request, changed.rc), changed.state
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed(call, caller, request, exc)
            raise
        if call.exit is not None:
            call.exit(self.service, request, response, caller)
        result = 0 if call.result is None else int(getattr(response, call.result))
        name = "OK" if call.result is None else result_name(call, result)
        elapsed = clock.monotonic() - t0
        self.observer.observe_call(call.name, name, elapsed)
        self.history.record(call=call.name, caller=caller.role_name, who=caller.name,
                            lpid=request_lpid(request),
                            state=None if state is None else state.name, rc=result, rc_name=name,
                            dur_s=round(elapsed, 6))
        return response

    async def stream(self, call: Call, resp_cls: Any, request: Any, caller: Caller) -> AsyncIterator[Any]:
        """A server-streaming call: the checks answer with one message carrying the result (a
        call whose response has none: NoResult); a call that passes them streams what its
        handler (an async generator) yields. Raises Denied as ``run`` does."""
        t0 = clock.monotonic()
        rc, state = self.precheck(call, request, caller)
        if rc is DENIED:
            raise self._denied(call, caller)
        self.history.record(call=call.name, caller=caller.role_name, who=caller.name,
                            lpid=request_lpid(request), state=None if state is None else state.name,
                            rc=0 if rc is None else int(rc), stream="start")
        if rc is not None:
            self.observer.observe_call(call.name, result_name(call, rc), clock.monotonic() - t0)
            if call.result is None:
                raise NoResult(call.name, rc)
            yield self.refusal(call, resp_cls, request, rc)
            return
        async with self.streaming(call, caller, request, t0):
            async for item in call.handler(self.service, request, caller):
                yield item

    async def bidi(self, call: Call, requests: AsyncIterator[Any], caller: Caller) -> AsyncIterator[Any]:
        """A bidirectional stream (the bulk data plane): only the caller is checked here; each
        item the handler processes goes through the checks of the call it batches."""
        if caller.role not in call.callers:
            raise self._denied(call, caller)
        async with self.streaming(call, caller, None, clock.monotonic()):
            async for item in call.handler(self.service, requests, caller):
                yield item

    @contextlib.asynccontextmanager
    async def streaming(self, call: Call, caller: Caller, request: Any, t0: float):
        """A stream's handler running: counted in flight, observed in the call metrics when it
        ends (OK); a bug in it is logged with its traceback (``failed``) and raised."""
        self.observer.call_running(call.name, 1)
        try:
            yield
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, self.passthrough):
                self.failed(call, caller, request, exc)
            raise
        else:
            self.observer.observe_call(call.name, "OK" if call.result is None else result_name(call, 0),
                                       clock.monotonic() - t0)
        finally:
            self.observer.call_running(call.name, -1)


def result_name(call: Call, result: int) -> str:
    """The result's name in the call's family; a value the call's handler gives from another family
    is named in that one (UV_ESM's -4 after an abort is the HV's H_PARAMETER in R3, not U_PARAMETER)."""
    named = [r for r in call.results if int(r) == result and call.family is not None and not isinstance(r, call.family)]
    if named and not any(int(k.rc) == result for k in call.checks if k is not STATE):
        return named[0].name
    if call.family is not None:
        try:
            return call.family(result).name
        except ValueError:
            pass
    return rc_name(result)


def legal_results(call: Call, state_table: Mapping[str, Mapping[Any, Any]], state: Any) -> set[int]:
    """Every result ``call`` may give when its state-table check saw ``state`` (None: the check
    was not reached): the wrong-caller result, the checks' results up to where the call stopped,
    and the handler's own results when the state allows the call."""
    codes = set() if call.wrong_caller is None else {int(call.wrong_caller)}
    for check in call.checks:
        if check is STATE:
            if state is None:
                return codes
            cell = state_table[call.name][state]
            if cell is not ALLOW:
                return codes | {int(cell)}
        else:
            codes.add(int(check.rc))
    return codes | {int(r) for r in call.results}


def possible_results(call: Call, state_table: Mapping[str, Mapping[Any, Any]]) -> list[str]:
    """The names of every result ``call`` can give, in any state."""
    if call.result is None:
        return ["OK"]
    states = list(state_table.get(call.name, {})) or [None]
    values = set().union(*(legal_results(call, state_table, s) for s in states))
    return sorted({result_name(call, v) for v in values})


def check_call_table(service_descriptor: Any, calls: Iterable[Call],
                     state_table: Mapping[str, Mapping[Any, Any]]) -> None:
    """Every RPC has exactly one row; every row that consults the state table has a complete row
    in it. Raises at service start-up (and in the unit tests) instead of failing at call time."""
    calls = list(calls)
    names = [c.name for c in calls]
    methods = {m.name for m in service_descriptor.methods}
    dup = {n for n in names if names.count(n) > 1}
    missing = methods - set(names)
    extra = set(names) - methods
    if dup or missing or extra:
        raise ValueError(f"{service_descriptor.name} call table: duplicate {sorted(dup)}, "
                         f"missing {sorted(missing)}, unknown {sorted(extra)}")
    for call in calls:
        if STATE in call.checks:
            if call.name not in state_table:
                raise ValueError(f"{call.name} consults the state table but has no row")
        elif call.name in state_table:
            raise ValueError(f"{call.name} has a state-table row but never consults it")
    for name, row in state_table.items():
        states = {type(s) for s in row}
        if len(states) != 1:
            raise ValueError(f"state table row {name} mixes state types")
        (enum,) = states
        if set(row) != set(enum):
            raise ValueError(f"state table row {name} lacks {sorted(s.name for s in set(enum) - set(row))}")
