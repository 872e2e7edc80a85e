"""The local stack: UV, HV and guests as separate OS processes on 127.0.0.1.

Used by ``pefsim up``, ``pefsim demo`` and the integration tests. Each service writes a ready
file (its pid and bound ports) once it serves; the launcher waits for it, and shows the tail of
the service's log if it dies first. ``stack.json`` in the run directory lets other commands
(``pefsim demo --stack``, ``pefsim status``) find a running stack.
"""
from __future__ import annotations

import json
import os
import signal
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pefsim import rpc
from pefsim.abi import PAGE_SIZE
from pefsim.blob import load_private_key, new_signing_key, save_keypair

ROOT = Path(__file__).resolve().parents[2]  # the checkout (pefsim/ops/ is two levels down)


_LIFELINE: tuple[int, int] | None = None  # (read, write) ends of this launcher's lifeline pipe


def _lifeline() -> int:
    """The read end every service this process starts gets (rpc.watch_lifeline): the write end
    stays here, unwritten, so the services stop when this process dies, even by kill -9."""
    global _LIFELINE
    if _LIFELINE is None:
        _LIFELINE = os.pipe()
    return _LIFELINE[0]


class StackError(RuntimeError):
    pass


class StackTlsMissing(StackError):
    """An attach to a stack that runs mTLS whose CA is not in its run directory. Attaching used
    to take a missing ca.pem for an insecure stack and talk plaintext to it, which a secure stack
    refuses with an obscure transport error (and an insecure one is said so in its stack.json).
    The message is one line: which file, and what to do."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a service to bind a moment later, picked below the ephemeral
    range: a port bind(0) returns comes from that range, which the kernel also hands out as the
    source port of any outgoing connection, so another process's connection could take it before
    the service binds it (seen in CI: 'Failed to bind to address')."""
    low = _ephemeral_low()
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded host: the kernel's pick
        s.bind((host, 0))
        return s.getsockname()[1]


def pid_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped by SIGSTOP (state T or t in /proc/PID/stat): a
    failpoint's breakpoint, or pause-hv. False for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] in ("T", "t")
    except OSError:  # exited in between
        return False


# A UV makes its whole secure pool resident before it serves (MADV_POPULATE_WRITE). On these VMs
# memory not touched for a while is slow to touch again: an 8 GiB pool took 25-45 s, 4 GiB 3 s.
UV_READY_S_PER_GIB = 10.0


