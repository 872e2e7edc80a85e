"""The pefsim command: up (until Ctrl-C), demo on a running stack, status, keys and blob."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from pefsim.blob import load_public_key, measure, verify_blob
from pefsim.image import GuestImage
from pefsim.stack import ROOT


def pefsim(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pefsim", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=kw.pop("timeout", 120), **kw)


def test_up_demo_on_it_status_and_ctrl_c(tmp_path):
    """`pefsim up` starts UV, HV and secure guests; `demo --stack` and `status --stack` use it;
    Ctrl-C stops every process cleanly."""
    run_dir = tmp_path / "run"
    up = subprocess.Popen([sys.executable, "-m", "pefsim", "up", "--guests", "1", "--mem-mib", "1",
                           "--run-dir", str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        stack_file = run_dir / "stack.json"
        while time.monotonic() < deadline:
            if stack_file.exists() and json.loads(stack_file.read_text())["guests"]:
                break
            assert up.poll() is None, up.stdout.read()
            time.sleep(0.1)
        info = json.loads(stack_file.read_text())
        pids = list(info["pids"].values())
        assert len(pids) == 3 and len(set(pids)) == 3  # uv, hv, guest: separate processes
        # the guest booted secure in the background; wait for it
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = json.loads(pefsim("status", "--stack", str(stack_file)).stdout)
            if any(s.get("state") == "SVM_SECURE" for s in status["uv"].get("svms", [])):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no secure guest on the stack: {status}")
        demo = pefsim("demo", "--json", "--mem-mib", "1", "--stack", str(stack_file), timeout=180)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        doc = json.loads(demo.stdout)
        assert [g["outcome"] for g in doc["guests"]] == ["secure", "aborted", "terminated", "reset"]
        assert doc["uv_secure_pages_in_use"] == 0  # the demo's own, on top of the stack's guest
        assert json.loads(stack_file.read_text())["pids"] == info["pids"]  # up's file untouched
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=30)
    assert up.returncode == 0, out
    assert "stopped:" in out
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"process {pid} still alive after Ctrl-C")


def test_keys_and_blob_commands(tmp_path):
    keys = pefsim("keys", "--out", str(tmp_path / "k"))
    assert keys.returncode == 0, keys.stderr
    out = tmp_path / "g.blob"
    made = pefsim("blob", "--name", "g", "--mem-mib", "1", "--key", str(tmp_path / "k/esm-signing.key"),
                  "-o", str(out))
    assert made.returncode == 0, made.stderr
    img = GuestImage.of_size("g", 1 << 20)
    verify_blob(out.read_bytes(), load_public_key(tmp_path / "k/esm-signing.pub"),
                {"kernel": measure(img.kernel_bytes()), "initrd": measure(img.initrd_bytes()),
                 "bootargs": measure(img.bootargs.encode())})
    bad = pefsim("blob", "--name", "g", "--mem-mib", "1", "--key", str(tmp_path / "k/esm-signing.key"),
                 "-o", str(out), "--tamper", "nonsense")
    assert bad.returncode != 0 and "unknown blob item" in bad.stderr


def test_bad_memory_size_is_a_clear_error():
    out = pefsim("demo", "--mem-mib", "0.01")
    assert out.returncode != 0 and "multiple of 64 KiB" in out.stderr
