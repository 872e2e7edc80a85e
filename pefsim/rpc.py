"""The gRPC adapter's plumbing shared by the three services: the dispatcher, admission, channels,
servers.

A service's calls are declared and run by its call table (pefsim/calltable.py, no transport); the
:class:`Dispatcher` serves that table over gRPC. Two error channels stay apart:

* a PEF result (``rc``: H_* / U_* values, or ``errno`` for the HV control surface) always travels
  inside a successful RPC response;
* gRPC status codes mean transport trouble (UNAVAILABLE, DEADLINE_EXCEEDED), a caller that never
  reached a handler (UNAUTHENTICATED), the admission bounds (RESOURCE_EXHAUSTED), a caller the
  call is not for (PERMISSION_DENIED), or a bug in pefsim (INTERNAL, with the traceback logged).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc
from grpc._cython import cygrpc

from pefsim import tracing
from pefsim.abi import PAGE_SIZE, Role
from pefsim.calltable import (Call, CallTable, Caller, Denied, NoResult, ROLE_NAMES, check_call_table, message_classes,
                              result_name)
from pefsim.dataplane import MAX_DATA_PAGES
from pefsim.transport import Unreachable

log = logging.getLogger("pefsim.rpc")

ROLE_HEADER = "pefsim-role"
IDENTITY_HEADER = "pefsim-identity"
BOOT_ID_TRAILER = "pefsim-boot-id"  # every answer says which boot of the service gave it

# Page payloads go in single messages of up to a few MiB (batched VcpuStore/SvmLoad); raise the
# 4 MiB default. The HTTP/2 receive window is fixed at 256 KiB instead of grown by BDP probing:
# a receiver otherwise buffers several MiB per stream in gRPC and the allocator (measured at
# 1 GiB with 1 MiB frames: HV peak RSS 74 -> 59 MiB over the guest, UV 74 -> 67 over its pool)
# for 20-30 % of stream throughput (still ~1 x raw TCP on loopback; the target is 0.35). Over a
# slow link (256 KiB per round trip: ~25 MB/s at 10 ms) raise it, or turn probing back on, with
# $PEFSIM_GRPC_OPTIONS. `pefsim bench --channel-options` measures these and the HTTP/2 frame,
# write buffer and TCP read sizes (README).
MAX_MESSAGE_BYTES = 64 << 20
RECEIVE_WINDOW_BYTES = 256 << 10
MAX_CONCURRENT_RPCS = 2048  # per server: beyond it, RESOURCE_EXHAUSTED (a bounded queue)
# What a server accepts in one message: the largest request any caller legitimately sends is
# MAX_DATA_PAGES of page data (VcpuStore, SvmStore, a stream frame: 512 KiB) plus its header; a
# bigger one is refused by gRPC from its length prefix (RESOURCE_EXHAUSTED) before it is buffered.
# Answers (UvPageOutStream frames, loads) are sent by servers and received by clients, whose limit
# stays MAX_MESSAGE_BYTES.
MAX_REQUEST_BYTES = MAX_DATA_PAGES * PAGE_SIZE + (64 << 10)
# Per caller identity (rpc.Admission): calls of every kind in flight, counted from the moment
# their headers arrive (a request that never comes counts too); bytes of requests being received
# or held by a running call (each read reserves MAX_REQUEST_BYTES until it knows the real size);
# how long the first request message of a call may take to arrive.
MAX_INFLIGHT_PER_PEER = 128
MAX_REQUEST_BYTES_PER_PEER = 8 << 20  # 14 requests of the largest size being read at once
REQUEST_ARRIVAL_TIMEOUT_S = 10.0
ON_BEHALF_HEADER = "pefsim-on-behalf-of"  # the UV's hcalls name the guest they serve (see Admission)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW_BYTES),
]
# Clients ping an idle connection so a peer that vanished (killed, frozen, blackholed) is noticed
# in seconds rather than at the TCP timeout; servers accept those pings.
# A restarted peer is reconnected to within a second (the default backoff grows to 120 s).
# min_reconnect_backoff_ms is not a backoff: it is gRPC's MIN_CONNECT_TIMEOUT, the time one
# connection attempt (TCP, TLS, HTTP/2 SETTINGS) is given. At 100 ms, handshakes with a service
# busy on a loaded machine (16 guests booting at once on 2 cores) timed out and fail-fast calls
# got UNAVAILABLE for a call never sent; 2 s leaves a blackholed attempt at most 2 s behind a heal.
CONNECT_TIMEOUT_MS = 2000
# The HV's one channel to the UV receives the abort's page-out frames; the HV holds no guest memory
# in its RSS (its RAM files are never mapped) and has one such channel, so it lets gRPC grow that
# receive window by BDP probing.
WIDE_RECEIVE_OPTIONS = (("grpc.http2.bdp_probe", 1),)
CLIENT_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = [o for o in CHANNEL_OPTIONS if o[0] != "grpc.max_receive_message_length"] + [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.so_reuseport", 0),  # a second server on a taken port fails to bind instead of sharing it
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]
GRPC_OPTIONS_ENV = "PEFSIM_GRPC_OPTIONS"


def with_overrides(options: list[tuple[str, Any]], raw: str | None = None) -> list[tuple[str, Any]]:
    """``options`` with the channel arguments of $PEFSIM_GRPC_OPTIONS (a JSON object of name:
    int or string) added or replaced: how ``pefsim bench --channel-options`` measures them. Read
    when a channel or server is made, not at import (a bad value is a ValueError there, not an
    exit of whoever imported this module)."""
    raw = os.environ.get(GRPC_OPTIONS_ENV, "") if raw is None else raw
    if not raw:
        return options
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{GRPC_OPTIONS_ENV}: not JSON ({exc})") from None
    if not isinstance(extra, dict) or not all(isinstance(v, (int, str)) and not isinstance(v, bool)
                                              for v in extra.values()):
        raise ValueError(f"{GRPC_OPTIONS_ENV}: expected a JSON object of channel argument: int or string")
    return merged(options, tuple(extra.items()))


def merged(options: list[tuple[str, Any]], own: tuple = ()) -> list[tuple[str, Any]]:
    """``options`` with ``own`` replacing those of the same name (each name once: gRPC would keep
    one of two at its own choosing)."""
    names = {k for k, _ in own}
    return [(k, v) for k, v in options if k not in names] + list(own)


def caller_of(context: grpc.aio.ServicerContext) -> Caller:
    """Who is calling: with mTLS, the verified client certificate's identity (``uv``, ``hv``,
    ``operator``, ``guest:<name>``); in insecure mode, what the request metadata asserts."""
    from pefsim.tls import identity_of

    identity = identity_of(context.auth_context() or {})
    md = dict(context.invocation_metadata() or ())
    if identity is not None:
        role, _, name = identity.partition(":")
        role_value, name = ROLE_NAMES.get(role, Role.ROLE_UNSPECIFIED), name or role
    else:
        role, name = md.get(ROLE_HEADER, ""), md.get(IDENTITY_HEADER, "")
        try:
            role_value = Role[f"ROLE_{role.upper()}"] if role else Role.ROLE_UNSPECIFIED
        except KeyError:
            role_value = Role.ROLE_UNSPECIFIED
    on_behalf = md.get(ON_BEHALF_HEADER, "") if role_value in (Role.ROLE_UV, Role.ROLE_HV) else ""
    return Caller(int(role_value), name, on_behalf)


@dataclass(frozen=True)
class Malformed:
    """What a request that does not parse becomes: the call answers INVALID_ARGUMENT."""

    why: str


@dataclass(frozen=True, slots=True)
class Received:
    """One request message as read: its parsed value (or Malformed) and its size on the wire."""

    value: Any
    nbytes: int


def _received(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Received]:
    def parse(data: bytes) -> Received:
        try:
            return Received(deserialize(data), len(data))
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's malformed input
            return Received(Malformed(f"{type(exc).__name__}: {exc}"), len(data))
    return parse


class Refused(Exception):
    """A call the admission bounds turned away (the gRPC status and its message)."""

    def __init__(self, code: grpc.StatusCode, why: str, reason: str):
        super().__init__(why)
        self.code, self.why, self.reason = code, why, reason


@dataclass
class _Share:
    """What one identity holds of a server: calls in flight and request bytes reserved."""

    calls: int = 0
    nbytes: int = 0
    freed: asyncio.Event | None = None  # set (and dropped) when bytes come back while a read waits


class Admission:
    """Per-identity bounds on what callers make a server hold, for every kind of call.

    A call is admitted when its headers arrive, before its request is read, and holds one of its
    identity's ``max_calls`` slots until it ends (unary, server-streaming and bidi alike: a
    stream or a request that never arrives counts as much as a running handler). Each request
    message first reserves ``MAX_REQUEST_BYTES`` of the identity's ``max_bytes`` (waiting up to
    ``wait_s`` for room), then keeps only its real size until the call ends (a stream: until its
    next message is read). So one identity can make a server hold at most ``max_calls`` calls and
    ``max_bytes`` of requests, whatever the others do.

    The identity is the caller's verified one. The UV makes its hcalls, and the HV its ucalls, on
    behalf of a guest and name it (ON_BEHALF_HEADER); for those two callers each guest is then its
    own identity, so one guest's stuck calls (or streams) through the UV or the HV cannot use up
    their share for every other guest."""

    def __init__(self, max_calls: int = MAX_INFLIGHT_PER_PEER, max_bytes: int = MAX_REQUEST_BYTES_PER_PEER,
                 wait_s: float = REQUEST_ARRIVAL_TIMEOUT_S):
        self.max_calls, self.max_bytes, self.wait_s = max_calls, max(max_bytes, MAX_REQUEST_BYTES), wait_s
        self.shares: dict[tuple, _Share] = {}

    @staticmethod
    def key_of(caller: "Caller") -> tuple:
        return (caller.role, caller.name, caller.on_behalf)

    @contextlib.asynccontextmanager
    async def admit(self, key: tuple):
        share = self.shares.setdefault(key, _Share())
        if share.calls >= self.max_calls:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"more than {self.max_calls} calls in flight", "calls")
        share.calls += 1
        ticket = _Ticket(self, share)
        try:
            yield ticket
        finally:
            ticket.release()
            share.calls -= 1
            if share.calls == 0 and share.nbytes == 0:
                self.shares.pop(key, None)

    def held(self, key: tuple) -> tuple[int, int]:
        share = self.shares.get(key)
        return (0, 0) if share is None else (share.calls, share.nbytes)


class _Ticket:
    """One admitted call's reservation of request bytes."""

    def __init__(self, admission: Admission, share: _Share):
        self.admission, self.share, self.nbytes = admission, share, 0

    async def reserve(self) -> None:
        """Room for one more request message of up to MAX_REQUEST_BYTES (after releasing what the
        previous message of this call held). Only the event loop touches the counts, so the usual
        case (room) takes no lock and no task."""
        self.release()
        share, limit = self.share, self.admission.max_bytes
        if share.nbytes + MAX_REQUEST_BYTES > limit:
            try:
                async with asyncio.timeout(self.admission.wait_s):
                    while share.nbytes + MAX_REQUEST_BYTES > limit:
                        if share.freed is None:
                            share.freed = asyncio.Event()
                        await share.freed.wait()
            except TimeoutError:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"more than {limit} bytes of requests in flight", "bytes") from None
        share.nbytes += MAX_REQUEST_BYTES
        self.nbytes = MAX_REQUEST_BYTES

    def settle(self, nbytes: int) -> None:
        """The message arrived: keep only its real size."""
        self._give_back(self.nbytes - nbytes)
        self.nbytes = nbytes

    def release(self) -> None:
        self._give_back(self.nbytes)
        self.nbytes = 0

    def _give_back(self, n: int) -> None:
        if n:
            self.share.nbytes -= n
            if self.share.freed is not None:  # wake every waiting read: each looks again
                self.share.freed.set()
                self.share.freed = None


