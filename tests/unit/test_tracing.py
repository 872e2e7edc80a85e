"""pefsim/tracing.py: W3C traceparent parsing (hostile input ignored), spans under their caller,
history lines naming their span."""
from __future__ import annotations

import json

import pytest

from pefsim import tracing
from pefsim.history import History

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_well_formed_traceparent_is_the_parent():
    assert tracing.parse(GOOD) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    span = tracing.child_of(GOOD)
    assert (span.trace, span.parent) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    assert len(span.span) == 16 and span.span != span.parent
    assert tracing.parse(span.traceparent) == (span.trace, span.span)


@pytest.mark.parametrize("hostile", [
    "", "00", GOOD.upper(), GOOD.replace("00-", "01-", 1), "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", GOOD + "-extra", GOOD[:-1], "x" * 10000,
    "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
])
def test_a_malformed_traceparent_starts_a_trace_of_its_own(hostile):
    assert tracing.parse(hostile) is None
    span = tracing.child_of(hostile)
    assert span.parent == "" and tracing.parse(span.traceparent) == (span.trace, span.span)


def test_calls_made_while_serving_carry_the_span_and_history_names_it(tmp_path):
    path = tmp_path / "h.jsonl"
    history = History(str(path), "hv")
    history.record(call="outside")
    assert tracing.outgoing_metadata((("a", "b"),)) == (("a", "b"),)  # no span: nothing added
    with tracing.serving("pefsim.v1.HypervisorService", "H_SVM_INIT_ABORT", GOOD) as span:
        history.record(call="H_SVM_INIT_ABORT")
        md = dict(tracing.outgoing_metadata(()))
        assert tracing.parse(md[tracing.HEADER]) == (span.trace, span.span)  # the callee's parent
    assert tracing.CURRENT.get() is None
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert "trace" not in lines[0]
    assert lines[1]["trace"] == span.trace and lines[1]["span"] == span.span and lines[1]["parent"] == "00f067aa0ba902b7"


def test_work_resumed_for_a_journalled_call_joins_its_trace():
    with tracing.resumed(GOOD):
        assert tracing.parse(tracing.current_traceparent()) == tracing.parse(GOOD)
    with tracing.resumed("garbage"):
        assert tracing.current_traceparent() is None
