"""The conformance table covers the call tables: every call x state cell, every argument check,
and a wrong caller for every ucall and hcall."""
from __future__ import annotations

import pytest

from tests.conformance.rows import ROWS
from pefsim.calltable import STATE, result_name
from services.hypervisor import calltable as hv_table
from services.ultravisor import calltable as uv_table

SERVICES = [("UV", uv_table), ("HV", hv_table)]


@pytest.mark.parametrize("svc, table", SERVICES, ids=["uv", "hv"])
def test_every_call_state_cell_has_a_row(svc, table):
    have = {(r.call, r.state) for r in ROWS if r.service == svc}
    unreachable = getattr(table, "UNREACHABLE", {})
    missing = [f"{call} x {state.name}" for call, row in table.STATE_TABLE.items()
               for state in row if (call, state.name) not in have and state not in unreachable]
    assert not missing, "no conformance row for:\n" + "\n".join(missing)


@pytest.mark.parametrize("svc, table", SERVICES, ids=["uv", "hv"])
def test_every_argument_check_has_a_row(svc, table):
    have = {(r.call, r.check, r.expect) for r in ROWS if r.service == svc and r.check}
    missing = [f"{c.name}: {chk.arg} -> {result_name(c, chk.rc)} ({chk.why})"
               for c in table.CALLS for chk in c.checks
               if chk is not STATE and (c.name, chk.arg, result_name(c, chk.rc)) not in have]
    assert not missing, "no conformance row for:\n" + "\n".join(missing)


@pytest.mark.parametrize("svc, table", SERVICES, ids=["uv", "hv"])
def test_every_abi_call_has_a_wrong_caller_row(svc, table):
    legit = {"UV": {}, "HV": {}}
    missing = []
    for c in table.CALLS:
        if c.opcode is None:
            continue
        rows = [r for r in ROWS if r.service == svc and r.call == c.name and r.caller
                and r.expect == result_name(c, c.wrong_caller)]
        if not rows:
            missing.append(c.name)
    assert not missing and legit, f"no wrong-caller row for {missing}"


def test_rows_name_real_calls_and_states():
    for r in ROWS:
        table = uv_table if r.service == "UV" else hv_table
        assert r.call in {c.name for c in table.CALLS}, r
        if r.call in table.STATE_TABLE:
            assert r.state in {s.name for s in table.STATE_TABLE[r.call]}, r
        assert r.source, r


def test_conformance_doc_is_up_to_date():
    """docs/conformance.md is what tools/gen_conformance.py writes from the tables."""
    import subprocess
    import sys

    from pefsim.ops.stack import ROOT

    out = subprocess.run([sys.executable, "tools/gen_conformance.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("svc, table", SERVICES, ids=["uv", "hv"])
def test_every_row_result_is_a_legal_result(svc, table):
    """Each row's result is among the results the call table allows for the call in that state
    (the set the chaos checker holds every observed result to)."""
    from pefsim.calltable import legal_results

    calls = {c.name: c for c in table.CALLS}
    bad = []
    for r in (r for r in ROWS if r.service == svc and r.expect != "PERMISSION_DENIED"):
        call = calls[r.call]
        state = next((s for s in table.STATE_TABLE.get(r.call, {}) if s.name == r.state), None)
        legal = {result_name(call, v) for v in legal_results(call, table.STATE_TABLE, state)}
        if r.expect not in legal:
            bad.append(f"{r.call} in {r.state} ({r.case}): {r.expect} not in {sorted(legal)}")
    assert not bad, "\n".join(bad)


def test_every_disagreement_names_one_row():
    """Each entry of the three-source table (rows.DISAGREE) is one row's (call, state, input): a
    row renamed or dropped cannot leave its sources behind unshown."""
    from tests.conformance.rows import DISAGREE, ROWS

    keys = [(r.call, r.state, r.case) for r in ROWS]
    assert [k for k in DISAGREE if keys.count(k) != 1] == []
    assert all(len(v) == 3 and all(v) for v in DISAGREE.values())
