"""The call tables: complete, consistent with the protos, and what the dispatcher enforces."""
from __future__ import annotations

import pytest

from pefsim.abi import Hcall, Role, Ucall
from pefsim.calltable import ALLOW, STATE, check_call_table
from pefsim.v1 import guest_pb2, hypervisor_pb2, ultravisor_pb2
from services.guest import calltable as guest_table
from services.hypervisor import calltable as hv_table
from services.ultravisor import calltable as uv_table

TABLES = [
    (uv_table, ultravisor_pb2.DESCRIPTOR.services_by_name["UltravisorService"]),
    (hv_table, hypervisor_pb2.DESCRIPTOR.services_by_name["HypervisorService"]),
    (guest_table, guest_pb2.DESCRIPTOR.services_by_name["GuestService"]),
]
NOT_MODELLED = {"UV_WRITE_PATE", "UV_RETURN", "H_TPM_COMM", "UCALL_UNSPECIFIED", "HCALL_UNSPECIFIED"}


@pytest.mark.parametrize("table, service", TABLES, ids=["uv", "hv", "guest"])
def test_every_rpc_has_exactly_one_row(table, service):
    check_call_table(service, table.CALLS, table.STATE_TABLE)


def test_every_modelled_opcode_is_an_rpc_with_its_number():
    """Each ucall is a UV RPC and each hcall an HV RPC of the same name, with the ABI number."""
    rows = {c.name: c for c in uv_table.CALLS + hv_table.CALLS}
    for enum in (Ucall, Hcall):
        for op in enum:
            if op.name in NOT_MODELLED:
                assert op.name not in rows
                continue
            assert rows[op.name].opcode == op, op.name


def test_not_modelled_calls_are_documented():
    """The calls pefsim leaves out say why in abi.proto."""
    from pefsim.ops.stack import ROOT

    text = (ROOT / "protos/pefsim/v1/abi.proto").read_text()
    for name in ("UV_WRITE_PATE", "UV_RETURN", "H_TPM_COMM"):
        line = next(l for l in text.splitlines() if l.strip().startswith(name + " "))
        assert "not modelled" in line


def test_hcalls_only_from_the_uv_except_init_abort():
    """8c47b6ff29e3: H_SVM_* need MSR[S] in SRR1 (i.e. come from the UV); e3326ae3d59e exempts
    H_SVM_INIT_ABORT."""
    for call in hv_table.CALLS:
        if call.name.startswith("H_SVM_"):
            assert Role.ROLE_UV in call.callers
            if call.name == "H_SVM_INIT_ABORT":
                assert Role.ROLE_GUEST in call.callers
            else:
                assert call.callers == {Role.ROLE_UV}


def test_state_is_checked_where_the_abi_checks_it():
    """UV_PAGE_IN checks order and src_ra before the SVM (U_P5, U_P2 before U_PARAMETER); the
    HV checks the VM state before order and flags (H_UNSUPPORTED before H_P3/H_P2)."""
    uv_rows = {c.name: c for c in uv_table.CALLS}
    assert [c if c is STATE else c.arg for c in uv_rows["UV_PAGE_IN"].checks] == ["order", "src_ra", STATE]
    hv_rows = {c.name: c for c in hv_table.CALLS}
    assert [c if c is STATE else c.arg for c in hv_rows["H_SVM_PAGE_IN"].checks] == [STATE, "order", "flags"]


def test_abort_is_only_legal_in_transient():
    row = hv_table.STATE_TABLE["H_SVM_INIT_ABORT"]
    assert [s.name for s, cell in row.items() if cell is ALLOW] == ["VM_TRANSIENT"]


@pytest.mark.parametrize("table", [uv_table, hv_table], ids=["uv", "hv"])
def test_state_checked_handlers_take_their_lock_through_the_guard(table):
    """A handler whose call consults the state table and then takes the object's lock must look
    at the state again under it (CallTable.guard): the dispatcher's check ran before the lock,
    and whoever held the lock (an abort's page-out, a reset) may have changed the state. A plain
    `async with vm.lock` / `svm.lock` in such a handler is the check-then-act race of issue 13."""
    import inspect
    import re

    plain = re.compile(r"async with (\w+\.)?(lock\b|lock_of\()")
    by_hand = re.compile(r"\.lock\.acquire\(")  # then it must look again itself (recheck)
    offenders = []
    for c in table.CALLS:
        source = inspect.getsource(c.handler)
        if STATE in c.checks and (plain.search(source) or (by_hand.search(source) and "recheck(" not in source)):
            offenders.append(c.name)
    assert offenders == []
