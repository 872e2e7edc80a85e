#!/usr/bin/env python3
"""Write docs/conformance.md from the call tables and tests/conformance/rows.py.

    python tools/gen_conformance.py          # write it
    python tools/gen_conformance.py --check  # exit 1 if the committed file is stale
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conformance.rows import CHOICES, DISAGREE, ROWS  # noqa: E402
from pefsim.calltable import ALLOW, STATE, result_name  # noqa: E402
from services.hypervisor import calltable as hv_table  # noqa: E402
from services.ultravisor import calltable as uv_table  # noqa: E402

TARGET = ROOT / "docs" / "conformance.md"


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def call_section(title: str, table, svc: str) -> list[str]:
    out = [f"## {title}", "", "### Calls: who may make them, and the checks in order", "",
           "| call | opcode | callers | any other caller | checks, in order | the handler's own results |",
           "|---|---|---|---|---|---|"]
    for c in table.CALLS:
        checks = "; ".join("state table" if k is STATE else f"{k.arg}: {k.why} -> {result_name(c, k.rc)}"
                           for k in c.checks) or "-"
        callers = ", ".join(sorted(r.name.removeprefix("ROLE_").lower() for r in c.callers))
        wrong = "gRPC PERMISSION_DENIED" if c.wrong_caller is None else result_name(c, c.wrong_caller)
        op = f"0x{c.opcode:X}" if c.opcode else "-"
        own = ", ".join(sorted({result_name(c, r) for r in c.results})) or "-"
        out.append(f"| {c.name} | {op} | {callers} | {wrong} | {cell(checks)} | {own} |")
    states = list(next(iter(table.STATE_TABLE.values())))
    out += ["", "### Allowed calls per state (the table the dispatcher reads)", "",
            "| call | " + " | ".join(s.name for s in states) + " |",
            "|---|" + "---|" * len(states)]
    calls = {c.name: c for c in table.CALLS}
    for name, row in table.STATE_TABLE.items():
        cells = ["allowed" if row[s] is ALLOW else result_name(calls[name], row[s]) for s in states]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    disagree = [(r, DISAGREE[(r.call, r.state, r.case)]) for r in ROWS
                if r.service == svc and (r.call, r.state, r.case) in DISAGREE]
    if disagree:
        out += ["", "### Where the kernel documentation, the kernel code and the firmware disagree", "",
                "| call | state | input | pefsim | doc (ultravisor.rst) | kernel code | firmware (open Ultravisor) |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r.call} | {r.state} | {cell(r.case)} | {r.expect} | {cell(doc)} | {cell(kernel)} | {cell(fw)} |"
                for r, (doc, kernel, fw) in disagree]
    out += ["", "### Conformance rows (each one a test against the running service)", "",
            "| call | state | input | caller | result | source | and then |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in ROWS if r.service == svc):
        then = r.then[0] if r.then else ""
        out.append(f"| {r.call} | {r.state}{' (' + r.setup + ')' if r.setup else ''} | {cell(r.case)} | "
                   f"{r.caller or '-'} | {r.expect} | {cell(r.source)} | {cell(then)} |")
    return out + [""]


NOT_MODELLED = [
    "UV_RETURN's register convention (R0 = the result, R2 = SRR1, R3 = UV_RETURN) and the UV's cookie "
    "check. The exit path's split on secure_guest is modelled for H_SVM_INIT_ABORT (HRFID to the guest "
    "when secure_guest == 0, the answer to the UV otherwise: returned_to). The other hcalls the UV "
    "makes (H_SVM_INIT_START, which sets INIT_START before it can fail; H_SVM_PAGE_IN/OUT and "
    "H_SVM_INIT_DONE, which pefsim's UV makes only for a VM past INIT_START) always answer the UV.",
    "UV_WRITE_PATE, and the partition-table side of KVM_PPC_SVM_OFF (kvmppc_setup_partition_table).",
    "The firmware-only ucalls: UV_RESTRICTED_SPR_WRITE/READ, UV_READ_SCOM/UV_WRITE_SCOM, UV_READ_MEM/"
    "UV_WRITE_MEM, UV_ESMB_GET_FILE, UV_SEND_SBE_COMMAND.",
    "H_TPM_COMM (the firmware's H_SVM_TPM_COMM; pefsim's ESM blob is signed, not TPM-wrapped) and "
    "H_RANDOM (the UV does not reflect it).",
    "H_SVM_INIT_DONE failing with H_STATE (device-PFN pool exhausted in the sweep): pefsim's HV has no "
    "device-PFN limit, only the UV's pool is limited.",
    "H_SVM_INIT_START's H_UNSUPPORTED (no uvmem, a hash guest) and the KSM unmerge.",
    "The SVM page-fault path after INIT_DONE (kvmppc_book3s_radix_page_fault -> kvmppc_send_page_to_uv) "
    "and the ageing of secure pages.",
    "KVM_PPC_SVM_OFF's VPA, DTL and SLB-shadow unpinning, mmu_ready, and the HV slot arrays it does "
    "not free.",
    "migrate_vma's fallbacks (a page that cannot migrate, migrate_vma_setup failing).",
    "The firmware's flows after INIT_DONE (find_boot_vcpu, svm_fdt_finalize failing; "
    "svm_initiate_kill for an SVM already secure).",
]


def render() -> str:
    out = ["# pefsim conformance: call x state x input -> result", "",
           "Generated by `tools/gen_conformance.py` from the services' call tables "
           "(`services/*/calltable.py`) and `tests/conformance/rows.py`; do not edit. Every row below is run "
           "by `tests/conformance/` against the UV and HV cores in process and against real UV and HV "
           "processes (the other side scripted in the test), and tests check that the rows cover every call x state cell, every argument check "
           "and a wrong caller for every ucall and hcall.", "",
           "Sources: **UV code** = open-power/ultravisor; **kernel** = Linux book3s_hv_uvmem.c / "
           "book3s_hv.c; **doc** = Documentation/powerpc/ultravisor.rst; **pefsim** = a choice where "
           "the sources are silent, disagree or describe a bug (the reason is given).", "",
           "## What is modelled, and what is not", "",
           "pefsim models the merged Linux code from 5.9 on (GFN states, the INIT_DONE sweep, UV_PAGE_IN "
           "results checked); 5.5-5.8 ignored UV_PAGE_IN's result and are not modelled. The v10 "
           "INIT_ABORT proposal is an option (`--abort-return uv`). Not modelled:", "",
           *[f"- {item}" for item in NOT_MODELLED], "",
           "## Choices", ""]
    for topic, text, source in CHOICES:
        out.append(f"- **{topic}** ({source}). {text}")
    out.append("")
    out += call_section("Ultravisor (ucalls, and the SVM's loads and stores)", uv_table, "UV")
    out += call_section("Hypervisor (hcalls, and the VMM's control surface)", hv_table, "HV")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    text = render()
    if a.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print("docs/conformance.md is stale; run python tools/gen_conformance.py", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)} ({len(ROWS)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
