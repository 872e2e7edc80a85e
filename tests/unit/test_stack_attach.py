"""Attaching to a running stack: a stack that runs mTLS and whose CA is missing is a clear error,
never a silent fall back to plaintext; a stack that runs insecure says so in its stack.json."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pefsim.ops.stack import ROOT, LocalStack, StackConfig, StackTlsMissing
from pefsim.tls import make_ca


def stack_file(run_dir, insecure: bool | None = None):
    """The stack.json a stack in ``run_dir`` writes (no processes: the addresses are never used)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(StackConfig(run_dir=run_dir, insecure=bool(insecure)))
    stack.uv_addr, stack.hv_addr = "127.0.0.1:1", "127.0.0.1:2"
    stack.write_stack_file()
    path = run_dir / "stack.json"
    if insecure is None:  # written before stack.json said: taken for an mTLS stack
        doc = json.loads(path.read_text())
        del doc["insecure"]
        path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("insecure", [False, None], ids=["secure", "unsaid"])
def test_attach_to_an_mtls_stack_without_its_ca_is_a_clear_error(tmp_path, insecure):
    path = stack_file(tmp_path / "run", insecure)
    with pytest.raises(StackTlsMissing) as exc:
        LocalStack.attach(path)
    message = str(exc.value)
    assert str(tmp_path / "run" / "tls" / "ca.pem") in message and "is missing" in message
    assert "pefsim up" in message and "\n" not in message


def test_attach_names_a_missing_ca_key(tmp_path):
    path = stack_file(tmp_path / "run", insecure=False)
    make_ca(tmp_path / "run" / "tls")
    (tmp_path / "run" / "tls" / "ca.key").unlink()
    with pytest.raises(StackTlsMissing, match=r"tls/ca\.key is missing"):
        LocalStack.attach(path)


def test_attach_to_an_mtls_stack_uses_its_ca(tmp_path):
    path = stack_file(tmp_path / "run", insecure=False)
    make_ca(tmp_path / "run" / "tls")
    ca = (tmp_path / "run" / "tls" / "ca.pem").read_bytes()
    stack = LocalStack.attach(path)
    assert not stack.cfg.insecure
    creds = stack.tls("operator")
    assert creds is not None and creds.ca == ca  # minted by the stack's CA, not a new one


def test_attach_to_an_insecure_stack_is_insecure(tmp_path):
    path = stack_file(tmp_path / "run", insecure=True)
    assert json.loads(path.read_text())["insecure"] is True
    stack = LocalStack.attach(path)
    assert stack.cfg.insecure and stack.tls("operator") is None
    assert not (tmp_path / "run" / "tls").exists()


def test_the_cli_says_it_in_one_line(tmp_path):
    path = stack_file(tmp_path / "run", insecure=False)
    out = subprocess.run([sys.executable, "-m", "pefsim", "status", "--stack", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("pefsim status: cannot attach") and "ca.pem is missing" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
