"""The chaos harness (and the demo) against a running docker-compose stack, through the Docker SDK.

The compose stack is the user's (``docker-compose up``); this backend finds its containers by the
compose labels, reaches the UV and HV on their published 127.0.0.1 ports, and runs the scenario's
guests as containers of the same image on the stack's network (the HV reaches them by container
name). Faults:

* kill: the service's process is killed with SIGKILL inside its container, a crash, which the
  compose restart policy answers by restarting it (``docker kill`` would count as a manual stop,
  which Docker's restart manager never undoes); if it does not come back, it is started.
* pause: ``docker pause`` / ``docker unpause`` (the cgroup freezer).
* network (net-reset, net-blackhole, net-latency, net-bandwidth): the stack's ``netproxy``
  service sits on the HV <-> UV link; the fault is set and healed through its control socket
  (``docker exec``), so it takes effect inside the compose network.
* failpoints (kill-hv at an exact page, and the breakpoints other faults wait at): armed in
  the running service through its SetFailpoint RPC as the operator (no restart), and
  disarmed by the next restart(); a service stopped at a breakpoint is sent SIGCONT. The
  faults then land at a step, not at a moment a short abort may have finished before.

Credentials. No service container holds another's key or the CA key (docker-compose.yml: one
volume per identity, written by the one-shot keys job). This backend reads only the harness's own:
the operator's (volume ``tls-operator``) and the ESM signing key (``keys``), each through a
throwaway container that mounts that one volume read-only and never starts; its guests mount
``tls-guest-harness`` (guest:harness). What it copies to the host is removed by stop().

Metrics. The compose Prometheus scrapes the harness at ``host.docker.internal:9109`` (job
``chaos``), which in a container is the Docker bridge's address on the host (``docker0``, usually
172.17.0.1): run ``pefsim chaos --backend docker --metrics-listen 172.17.0.1:9109`` for the chaos
dashboard. Not 0.0.0.0, which would serve the harness's metrics on every interface of the host.
"""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from pefsim.ops.health import check
from pefsim.ops.stack import pid_stopped

# run inside a container (a remote engine, whose PIDs are not ours): signal the service's process
# (SIGNAL), or print "T" if it is stopped
IN_CONTAINER = ("import os, signal, sys\n"
                "for p in os.listdir('/proc'):\n"
                "    if p.isdigit() and int(p) not in (1, os.getpid()):\n"
                "        try:\n"
                "            cmd = open(f'/proc/{p}/cmdline', 'rb').read()\n"
                "            state = open(f'/proc/{p}/stat').read().rpartition(')')[2].split()[0]\n"
                "        except OSError:\n"
                "            continue\n"
                "        if b'services.' in cmd:\n"
                "            if sys.argv[1] == 'state':\n"
                "                print(state)\n"
                "            else:\n"
                "                os.kill(int(p), getattr(signal, sys.argv[1]))\n")
log = logging.getLogger("pefsim.chaos.docker")
PORTS = {"uv": 7101, "hv": 7102}
NETPROXY_CONTROL = "/tmp/netproxy.sock"  # as docker-compose.yml runs it
GUEST_LABEL = "pefsim.chaos-guest"
# docker-compose.yml's volumes the harness reads or lends (the project's name before each)
OPERATOR_TLS, GUEST_TLS, SIGNING_KEYS = "tls-operator", "tls-guest-harness", "keys"
METRICS_PORT = 9109  # deploy/prometheus/prometheus.yml: job chaos, host.docker.internal:9109


def _in_container(pid: int, container_id: str) -> bool:
    """Is host PID ``pid`` a process of this container (its cgroup names the container)?"""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            return container_id in fh.read()
    except OSError:
        return False