# what gRPC raises through a handler when the call was already aborted or its caller is gone:
# the call's end, not a bug (no INTERNAL on top, no traceback)
TRANSPORT_ERRORS = (grpc.aio.AbortError, cygrpc.BaseError)


class Dispatcher:
    """Serves a service's call table over gRPC: admission, reading the request, then the call run
    by its CallTable (pefsim/calltable.py: caller, owner and ordered checks, state table, handler,
    metrics, history), the same way for unary, server-streaming and bidi calls; Denied becomes
    PERMISSION_DENIED, a bug INTERNAL (its traceback logged by the table).

    Every method is registered with gRPC as request-streaming, whatever its proto says (the wire
    format is the same): the dispatcher then sees a call when its headers arrive, admits it
    against its identity's bounds (Admission) and reads the request itself, with a deadline for
    its arrival and a reservation of the bytes it may take."""

    def __init__(self, *, table: CallTable, service_descriptor: Any, pb2: Any, boot_id: str = "",
                 max_inflight_per_peer: int = MAX_INFLIGHT_PER_PEER,
                 max_request_bytes_per_peer: int = MAX_REQUEST_BYTES_PER_PEER):
        self.table = table
        table.passthrough = TRANSPORT_ERRORS
        self.descriptor = service_descriptor
        self.pb2 = pb2
        self.calls = table.calls
        self.boot_id = boot_id
        self.admission = Admission(max_inflight_per_peer, max_request_bytes_per_peer)
        check_call_table(service_descriptor, self.calls.values(), table.state_table)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers = {}
        for method in self.descriptor.methods:
            call = self.calls[method.name]
            req_cls, resp_cls = message_classes(method)
            if method.client_streaming:
                make, bind = grpc.stream_stream_rpc_method_handler, self._bind_bidi
            elif method.server_streaming:
                make, bind = grpc.stream_stream_rpc_method_handler, self._bind_stream
            else:
                make, bind = grpc.stream_unary_rpc_method_handler, self._bind
            handlers[method.name] = make(
                bind(call, resp_cls), request_deserializer=_received(call.request_codec or req_cls.FromString),
                response_serializer=call.response_codec or resp_cls.SerializeToString)
        return grpc.method_handlers_generic_handler(self.descriptor.full_name, handlers)

    @contextlib.asynccontextmanager
    async def _admitted(self, call: Call, caller: Caller, context):
        """Hold one of the caller's call slots for the call's life, and turn what the call table
        raises into gRPC statuses. Every refusal of the admission bounds (too many calls, no room
        for a request's bytes, no request in time: Refused, from here or from _read) becomes the
        call's status, a refusal metric and a history line."""
        self._boot_trailer(context)
        try:
            async with self.admission.admit(Admission.key_of(caller)) as ticket:
                yield ticket
        except Refused as refused:
            self.table.observer.observe_refused(call.name, refused.reason)
            self.table.history.record(call=call.name, caller=caller.role_name, who=caller.name,
                                      refused=refused.why)
            await context.abort(refused.code, f"{call.name}: {caller.role_name} {caller.name}: {refused.why}")
        except Denied as denied:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(denied))
        except NoResult as refused:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{call.name}: {result_name(call, refused.rc)}")
        except (asyncio.CancelledError, *TRANSPORT_ERRORS):
            raise
        except Exception as exc:  # a bug in pefsim, logged whole by the table: say so to the caller
            await context.abort(grpc.StatusCode.INTERNAL, f"{call.name}: {exc!r}")

    async def _read(self, call: Call, ticket: _Ticket, context, first: bool) -> Any:
        """The call's next request message (grpc.aio.EOF when the caller is done sending), read
        under a byte reservation; the first one must arrive within the admission's wait (else
        Refused, which _admitted answers)."""
        await ticket.reserve()
        try:
            if first:
                async with asyncio.timeout(self.admission.wait_s):
                    got = await context.read()
            else:
                got = await context.read()
        except TimeoutError:
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"no request within {self.admission.wait_s:g} s", "arrival") from None
        if got is grpc.aio.EOF:
            ticket.release()
            if first:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{call.name}: no request sent")
            return got
        ticket.settle(got.nbytes)
        if isinstance(got.value, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{call.name}: malformed request ({got.value.why})")
        return got.value

    def _bind(self, call: Call, resp_cls: Any) -> Callable[..., Awaitable[Any]]:
        async def rpc(_requests: Any, context: grpc.aio.ServicerContext) -> Any:
            caller = caller_of(context)
            with self._span(call, context):
                async with self._admitted(call, caller, context) as ticket:
                    request = await self._read(call, ticket, context, first=True)
                    return await self.table.run(call, resp_cls, request, caller)

        rpc.__name__ = call.name
        return rpc

    def _bind_stream(self, call: Call, resp_cls: Any) -> Callable[..., Any]:
        async def rpc(_requests: Any, context: grpc.aio.ServicerContext):
            caller = caller_of(context)
            with self._span(call, context):
                async with self._admitted(call, caller, context) as ticket:
                    request = await self._read(call, ticket, context, first=True)
                    async for item in self.table.stream(call, resp_cls, request, caller):
                        yield item

        rpc.__name__ = call.name
        return rpc

    def _bind_bidi(self, call: Call, resp_cls: Any) -> Callable[..., Any]:
        async def rpc(_requests: Any, context: grpc.aio.ServicerContext):
            caller = caller_of(context)
            with self._span(call, context):
                async with self._admitted(call, caller, context) as ticket:
                    async def requests():  # a stream's messages come when its sender has them: no arrival deadline
                        while (request := await self._read(call, ticket, context, first=False)) is not grpc.aio.EOF:
                            yield request

                    async for item in self.table.bidi(call, requests(), caller):
                        yield item

        rpc.__name__ = call.name
        return rpc

    def _span(self, call: Call, context):
        """The served call's span, under the caller's traceparent (pefsim/tracing.py)."""
        md = dict(context.invocation_metadata() or ())
        return tracing.serving(self.descriptor.full_name, call.name, md.get(tracing.HEADER))

    def _boot_trailer(self, context) -> None:
        if context is not None and self.boot_id:
            context.set_trailing_metadata(((BOOT_ID_TRAILER, self.boot_id),))


# ---------------------------------------------------------------------------------------------
# Clients


class _RoleMetadata:
    """Adds the current span's traceparent (pefsim/tracing.py) to every call, and in insecure mode
    the caller's asserted role and identity. grpc.aio files an interceptor under one call kind, so
    there is a subclass per kind."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self.metadata = metadata

    def _details(self, client_call_details):
        md = tuple(client_call_details.metadata or ()) + self.metadata
        return client_call_details._replace(metadata=tracing.outgoing_metadata(md))


class _UnaryUnaryRole(_RoleMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamRole(_RoleMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _StreamStreamRole(_RoleMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def channel(target: str, role: int, identity: str = "", tls=None, server_role: str = "",
            options: tuple = ()) -> grpc.aio.Channel:
    """An aio channel to ``target``. With ``tls`` (pefsim.tls.Tls) it is mTLS, presenting that
    identity's certificate and accepting only a server certificate for ``server_role``; without,
    every call asserts the caller's role (and identity) in its metadata. ``options`` replace
    CLIENT_OPTIONS of the same name ($PEFSIM_GRPC_OPTIONS still has the last word)."""
    client_options = merged(CLIENT_OPTIONS, options)
    if tls is None:
        md = ((ROLE_HEADER, Role(role).name.removeprefix("ROLE_").lower()),)
        if identity:
            md += ((IDENTITY_HEADER, identity),)
        return grpc.aio.insecure_channel(target, options=with_overrides(client_options), interceptors=[
            _UnaryUnaryRole(md), _UnaryStreamRole(md), _StreamStreamRole(md)])
    # mTLS: the traceparent only, on unary calls; a streaming call's interceptor would cost each of
    # its messages (the page streams carry their traceparent themselves: hypervisor/adapters/grpc.py)
    interceptors = [_UnaryUnaryRole(())]
    options = with_overrides(client_options) + ([("grpc.ssl_target_name_override", server_role)]
                                                if server_role else [])
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=options, interceptors=interceptors)


# ---------------------------------------------------------------------------------------------
# Servers


async def new_server(listen: str, handlers: list[grpc.GenericRpcHandler], service_name: str = "",
                     tls=None) -> tuple[grpc.aio.Server, int]:
    """A server with the services' handlers, the standard gRPC health service (SERVING for the
    overall server and ``service_name``) and server reflection (grpcurl lists and describes the
    service), bound to ``host:port`` (port 0 picks one); with ``tls`` only clients with a
    certificate from the project CA get through the handshake. The process's served calls' spans
    go over OTLP when the standard OTEL_EXPORTER_OTLP_ENDPOINT is set (pefsim/tracing.py)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    tracing.configure(os.environ.get("OTEL_SERVICE_NAME")
                      or "pefsim-" + service_name.rsplit(".", 1)[-1].removesuffix("Service").lower())
    from grpc_reflection.v1alpha import reflection

    server = grpc.aio.server(options=with_overrides(SERVER_OPTIONS), maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    server.add_generic_rpc_handlers(handlers)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    for name in ("", service_name):
        await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([n for n in (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME) if n],
                                        server)
    port = server.add_secure_port(listen, tls.server_credentials()) if tls else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot bind {listen}")
    return server, port


async def start_server(listen: str, handlers: list[grpc.GenericRpcHandler], service_name: str = "",
                       tls=None) -> tuple[grpc.aio.Server, int]:
    """Build and start a server on ``host:port``; return it and its port."""
    server, port = await new_server(listen, handlers, service_name, tls)
    await server.start()
    return server, port


def unreachable(cls: type[Unreachable], what: str, exc: grpc.aio.AioRpcError) -> Unreachable:
    """The one translation of a failed gRPC call into a port's transport failure."""
    return cls(what, exc.code().name, exc.details() or "")


def host_of(listen: str) -> str:
    return listen.rsplit(":", 1)[0]


def write_ready_file(path: str | None, **info: Any) -> None:
    """Tell the launcher where the service listens (atomically: write, then rename)."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"pid": os.getpid(), **info}, fh)
    os.replace(tmp, path)


M_ARENA_MAX = -8  # glibc's mallopt parameter


def one_malloc_arena() -> None:
    """Have glibc's malloc keep one arena for the process instead of one per thread (up to 8 per
    core): gRPC's threads each kept a few MiB of freed message buffers in their own arena
    (measured: 5-7 MiB of peak RSS per service), and the services are not malloc-bound. Must run
    before gRPC starts its threads. $MALLOC_ARENA_MAX, when set, wins; without glibc, nothing."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        log.info("no mallopt in this C library: malloc arenas left as they are")
        return
    if not mallopt(M_ARENA_MAX, 1):
        log.warning("mallopt(M_ARENA_MAX, 1) refused: malloc arenas left as they are")


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run a service's main coroutine on uvloop (plain asyncio if uvloop is not installed), with
    one malloc arena (one_malloc_arena)."""
    one_malloc_arena()
    try:
        import uvloop
    except ImportError:  # documented fallback: same behaviour, slower loop
        log.warning("uvloop not installed; using the default asyncio event loop")
        return asyncio.run(main())
    return uvloop.run(main())


LIFELINE_ENV = "PEFSIM_LIFELINE"  # the read end of a pipe whose write end only the launcher holds


def watch_lifeline(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """Stop when the process that launched this one dies, however it dies (kill -9 included):
    the launcher (pefsim.ops.stack) holds the only write end of a pipe whose read end it passed
    here; the kernel closes it with the launcher, and the read end then reads EOF."""
    fd = os.environ.pop(LIFELINE_ENV, "")
    if not fd.isdecimal():
        return

    def readable() -> None:
        if not os.read(int(fd), 1):
            loop.remove_reader(int(fd))
            log.warning("the process that launched this one is gone: stopping")
            stop()
    loop.add_reader(int(fd), readable)


async def serve_until_signalled(server: grpc.aio.Server, on_stop: Callable[[], Awaitable[None]] | None = None,
                                before_stop: Callable[[], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then stop accepting, finish in-flight calls briefly, clean up."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watch_lifeline(loop, stop.set)
    waiter = asyncio.ensure_future(server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if before_stop is not None:
        before_stop()
    await server.stop(grace=1.0)
    for task in (waiter, stopper):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if on_stop is not None:
        await on_stop()
    await asyncio.to_thread(tracing.shutdown)  # the last spans go out (a bounded flush)


@dataclass
class Peer:
    """A lazily connected stub to another service."""

    target: str
    role: int
    stub_cls: Any
    identity: str = ""
    tls: Any = None  # pefsim.tls.Tls: mTLS with this identity's certificate
    server_role: str = ""  # the role the server's certificate must name (with tls)
    options: tuple = ()  # channel options of this peer's own (rpc.channel)
    _channel: grpc.aio.Channel | None = field(default=None, repr=False)
    _stub: Any = field(default=None, repr=False)

    @property
    def stub(self) -> Any:
        if self._stub is None:
            self._channel = channel(self.target, self.role, self.identity, self.tls, self.server_role, self.options)
            self._stub = self.stub_cls(self._channel)
        return self._stub

    @property
    def channel(self) -> grpc.aio.Channel:
        self.stub
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
