"""Trace context across real UV, HV and guest processes: an aborted ESM's H_SVM_INIT_ABORT and the
page-outs, UV_SVM_TERMINATE and VcpuResume it causes share one trace in the call histories, and
the services export those spans over OTLP/gRPC to a real receiver (the OTLP collector's
TraceService, from the opentelemetry-proto definitions) started here."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from pefsim.ops.stack import LocalStack, StackConfig, free_port
from tests.conftest import assert_clean_exit, history
from tests.helpers import blob_for, boot_guest, operating

pytestmark = pytest.mark.processes


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent, with its service.name."""

    def __init__(self):
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append({"service": service, "name": s.name, "trace": s.trace_id.hex(),
                                           "span": s.span_id.hex(), "parent": s.parent_span_id.hex()})
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    got = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(got, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    yield got, port
    server.stop(grace=None)


def test_an_abort_is_one_trace_across_the_services_and_goes_out_over_otlp(tmp_path, receiver):
    got, port = receiver
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "200"}
    stack = LocalStack(StackConfig(run_dir=tmp_path / "run", env=env)).start()
    try:
        async def scenario():
            async with operating(stack) as op:
                blob = blob_for(stack, "g-bad", override={"kernel": "0" * 128})
                return await boot_guest(stack, op, "g-bad", blob=blob)
        rep = asyncio.run(scenario())
        assert rep.outcome == "aborted" and rep.memory_intact
    finally:
        assert_clean_exit(stack)  # SIGTERM: each service flushes its last spans before it exits

    hv, uv, guest = history(stack, "hv"), history(stack, "uv"), history(stack, "guest-g-bad")
    served = lambda lines, call: [e for e in lines if e.get("call") == call and e.get("dir") != "out"  # noqa: E731
                                  and e.get("lpid", rep.lpid) == rep.lpid]
    (abort,) = served(hv, "H_SVM_INIT_ABORT")
    trace = abort["trace"]
    (esm,) = served(uv, "UV_ESM")
    assert esm["trace"] == trace  # the guest's `sc 2` started it: the UV's hcalls went on in its trace
    caused = served(uv, "UvPageOutStream") + served(uv, "UV_PAGE_OUT") + served(uv, "UV_SVM_TERMINATE")
    assert caused and served(uv, "UV_SVM_TERMINATE"), "the abort made no page-out or terminate"
    resume = served(guest, "VcpuResume")
    assert resume, "the guest's history has no VcpuResume"
    assert {e["trace"] for e in caused + resume} == {trace}
    spans_of = {e["span"]: e for e in hv + uv + guest if "span" in e}
    for e in caused + resume:  # each one's parent is a span the HV served in the abort (the causal arrow)
        assert spans_of[e["parent"]]["svc"] == "hv", e

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not {"H_SVM_INIT_ABORT", "UV_SVM_TERMINATE", "VcpuResume"} <= \
            {s["name"] for s in got.spans if s["trace"] == trace}:
        time.sleep(0.1)  # a bounded wait for the last batch
    exported = [s for s in got.spans if s["trace"] == trace]
    assert {"UV_ESM", "H_SVM_INIT_ABORT", "UV_SVM_TERMINATE", "VcpuResume"} <= {s["name"] for s in exported}
    assert {"pefsim-ultravisor", "pefsim-hypervisor", "pefsim-guest"} <= {s["service"] for s in exported}
    by_span = {s["span"]: s for s in exported}
    assert by_span[abort["span"]]["name"] == "H_SVM_INIT_ABORT" and by_span[abort["span"]]["parent"] == abort["parent"]
