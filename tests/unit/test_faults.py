"""Failpoint specs: a bad one stops the service with a message, a good one arms its point."""
from __future__ import annotations

import pytest

from pefsim import faults


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv("PEFSIM_FAILPOINTS", raising=False)
    monkeypatch.delenv("PEFSIM_MUTANTS", raising=False)
    yield
    faults._armed.clear()


@pytest.mark.parametrize("spec, says", [
    ("no.such.point", "unknown failpoint"),
    ("guest.before_esm:x", "positive integer"),
    ("guest.before_esm:0", "positive integer"),
    ("guest.before_esm:²", "positive integer"),
    ("guest.before_esm=explode", "unknown action"),
    ("guest.before_esm=lose", "no answer to lose"),
])
def test_a_bad_failpoint_is_refused_with_a_message(spec, says):
    with pytest.raises(SystemExit, match=says):
        faults.configure([spec])
    assert not faults._armed


def test_a_failpoint_is_armed_for_its_hit_and_vm():
    faults.configure(["guest.before_esm:2@g1=stop"])
    assert faults._armed["guest.before_esm"] == (2, "g1", "stop")
    assert faults.armed("guest.before_esm")


def test_disarm_takes_the_spec_it_was_armed_with():
    for spec in ("hv.abort.before_terminate@victim", "hv.abort.page_out:3@victim", "hv.esm.init_done"):
        faults.arm(f"{spec}=crash")
        faults.disarm(spec)
        assert not faults._armed, spec
