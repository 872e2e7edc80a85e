"""The generated code and the protos: reproducible, linted, and the ABI numbers declared once."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from pefsim.abi import H, Hcall, U, Ucall
from pefsim.ops.stack import ROOT


def test_generated_code_is_up_to_date():
    """Regenerating pefsim/v1 from protos/ gives exactly the committed files."""
    out = subprocess.run([sys.executable, "tools/gen_protos.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_buf_lint():
    """buf lint (pinned in package.json, installed by `npm ci`) finds nothing in protos/."""
    buf = ROOT / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        if shutil.which("npm") is None:
            pytest.skip("buf needs npm: install Node.js, then `npm ci` (CI does)")
        pytest.skip("buf is not installed here: run `npm ci` (CI does)")
    out = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_abi_numbers():
    """Spot-check the ABI's numeric values against the protocol reference."""
    assert Ucall.UV_ESM == 0xF110 and Ucall.UV_SVM_TERMINATE == 0xF13C
    assert Hcall.H_SVM_PAGE_IN == 0xEF00 and Hcall.H_SVM_INIT_ABORT == 0xEF14
    assert (H.H_PARAMETER, H.H_STATE, H.H_UNSUPPORTED, H.H_AUTHORITY, H.H_P3) == (-4, -75, -67, -10, -56)
    assert (U.U_P5, U.U_RETRY, U.U_STATE, U.U_PERMISSION, U.U_BUSY) == (-58, -5, -75, -11, 1)


NUMBER = re.compile(r"\b(0x[Ee][Ff]|0x[Ff]1)[0-9A-Fa-f]{2}\b|\bH_[A-Z0-9_]+\s*=\s*-?\d|\bU_[A-Z0-9_]+\s*=\s*-?\d")


def test_no_abi_number_outside_the_protos():
    """No opcode literal (0xF1xx / 0xEFxx) or return-code assignment appears in Python code: every
    one is read from protos/pefsim/v1/abi.proto by name."""
    offenders = []
    for path in list((ROOT / "pefsim").rglob("*.py")) + list((ROOT / "services").rglob("*.py")):
        if "v1" in path.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if NUMBER.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_ruff():
    """ruff (pinned in requirements-dev.txt) finds no unused names, undefined names or syntax errors."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