def uv_ready_timeout(pool_pages: int) -> float:
    """How long a UV with a pool of ``pool_pages`` may take to start: 30 s and 10 s a GiB."""
    return 30.0 + UV_READY_S_PER_GIB * pool_pages * PAGE_SIZE / (1 << 30)


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    ready_path: Path
    popen: subprocess.Popen | None = None
    ready: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # on top of this process's environment
    killed: bool = False  # the last exit was a kill -9 someone asked for
    ready_timeout: float = 30.0  # how long start-up may take (wait_ready's default)

    def start(self) -> None:
        self.killed = False
        self.ready_path.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONUNBUFFERED": "1", **self.env}  # self.env may override any
        lifeline = _lifeline()
        env[rpc.LIFELINE_ENV] = str(lifeline)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, pass_fds=(lifeline,),
                                          cwd=ROOT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float | None = None) -> dict:
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_path.exists():
                self.ready = json.loads(self.ready_path.read_text())
                return self.ready
            if self.popen.poll() is not None:
                raise StackError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            time.sleep(0.02)
        raise StackError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def stopped(self) -> bool:
        """Stopped by SIGSTOP (state T in /proc): a failpoint's breakpoint, or pause-hv."""
        return self.alive and pid_stopped(self.popen.pid)

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        """kill -9, and reap it."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.killed = True
        if self.popen is not None:
            self.popen.wait()

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@dataclass
class StackConfig:
    run_dir: Path
    host: str = "127.0.0.1"
    uv_port: int = 0
    hv_port: int = 0
    pool_pages: int = 4096
    esm_copy: str = "all"
    abort_return: str = "guest"
    on_esm_failure: str = "os-term"  # what guests do after a failed UV_ESM (GuestConfig.on_esm_failure)
    metrics: bool = True
    transfer: str = "stream"  # page data between HV and UV: "stream" (bulk) or "unary" (a call a page)
    shared_memory: bool = True  # the HV offers the UV its RAM files (pages travel by address)
    proxies: bool = False  # route HV <-> UV through fault-injecting proxies (pefsim/chaos/proxy.py)
    mutants: tuple[str, ...] = ()  # deliberate bugs for every service (pefsim/faults.py)
    insecure: bool = False  # plaintext gRPC instead of mTLS (pefsim/tls.py)
    uv_args: tuple[str, ...] = ()  # more options for the UV (limits, ...)
    hv_args: tuple[str, ...] = ()  # more options for the HV (quotas, ...)
    env: dict = field(default_factory=dict)  # more environment for every service (e.g. PEFSIM_GRPC_OPTIONS)
    supervised: bool = False  # its launcher restarts a UV or HV that dies (`pefsim up --supervise`)


class LocalStack:
    """Start and stop UV, HV and guests; ``with LocalStack(cfg) as stack: ...``."""

    def __init__(self, cfg: StackConfig):
        self.cfg = cfg
        # absolute: the services start with the package root as their working directory
        self.run_dir = Path(cfg.run_dir).resolve()
        self.procs: dict[str, Proc] = {}
        self.uv_addr = self.hv_addr = ""
        self.key_dir = self.run_dir / "keys"
        self.attached = False
        self.proxy = None  # ProxyThread when cfg.proxies
        self.extra_targets: dict[str, list[str]] = {}

    @classmethod
    def attach(cls, stack_file: Path) -> "LocalStack":
        """Another process's running stack (``pefsim up``): use its UV, HV and signing key; guests
        started here are this object's own, with logs in a subdirectory of that run directory."""
        info = json.loads(Path(stack_file).read_text())
        base = Path(info["run_dir"])
        insecure = bool(info.get("insecure", False))  # a stack.json without it: an mTLS stack
        for name in () if insecure else ("ca.pem", "ca.key"):  # ca.key: this side mints its certificates
            if not (base / "tls" / name).exists():
                raise StackTlsMissing(
                    f"cannot attach to {stack_file}: {base / 'tls' / name} is missing, and the stack runs "
                    f"mTLS (stack.json has no \"insecure\": true); attach where its run directory "
                    f"{base} is readable whole, or restart the stack (`pefsim up --run-dir DIR`)")
        stack = cls(StackConfig(run_dir=base / f"attached-{os.getpid()}", insecure=insecure))
        stack.key_dir, stack.attached = base / "keys", True
        stack.uv_addr, stack.hv_addr = info["uv"], info["hv"]
        return stack

    # -- keys and certificates ------------------------------------------------------------------

    @property
    def home(self) -> Path:
        """The stack's own directory: where its services keep keys, targets and call histories
        (for an attached stack, the directory of the stack it attached to)."""
        return self.run_dir.parent if self.attached else self.run_dir

    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    def tls(self, identity: str):
        """Credentials for ``identity`` (minted by the stack's CA on first use), or None when the
        stack is insecure."""
        from pefsim.tls import Tls, make_ca, make_cert

        if self.cfg.insecure:
            return None
        if not self.attached:  # an attached stack uses its stack's CA (attach checked it), never a new one
            make_ca(self.tls_dir)
        make_cert(self.tls_dir, identity)
        return Tls(self.tls_dir, identity)

    def _tls_args(self, identity: str) -> list[str]:
        return ["--insecure"] if self.tls(identity) is None else ["--tls-dir", str(self.tls_dir)]

    def signing_key(self):
        priv = self.key_dir / "esm-signing.key"
        if not priv.exists():
            try:
                save_keypair(new_signing_key(), self.key_dir)
            except FileExistsError:  # another process made it meanwhile: that one is the stack's key
                pass
        return load_private_key(priv)

    # -- processes ------------------------------------------------------------------------------

    def _proc(self, name: str, module: str, args: list[str]) -> Proc:
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        ready = self.run_dir / f"{name}.ready"
        argv = [sys.executable, "-m", module, *args, "--ready-file", str(ready),
                "--history", str(self.run_dir / f"{name}.history.jsonl")]
        if self.cfg.metrics:
            argv += ["--metrics-listen", f"{self.cfg.host}:0"]
        env = dict(self.cfg.env)
        if self.cfg.mutants:
            env["PEFSIM_MUTANTS"] = ",".join(self.cfg.mutants)
        proc = self.procs[name] = Proc(name, argv, logs / f"{name}.log", ready, env=env)
        return proc

    def restart(self, name: str, failpoints: tuple[str, ...] = ()) -> dict:
        """Start a service again (after a kill, or to arm failpoints); waits until it serves."""
        proc = self.procs[name]
        proc.kill()
        proc.env = {k: v for k, v in proc.env.items() if k != "PEFSIM_FAILPOINTS"}
        if failpoints:
            proc.env["PEFSIM_FAILPOINTS"] = ",".join(failpoints)
        proc.start()
        ready = proc.wait_ready()
        self.write_stack_file()
        return ready

    def start(self) -> "LocalStack":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.signing_key()
        host = self.cfg.host
        self.uv_addr = f"{host}:{self.cfg.uv_port or free_port(host)}"
        self.hv_addr = f"{host}:{self.cfg.hv_port or free_port(host)}"
        uv_peer, hv_peer = self.hv_addr, self.uv_addr  # what each one dials
        if self.cfg.proxies:
            from pefsim.chaos.proxy import ProxyThread

            self.proxy = ProxyThread()
            to_hv = self.proxy.add("uv->hv", free_port(host), (host, int(self.hv_addr.rsplit(":", 1)[1])))
            to_uv = self.proxy.add("hv->uv", free_port(host), (host, int(self.uv_addr.rsplit(":", 1)[1])))
            uv_peer, hv_peer = to_hv.address, to_uv.address
        try:
            self.start_service("uv", peer=uv_peer, listen=self.uv_addr)
            self.start_service("hv", peer=hv_peer, listen=self.hv_addr)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def hv_memory_dir(self) -> Path:
        """The data directory of the HV named "hv": the one place its UV opens RAM files the HV
        offers (shared memory; pefsim/dataplane.py)."""
        return self.run_dir / "hv-data"

    def start_service(self, kind: str, peer: str, listen: str | None = None, name: str | None = None,
                      abort_return: str | None = None) -> str:
        """Start one UV ("uv") or HV ("hv") process talking to ``peer``; returns its address.
        (The conformance tests run a real service against a scripted peer this way.)"""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        listen = listen or f"{self.cfg.host}:{free_port(self.cfg.host)}"
        name = name or kind
        if kind == "uv":
            self.signing_key()
            proc = self._proc(name, "services.ultravisor", [
                "--listen", listen, "--hv", peer, "--pool-pages", str(self.cfg.pool_pages),
                "--esm-copy", self.cfg.esm_copy, "--trusted-key", str(self.key_dir / "esm-signing.pub"),
                "--transfer", self.cfg.transfer, "--hv-memory-dir", str(self.hv_memory_dir),
                *self._tls_args("uv"), *self.cfg.uv_args])
            proc.ready_timeout = uv_ready_timeout(self.cfg.pool_pages)
        else:
            proc = self._proc(name, "services.hypervisor", [
                "--listen", listen, "--uv", peer, "--data-dir", str(self.run_dir / f"{name}-data"),
                "--abort-return", abort_return or self.cfg.abort_return, "--transfer", self.cfg.transfer,
                "--shared-memory", "auto" if self.cfg.shared_memory else "off", *self._tls_args("hv"),
                *self.cfg.hv_args])
        proc.start()
        proc.wait_ready()
        self.write_stack_file()
        return listen

    def add_guest(self, name: str, mem_bytes: int, blob: bytes | None, svm: bool = True,
                  boot: bool = False, extra: tuple[str, ...] = ()) -> str:
        """Start a guest process; returns its Guest service address."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        args = ["--name", name, "--mem-mib", str(mem_bytes / (1 << 20)), "--hv", self.hv_addr,
                "--uv", self.uv_addr, "--listen", f"{self.cfg.host}:0", *self._tls_args(f"guest:{name}")]
        if blob is not None:
            path = self.run_dir / f"{name}.blob"
            path.write_bytes(blob)
            args += ["--blob", str(path)]
        if not svm:
            args.append("--no-svm")
        if boot:
            args.append("--boot")
        if self.cfg.esm_copy == "measured":
            args.append("--measured-only")
        args += ["--on-esm-failure", self.cfg.on_esm_failure, *extra]
        proc = self._proc(f"guest-{name}", "services.guest", args)
        proc.start()
        ready = proc.wait_ready()
        self.write_stack_file()
        return f"{self.cfg.host}:{ready['port']}"

    def guest_addr(self, name: str) -> str:
        return f"{self.cfg.host}:{self.procs[f'guest-{name}'].ready['port']}"

    def metrics_targets(self) -> dict[str, str]:
        return {name: f"{self.cfg.host}:{p.ready['metrics_port']}" for name, p in self.procs.items()
                if p.ready.get("metrics_port")}

    def write_stack_file(self) -> None:
        if self.attached:
            self.write_targets()
            return
        doc = {"uv": self.uv_addr, "hv": self.hv_addr, "run_dir": str(self.run_dir), "insecure": self.cfg.insecure,
               "guests": {n.removeprefix("guest-"): f"{self.cfg.host}:{p.ready.get('port')}"
                          for n, p in self.procs.items() if n.startswith("guest-")},
               "metrics": self.metrics_targets(),
               "pids": {n: p.popen.pid for n, p in self.procs.items() if p.popen},
               "launcher": os.getpid(),  # the command that started them (pefsim down asks it first)
               "supervised": self.cfg.supervised}
        tmp = self.run_dir / "stack.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
        os.replace(tmp, self.run_dir / "stack.json")
        self.write_targets()

    @property
    def target_dir(self) -> Path:
        return self.home / "targets"

    def write_targets(self, extra: dict[str, list[str]] | None = None) -> None:
        """Prometheus file_sd targets for this stack (pefsim/ops/observability.py); ``extra`` targets
        (the chaos harness) are kept for every later rewrite."""
        from pefsim.ops.observability import write_targets

        self.extra_targets.update(extra or {})
        jobs: dict[str, list[str]] = {k: list(v) for k, v in self.extra_targets.items()}
        for name, addr in self.metrics_targets().items():
            jobs.setdefault("guest" if name.startswith("guest-") else name.split("-")[0], []).append(addr)
        write_targets(self.target_dir, jobs, prefix=self.run_dir.name if self.attached else "")

    def stop(self) -> dict[str, int | None]:
        """Stop guests first, then the HV, then the UV; returns each exit code."""
        order = sorted(self.procs, key=lambda n: (n == "uv", n == "hv"))
        codes = {name: self.procs[name].stop() for name in order}
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        return codes

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