class DockerBackend:
    name = "docker"
    supports_failpoints = True  # through SetFailpoint: see arm()

    def __init__(self, compose_file: Path | None = None, project: str = "pefsim"):
        import docker

        self.client = docker.from_env()
        self.project = project
        self.uv_addr = self.hv_addr = ""
        self.image = None
        self.network = f"{project}_pefsim"
        self.guests: dict[str, object] = {}
        self._histories = Path(tempfile.mkdtemp(prefix="pefsim-docker-histories-"))
        self._tls_dir: Path | None = None
        self._armed: dict[str, tuple[str, ...]] = {}  # what arm() armed, per service

    # -- the compose stack -------------------------------------------------------------------------

    def container(self, svc: str):
        found = self.client.containers.list(all=True, filters={"label": [
            f"com.docker.compose.project={self.project}", f"com.docker.compose.service={svc}"]})
        if not found:
            raise RuntimeError(f"no {svc} container in compose project {self.project!r}: "
                               f"run `docker-compose -p {self.project} up -d` first")
        return found[0]

    def _published(self, svc: str) -> str:
        c = self.container(svc)
        c.reload()
        binding = c.attrs["NetworkSettings"]["Ports"].get(f"{PORTS[svc]}/tcp") or []
        if not binding:
            raise RuntimeError(f"{svc}: port {PORTS[svc]} is not published")
        return f"127.0.0.1:{binding[0]['HostPort']}"

    def _read_volume(self, volume: str, names: set[str], into: Path | None = None) -> dict[str, bytes]:
        """The files ``names`` of the stack's volume ``volume`` (compose's ``<project>_<volume>``),
        read through a container that mounts only that volume, read-only, and is never started
        (removed at once). With ``into``, they are also written there (a key stays 0600)."""
        import docker

        name = f"{self.project}_{volume}"
        try:
            self.client.volumes.get(name)
        except docker.errors.NotFound:
            raise RuntimeError(f"no volume {name}: run `docker compose -p {self.project} up -d` first "
                               f"(with this checkout's docker-compose.yml)") from None
        reader = self.client.containers.create(
            self.container("uv").image, ["true"], network_disabled=True,
            volumes={name: {"bind": "/v", "mode": "ro"}},
            labels={"com.docker.compose.project": f"{self.project}-chaos"})
        try:
            stream, _ = reader.get_archive("/v/.")
            raw = b"".join(stream)
        finally:
            reader.remove(force=True)
        out = {}
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name in names]
            for m in members:
                out[Path(m.name).name] = tar.extractfile(m).read()
                m.name = Path(m.name).name
            if into is not None:
                tar.extractall(into, members=members, filter="data")
        missing = names - out.keys()
        if missing:
            raise RuntimeError(f"volume {name} has no {', '.join(sorted(missing))}")
        return out

    def tls(self, identity: str):
        """The harness's credentials: the operator's (from the stack's ``tls-operator`` volume:
        its certificate and key and the CA certificate, nothing else), or guest:harness's for a
        guest this backend starts (``tls-guest-harness``). Copied into a directory stop() removes."""
        from pefsim.tls import Tls, file_name

        who, volume = ("guest:harness", GUEST_TLS) if identity.startswith("guest:") else (identity, OPERATOR_TLS)
        if who != "operator" and who != "guest:harness":
            raise ValueError(f"the Docker backend acts as operator or guest:harness, not {identity}")
        if self._tls_dir is None:
            self._tls_dir = Path(tempfile.mkdtemp(prefix="pefsim-docker-tls-"))
        if not (self._tls_dir / f"{file_name(who)}.key").exists():
            self._read_volume(volume, {"ca.pem", f"{file_name(who)}.pem", f"{file_name(who)}.key"},
                              into=self._tls_dir)
        return Tls(self._tls_dir, who)

    def wait_healthy(self, svc: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check(self._published(svc), timeout=1, tls=self.tls("operator"), server_role=svc):
                    return
            except RuntimeError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{svc} not serving after {timeout} s")

    def start(self) -> None:
        for svc in ("uv", "hv"):
            self.wait_healthy(svc)
        self.uv_addr, self.hv_addr = self._published("uv"), self._published("hv")
        self.image = self.container("uv").image

    def stop(self) -> dict:
        for name in list(self.guests):
            self.stop_guest(name)
        for svc, armed in list(self._armed.items()):  # the user's stack keeps running: with none of ours
            try:
                self.arm(svc, ())
            except Exception as exc:  # a service that is down has none armed; say what may be left
                log.warning("%s: could not disarm %s: %s", svc, ", ".join(armed), exc)
        for path in (self._tls_dir, self._histories):  # nothing of the run (no key) is left behind
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        self._tls_dir = None
        return {}

    def signing_key(self):
        """The stack's ESM signing key (the ``keys`` volume; the UV holds only the public key),
        read into memory, never written to the host."""
        pem = self._read_volume(SIGNING_KEYS, {"esm-signing.key"})["esm-signing.key"]
        return serialization.load_pem_private_key(pem, password=None)

    def histories(self) -> dict[str, Path]:
        """The services' call histories, copied out of their containers."""
        import docker

        out = {}
        for svc, where in (("uv", "/scratch/uv.history.jsonl"), ("hv", "/data/hv.history.jsonl")):
            path = self._histories / f"{svc}.history.jsonl"
            try:
                stream, _ = self.container(svc).get_archive(where)
                with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                    path.write_bytes(tar.extractfile(tar.getmembers()[0]).read())
            except docker.errors.NotFound:  # none written yet: an empty history for the checkers
                path.write_bytes(b"")
            out[svc] = path
        return out

    def publish_metrics(self, addr: str) -> None:
        """The compose Prometheus scrapes the harness at host.docker.internal:9109 (job "chaos"),
        the Docker bridge's address on the host: says so when ``addr`` (--metrics-listen) is not
        where that scrape lands, or is every interface."""
        host, _, port = addr.rpartition(":")
        bridge = self.bridge_address()
        want = f"{bridge or '<docker0 address>'}:{METRICS_PORT}"
        if host in ("0.0.0.0", "::", "[::]", ""):
            print(f"pefsim chaos: the harness's metrics are served on every interface ({addr}); "
                  f"--metrics-listen {want} serves them to the compose Prometheus only", file=sys.stderr)
        elif port != str(METRICS_PORT) or (bridge and host != bridge):
            print(f"pefsim chaos: the compose Prometheus scrapes the harness at {want} "
                  f"(host.docker.internal:{METRICS_PORT}), not {addr}: the chaos dashboard stays empty",
                  file=sys.stderr)

    def bridge_address(self) -> str | None:
        """The host's address on Docker's default bridge (docker0): what ``host-gateway``
        (host.docker.internal in the compose file) resolves to in a container."""
        try:
            for config in self.client.networks.get("bridge").attrs["IPAM"]["Config"] or []:
                if config.get("Gateway"):
                    return config["Gateway"]
        except Exception:  # a hint only
            return None
        return None

    # -- faults ------------------------------------------------------------------------------------

    def _host_pids(self, svc: str) -> list[int] | None:
        """The service's process IDs on this host (from ``docker top``), or None when they are not
        ours to signal (a remote engine, or a permission problem): then it is done from inside."""
        import docker

        container = self.container(svc)
        try:
            top = container.top()
        except docker.errors.APIError:  # not running (it died, and its restart has not begun): none
            return []
        col, cmd = top["Titles"].index("PID"), top["Titles"].index("CMD")
        pids = [int(p[col]) for p in top["Processes"] if "services." in p[cmd]]
        if not pids:
            return []
        local = [pid for pid in pids if _in_container(pid, container.id)]
        return local if local == pids else None

    def _signal(self, svc: str, sig: signal.Signals) -> None:
        pids = self._host_pids(svc)
        if pids is None:  # from inside: a docker exec, some 100 ms later (too late for a short abort)
            self.container(svc).exec_run(["python", "-c", IN_CONTAINER, sig.name], user="root")
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # it ended since `docker top` (its own failpoint, say)
                log.info("%s: pid %d had already ended", svc, pid)

    def kill(self, svc: str) -> None:
        """SIGKILL the service's process: from this host straight away when the engine is local,
        else from inside the container. Dead either way, as the kill wanted."""
        self._signal(svc, signal.SIGKILL)

    def pause(self, svc: str) -> None:
        self.container(svc).pause()

    def cont(self, svc: str) -> None:
        """Undo a pause (the cgroup freezer) and a breakpoint (the service's own SIGSTOP)."""
        c = self.container(svc)
        c.reload()
        if c.status == "paused":
            c.unpause()
        if c.status in ("running", "paused"):
            self._signal(svc, signal.SIGCONT)

    def stopped(self, svc: str) -> bool:
        """The service's process is stopped by SIGSTOP (state T): a failpoint's breakpoint."""
        c = self.container(svc)
        c.reload()
        if c.status != "running":
            return False
        pids = self._host_pids(svc)
        if pids is not None:
            return any(pid_stopped(pid) for pid in pids)
        _, out = c.exec_run(["python", "-c", IN_CONTAINER, "state"], user="root")
        return any(st in ("T", "t") for st in out.decode().split())

    def alive(self, svc: str) -> bool:
        """Running and serving. Polled while the service kills itself at a failpoint: a container
        caught between its process's death and its restart has no published port, and is not."""
        c = self.container(svc)
        c.reload()
        if c.status != "running":
            return False
        try:
            addr = self._published(svc)
        except RuntimeError:
            return False
        return check(addr, timeout=1, tls=self.tls("operator"), server_role=svc)

    def restart(self, svc: str, failpoints: tuple[str, ...] = ()) -> None:
        """Wait for the service to serve again (the restart policy brings a crashed one back; one
        that does not come back is started), then leave exactly ``failpoints`` armed in it."""
        deadline = time.monotonic() + 10
        c = self.container(svc)
        while time.monotonic() < deadline:  # the restart policy brings a crashed service back
            c.reload()
            if c.status == "running":
                break
            time.sleep(0.2)
        else:
            c.start()
        self.wait_healthy(svc)
        self.arm(svc, failpoints)

    def arm(self, svc: str, failpoints: tuple[str, ...]) -> None:
        """Disarm what this backend armed in the service (a process killed since has none) and arm
        ``failpoints`` through its SetFailpoint RPC, as the operator: the compose stack's service
        keeps running (the local backend starts its process again with them instead)."""
        import grpc

        from pefsim.abi import Errno
        from pefsim.v1 import common_pb2, hypervisor_pb2_grpc, ultravisor_pb2_grpc

        before = self._armed.pop(svc, ())
        if not before and not failpoints:
            return
        stub_cls = ultravisor_pb2_grpc.UltravisorServiceStub if svc == "uv" else hypervisor_pb2_grpc.HypervisorServiceStub
        with grpc.secure_channel(self._published(svc), self.tls("operator").channel_credentials(),
                                 options=[("grpc.ssl_target_name_override", svc)]) as channel:
            stub = stub_cls(channel)
            for spec in before:  # "not armed" when it fired (a kill) or the process restarted: fine
                stub.SetFailpoint(common_pb2.SetFailpointRequest(spec=spec, clear=True), timeout=10)
            for spec in failpoints:
                r = stub.SetFailpoint(common_pb2.SetFailpointRequest(spec=spec), timeout=10)
                if r.errno != Errno.OK:
                    raise ValueError(f"the {svc.upper()} refused failpoint {spec!r}: {r.error}")
        self._armed[svc] = tuple(failpoints)

    def _netproxy(self, *args: str) -> dict:
        cmd = ["python", "-m", "pefsim.chaos.proxy", "--control", NETPROXY_CONTROL, *args]
        rc, out = self.container("netproxy").exec_run(cmd)
        text = out.decode(errors="replace").strip()
        if rc != 0:
            raise RuntimeError(f"netproxy {' '.join(args)}: exit {rc}: {text}")
        return json.loads(text.splitlines()[-1])

    def net_fault(self, kind: str, value: float = 0.0) -> None:
        self._netproxy("set", kind, repr(float(value)))

    def net_heal(self) -> None:
        self._netproxy("heal")

    # -- guests --------------------------------------------------------------------------------------

    def add_guest(self, name: str, mem_bytes: int, blob: bytes, extra: tuple[str, ...] = ()) -> str:
        cname = f"{self.project}-chaos-{name}"
        command = ["python", "-m", "services.guest", "--name", name, "--hv", "hv:7102", "--uv", "uv:7101",
                   "--listen", "0.0.0.0:7103", "--advertise", f"{cname}:7103",
                   "--mem-mib", str(mem_bytes / (1 << 20)), "--blob-hex", blob.hex(),
                   "--metrics-listen", "0.0.0.0:9103", "--identity", "guest:harness", "--tls-dir", "/tls", *extra]
        container = self.client.containers.run(
            self.image, command, name=cname, detach=True, init=True, network=self.network,
            volumes={f"{self.project}_{GUEST_TLS}": {"bind": "/tls", "mode": "ro"}},  # guest:harness's only
            labels={GUEST_LABEL: "1", "com.docker.compose.project": f"{self.project}-chaos"},
            ports={"7103/tcp": ("127.0.0.1", None)})
        self.guests[name] = container
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            container.reload()
            binding = container.attrs["NetworkSettings"]["Ports"].get("7103/tcp") or []
            if binding and check(f"127.0.0.1:{binding[0]['HostPort']}", timeout=1, tls=self.tls("operator"),
                                 server_role="guest"):
                return f"127.0.0.1:{binding[0]['HostPort']}"
            if container.status == "exited":
                raise RuntimeError(f"guest {name} exited: {container.logs()[-2000:].decode(errors='replace')}")
            time.sleep(0.2)
        raise RuntimeError(f"guest {name} not serving")

    def kill_guest(self, name: str) -> None:
        self.guests[name].kill()

    def stop_guest(self, name: str) -> None:
        container = self.guests.pop(name, None)
        if container is not None:
            container.remove(force=True)
