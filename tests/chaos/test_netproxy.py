"""The fault proxy as a process of its own (the compose stack's ``netproxy``), steered through its
control socket exactly as the Docker backend does it (there, through ``docker exec``)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from pefsim.ops.stack import free_port

PROXY = [sys.executable, "-m", "pefsim.chaos.proxy"]


class Echo:
    """A TCP echo server in a thread: what the proxy forwards to."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except ConnectionError:  # the proxy cut it (a reset fault): this connection is over
                return


@pytest.fixture
def netproxy(tmp_path):
    echo = Echo()
    port = free_port()
    control = str(tmp_path / "netproxy.sock")
    proc = subprocess.Popen([*PROXY, "--control", control, "serve", "--route", f"127.0.0.1:{port}=127.0.0.1:{echo.port}"],
                            stdout=subprocess.PIPE, text=True)
    assert "control" in proc.stdout.readline()
    yield port, control
    proc.kill()
    proc.wait()
    echo.sock.close()


def steer(control: str, *args: str) -> tuple[int, dict | str]:
    out = subprocess.run([*PROXY, "--control", control, *args], capture_output=True, text=True, timeout=30)
    try:
        return out.returncode, json.loads(out.stdout)
    except json.JSONDecodeError:
        return out.returncode, out.stderr


def roundtrip(port: int, payload: bytes, timeout: float) -> bytes:
    """What comes back of ``payload`` within ``timeout`` (b"" if the proxy cut the connection)."""
    got = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(payload)
            while len(got) < len(payload) and (chunk := s.recv(65536)):
                got += chunk
    except (TimeoutError, ConnectionError):  # held (blackhole) or cut (reset): the caller checks got
        pass
    return got


def test_forwards_and_injects_each_fault(netproxy):
    port, control = netproxy
    assert roundtrip(port, b"x" * 100_000, 5) == b"x" * 100_000

    rc, answer = steer(control, "set", "blackhole")
    assert rc == 0 and answer["fault"] == "blackhole"
    assert roundtrip(port, b"held", 0.5) == b""  # nothing passes while partitioned
    assert steer(control, "heal")[0] == 0
    assert roundtrip(port, b"healed", 5) == b"healed"

    steer(control, "set", "latency", "0.3")
    t = time.monotonic()
    assert roundtrip(port, b"slow", 5) == b"slow"
    assert time.monotonic() - t >= 0.3 * 2  # both directions wait

    steer(control, "set", "reset")
    assert roundtrip(port, b"refused", 2) == b""  # closed on accept
    rc, answer = steer(control, "status")
    assert rc == 0 and answer["fault"] == "reset" and answer["bytes"] >= 200_000
    steer(control, "heal")
    assert roundtrip(port, b"back", 5) == b"back"


def test_bad_requests_get_clear_errors(netproxy):
    port, control = netproxy
    rc, err = steer(control, "set", "meteor")
    assert rc == 2 and "invalid choice" in err
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(control)
        s.sendall(b"not json\n")
        answer = json.loads(s.makefile().readline())
    assert answer["ok"] is False and "JSON" in answer["error"]
    rc, err = steer(str(control) + ".missing", "status")
    assert rc == 2 and "netproxy control" in err
    assert roundtrip(port, b"still serving", 5) == b"still serving"
