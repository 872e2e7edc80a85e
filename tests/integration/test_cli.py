"""The pefsim command: up (until Ctrl-C), demo on a running stack, status, keys and blob."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pefsim.blob import load_public_key, measure, verify_blob
from pefsim.image import GuestImage
from pefsim.ops.stack import ROOT
from pefsim.timeline import load


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
            status = json.loads(pefsim("status", "--stack", str(stack_file), "-o", "json").stdout)
            if any(s["state"] == "SVM_SECURE" for s in status["uv"]["svms"]):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no secure guest on the stack: {status}")
        assert isinstance(status["uv"]["pool_pages_total"], int) and "pool_pages_reserved" in status["uv"]
        vm = status["hv"]["vms"][0]
        assert isinstance(vm["npages"], int) and vm["aborting"] is False and vm["failed"] == ""
        table = pefsim("status", "--stack", str(stack_file)).stdout
        assert "ultravisor (boot" in table and "SVM_SECURE" in table and "VM_SECURE" in table
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan whose new parent has not reaped it yet has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_relative_run_dir_works(tmp_path):
    """`pefsim demo --run-dir rd` from another directory: the services (which start in the package
    root) find rd's certificates and keys, because every path is resolved before they start."""
    out = subprocess.run([sys.executable, "-m", "pefsim", "demo", "--json", "--mem-mib", "1", "--run-dir", "rd",
                          "--on-esm-failure", "continue"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert all(g["memory_intact"] for g in summary["guests"])
    assert summary["guest_policy"] == "continue"  # the aborted guest carried on as a normal VM
    assert (tmp_path / "rd" / "stack.json").exists()


def test_sigterm_stops_every_service_it_started(tmp_path):
    """SIGTERM (a closed terminal, `timeout`, a CI cancel) stops `pefsim demo` as Ctrl-C does:
    exit 130 and no UV, HV or guest left running."""
    run_dir = tmp_path / "run"
    demo = subprocess.Popen([sys.executable, "-m", "pefsim", "demo", "--mem-mib", "1", "--run-dir", str(run_dir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stack_file, deadline = run_dir / "stack.json", time.monotonic() + 60
        while time.monotonic() < deadline and not (stack_file.exists()
                                                   and len(json.loads(stack_file.read_text())["pids"]) >= 3):
            assert demo.poll() is None, demo.stdout.read()
            time.sleep(0.05)  # a bounded poll for the services to be up
        pids = list(json.loads(stack_file.read_text())["pids"].values())
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 130
        assert "interrupted" in demo.stdout.read()
        assert [p for p in pids if _alive(p)] == []
    finally:
        if demo.poll() is None:
            demo.kill()


def test_ports_are_checked():
    for args in (("--uv-port", "99999"), ("--uv-port", "7300", "--hv-port", "7300"), ("--hv-port", "x")):
        out = pefsim("up", *args, timeout=30)
        assert out.returncode == 2 and "port" in out.stderr, out.stderr


def _up_with_a_guest(run_dir: Path, *more: str) -> tuple[subprocess.Popen, Path, list[int]]:
    up = subprocess.Popen([sys.executable, "-m", "pefsim", "up", "--guests", "1", "--mem-mib", "1",
                           "--run-dir", str(run_dir), *more], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    stack_file, deadline = run_dir / "stack.json", time.monotonic() + 60
    while time.monotonic() < deadline and not (stack_file.exists() and json.loads(stack_file.read_text())["guests"]):
        assert up.poll() is None, up.stdout.read()
        time.sleep(0.05)  # a bounded poll for the stack to be up
    info = json.loads(stack_file.read_text())
    assert info["launcher"] == up.pid
    return up, stack_file, list(info["pids"].values())


def _eventually(cond, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # a bounded poll: a signal's effect is asynchronous
    return True


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]


def test_a_supervised_stack_brings_a_killed_hv_back(tmp_path):
    """`pefsim up --supervise`: `pefsim kill hv` and the HV comes back on its data directory; the
    stack then runs the demo (an abort and a terminate) on the restarted HV. `pause` / `resume`
    stop and continue a service; an unknown one is exit 3."""
    up, stack_file, _ = _up_with_a_guest(tmp_path / "run", "--supervise")
    try:
        old = json.loads(stack_file.read_text())["pids"]["hv"]
        killed = pefsim("kill", "hv", "--stack", str(stack_file))
        assert killed.returncode == 0 and "killed" in killed.stdout, killed.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and json.loads(stack_file.read_text())["pids"]["hv"] == old:
            assert up.poll() is None, up.stdout.read()
            time.sleep(0.1)  # a bounded poll for the supervisor's restart
        new = json.loads(stack_file.read_text())["pids"]["hv"]
        assert new != old and _running(new) and not _running(old)
        assert pefsim("status", "--stack", str(stack_file)).returncode == 0
        demo = pefsim("demo", "--json", "--mem-mib", "1", "--stack", str(stack_file), timeout=180)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        uv = json.loads(stack_file.read_text())["pids"]["uv"]
        assert pefsim("pause", "uv", "--stack", str(stack_file)).returncode == 0
        assert _eventually(lambda: _state(uv) == "T")
        assert pefsim("resume", "uv", "--stack", str(stack_file)).returncode == 0
        assert _eventually(lambda: _state(uv) != "T")
        assert pefsim("kill", "nobody", "--stack", str(stack_file)).returncode == 3
        lpid = next(v["lpid"] for v in json.loads(pefsim("status", "--stack", str(stack_file), "-o", "json").stdout)
                    ["hv"]["vms"] if v["state"] == "VM_SECURE")
        touched = pefsim("vm", "touch", str(lpid), "--gpa", "0x10000", "--stack", str(stack_file))
        assert touched.returncode == 0 and "GFN_SECURE_OUT" in touched.stdout, touched.stdout + touched.stderr
        destroyed = pefsim("vm", "destroy", str(lpid), "--stack", str(stack_file))
        assert destroyed.returncode == 0 and "UV_SVM_TERMINATE -> U_SUCCESS" in destroyed.stdout, destroyed.stdout
    finally:
        pefsim("down", "--stack", str(stack_file), timeout=60)
        if up.poll() is None:
            up.kill()


def test_a_failpoint_armed_on_a_running_hv_kills_it_mid_abort(tmp_path):
    """The README's recovery story by hand: `pefsim guest add g-plain --tamper kernel` boots a guest
    whose ESM the UV aborts and prints the UV's reason; `pefsim failpoint set` arms the running HV
    to kill itself at the 3rd page it gets back while aborting g-bad; `pefsim guest add g-bad
    --tamper kernel` boots another such guest; the HV dies there, the supervisor restarts it,
    and the abort finishes: the guest is resumed with H_PARAMETER and every page intact. Refused
    specs are exit 2; `restart hv` gives a new HV; a guest does not restart."""
    up, stack_file, _ = _up_with_a_guest(tmp_path / "run", "--supervise")
    stack = ("--stack", str(stack_file))
    try:
        hv = json.loads(stack_file.read_text())["pids"]["hv"]
        armed = pefsim("failpoint", "set", "hv.abort.page_out:3@g-bad", *stack)
        assert armed.returncode == 0 and "hv.abort.page_out:3@g-bad=kill" in armed.stdout, armed.stdout + armed.stderr
        for bad in ("hv.nowhere", "hv.abort.page_out:0", "guest.before_esm", "uv.esm.before_abort=crash"):
            refused = pefsim("failpoint", "set", bad, *stack)
            assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, (bad, refused.stderr)
        plain = pefsim("guest", "add", "g-plain", "--tamper", "kernel", "--mem-mib", "1", "--report-only", *stack,
                       timeout=180)  # no failpoint for g-plain: the UV's answer, with its reason, is in before the report
        assert plain.returncode == 0 and "aborted; UV_ESM -> H_PARAMETER" in plain.stdout, plain.stdout + plain.stderr
        assert "blob-mismatch-kernel" in plain.stdout and "UV_SVM_TERMINATE         U_SUCCESS" in plain.stdout
        added = pefsim("guest", "add", "g-bad", "--tamper", "kernel", "--mem-mib", "1", "--report-only", *stack,
                       timeout=180)
        out = added.stdout
        assert added.returncode == 0, out + added.stderr
        # (the UV's reason may come after the report here: its H_SVM_INIT_ABORT waits out a backoff
        # to reach the restarted HV, and the HV resumed the guest already)
        assert "aborted; UV_ESM -> H_PARAMETER; memory intact" in out, out
        assert "UV_SVM_TERMINATE         U_SUCCESS" in out, out
        new = json.loads(stack_file.read_text())["pids"]["hv"]
        assert new != hv and _running(new) and not _running(hv), "the failpoint did not kill the HV"
        assert "hv exited (-9); restarting it" in _read_so_far(up)
        drawn = pefsim("timeline", str(stack_file.parent))  # the stack so far, g-bad's attached guest too
        assert drawn.returncode == 0 and (stack_file.parent / "timeline.html").is_file(), drawn.stdout + drawn.stderr
        names = {c.name for c in load(stack_file.parent).calls}
        assert {"H_SVM_INIT_ABORT", "UV_SVM_TERMINATE", "VcpuResume"} <= names, names
        cleared = pefsim("failpoint", "clear", "hv.abort.page_out", *stack)
        assert cleared.returncode == 2 and "not armed" in cleared.stderr  # it fired in the HV that died
        restarted = pefsim("restart", "hv", *stack, timeout=60)
        assert restarted.returncode == 0 and "recovered" in restarted.stdout, restarted.stdout + restarted.stderr
        assert json.loads(stack_file.read_text())["pids"]["hv"] not in (hv, new)
        assert pefsim("restart", "guest0", *stack).returncode == 2
        assert pefsim("status", *stack).returncode == 0
    finally:
        pefsim("down", *stack, timeout=60)
        if up.poll() is None:
            up.kill()


def _read_so_far(proc: subprocess.Popen) -> str:
    """What a running process wrote to its stdout pipe until now (without waiting for more)."""
    os.set_blocking(proc.stdout.fileno(), False)
    return proc.stdout.read() or ""


def test_down_stops_a_running_stack(tmp_path):
    """`pefsim down --stack FILE` asks the stack's launcher to stop, as Ctrl-C would: every
    service ends, and so does `pefsim up`. (`restart` needs a supervised stack: exit 3.)"""
    up, stack_file, pids = _up_with_a_guest(tmp_path / "run")
    try:
        unsupervised = pefsim("restart", "hv", "--stack", str(stack_file))
        assert unsupervised.returncode == 3 and "--supervise" in unsupervised.stderr  # nothing would start it again
        down = pefsim("down", "--stack", str(stack_file), timeout=60)
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.wait(30) == 0
        assert [p for p in pids if _alive(p)] == []
    finally:
        if up.poll() is None:
            up.kill()


def test_services_die_with_their_launcher_even_by_kill_9(tmp_path):
    """`pefsim up` killed with SIGKILL runs no cleanup; its UV, HV and guest still stop, because each
    watches a pipe only the launcher held open (nothing left holding the UV's secure pool). `pefsim
    down` on its stack file then has nothing to stop; a stack file that cannot be read is exit 3."""
    up, stack_file, pids = _up_with_a_guest(tmp_path / "run")
    up.kill()
    up.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)  # a bounded poll for the orphans to notice
    assert [p for p in pids if _running(p)] == []
    down = pefsim("down", "--stack", str(stack_file), timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert pefsim("down", "--stack", str(tmp_path / "nothing.json")).returncode == 3


def test_version_and_chaos_default_moment(tmp_path):
    """`pefsim --version`; `pefsim chaos --fault kill-guest` without --during runs the moment that
    fault has (esm), as the README's example does."""
    assert pefsim("--version").stdout.startswith("pefsim ")
    out = pefsim("chaos", "--fault", "kill-guest", "--runs", "1", "--mem-mib", "1", "--json",
                 "--results", str(tmp_path / "results"), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["runs"] == 1


def test_ordinary_mistakes_are_one_line_with_an_exit_code(tmp_path):
    """One error layer: each mistake is one line on stderr, no traceback, and an exit code a script
    can use (2: a value the command cannot use; 3: the environment: a file, a directory); --debug
    shows the traceback."""
    pub = tmp_path / "keys"
    assert pefsim("keys", "--out", str(pub)).returncode == 0
    (tmp_path / "afile").write_text("x")
    cases = [
        (("status", "--stack", str(tmp_path / "none.json")), 3, "no such file"),
        (("bench", "--guest-mib", "0.01"), 2, "multiple of 64 KiB"),
        (("blob", "--name", "g", "--mem-mib", "1", "--key", str(tmp_path / "none.key"), "-o",
          str(tmp_path / "g.blob")), 3, "no such file"),
        (("blob", "--name", "g", "--mem-mib", "1", "--key", str(pub / "esm-signing.pub"), "-o",
          str(tmp_path / "g.blob")), 2, "not an unencrypted PEM private key"),
        (("certs", "--out", str(tmp_path / "c"), "--identity", "guest:../../x"), 2, "not an identity"),
        (("chaos", "--fault", "kill-hv", "--runs", "1", "--results", str(tmp_path / "afile")), 3,
         "Not a directory"),
    ]
    for args, code, says in cases:
        out = pefsim(*args)
        assert (out.returncode, out.stderr.count("\n")) == (code, 1), (args, out.returncode, out.stderr)
        assert says in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    debug = pefsim("--debug", "status", "--stack", str(tmp_path / "none.json"))
    assert "Traceback" in debug.stderr
    bad = pefsim("bench", "--scaling", "1,x")
    assert bad.returncode == 2 and "positive integers" in bad.stderr and "Traceback" not in bad.stderr


def test_a_temporary_run_dir_is_removed_when_done(tmp_path):
    """A command that made its own run directory (it holds the stack's CA and keys) removes it when
    it succeeded; the demo here, with TMPDIR pointed at an empty directory."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = pefsim("demo", "--json", "--mem-mib", "1", env={**os.environ, "TMPDIR": str(tmp)}, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert list(tmp.iterdir()) == []
    assert json.loads(out.stdout)["guest_policy"] == "os-term"  # the default: Linux's
