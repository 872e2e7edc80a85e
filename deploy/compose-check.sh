#!/usr/bin/env bash
# FOR CI (.ci/run calls it on a throwaway machine), not for a workstation: run as root, it installs
# docker.io, docker-compose and debootstrap with apt if they are missing, and starts its own dockerd
# when no engine answers. Users bring the stack up with `docker compose up` (README).
#
# The compose stack, tested on a real Docker engine: builds a local base image (debootstrap +
# docker import: no registry is reachable), the wheelhouse and the images; compose up; waits for
# health; checks least privilege (each container holds only its own key, the CA key none, the
# credential mounts read-only); runs the demo against the containers; checks the chaos harness's
# own credentials (only the operator's, removed after); every Docker-backend fault kind through
# the Docker SDK (pefsim chaos --backend docker), invariants checked, the harness's metrics served
# on the Docker bridge; checks that the stack's Prometheus scrapes every service and the harness.
#
# It touches only what it made. Its own compose project (PEFSIM_COMPOSE_PROJECT, default
# pefsim-check, not a user's `pefsim` stack): its containers, network and volumes (`down -v`), and
# the harness's containers of that project. When it started dockerd, it stops that dockerd by its
# PID (and the containerd it started) and removes what they added to the host and was not there
# before: iptables rules and chains, docker0, the project's bridge; it puts back the FORWARD policy
# and ip_forward. It keeps, as caches for the next run: its images (pefsim:compose-check,
# pefsim-prometheus:local, pefsim-base:bookworm) and the debootstrap root in /var/cache/pefsim.
# Idempotent, and it cleans up after a failure too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
PROJECT=${PEFSIM_COMPOSE_PROJECT:-pefsim-check}
BASE_IMAGE=${PEFSIM_LOCAL_BASE:-pefsim-base:bookworm}
PROM_IMAGE=pefsim-prometheus:local
CACHE=${PEFSIM_CACHE:-/var/cache/pefsim}
WORK=$(mktemp -d)
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
export PEFSIM_BASE_IMAGE=$BASE_IMAGE PEFSIM_PROMETHEUS_IMAGE=$PROM_IMAGE
export PEFSIM_IMAGE=${PEFSIM_IMAGE:-pefsim:compose-check}
# Compose v1 (Debian's docker-compose 1.29); PEFSIM_COMPOSE="docker compose" runs the same with v2
read -ra COMPOSE_CMD <<<"${PEFSIM_COMPOSE:-docker-compose}"
COMPOSE=("${COMPOSE_CMD[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml")
DOCKERD_PID=""
DOCKERD_CHILDREN=""
DOCKER0_BEFORE=""
CHAOS_LABEL="com.docker.compose.project=$PROJECT-chaos"  # the harness's containers (docker_backend.py)

say() { printf '[compose-check] %s\n' "$*"; }

# -- host state dockerd changes, to put back -------------------------------------------------------
# (iptables comes with docker.io: on a fresh machine the policy is read once it is installed)
forward_policy() { { iptables -S FORWARD 2>/dev/null || true; } | awk '/^-P FORWARD/ {print $3}'; }
iptables_rules() { for t in filter nat; do { iptables -t "$t" -S 2>/dev/null || true; } | sed "s/^/$t /"; done; }
FORWARD_POLICY=$(forward_policy)
IP_FORWARD=$(sysctl -n net.ipv4.ip_forward)
touch "$WORK/bridges"  # the bridges of this project's networks (br-<network id>), once it has them

project_bridges() {
    docker network ls -q --no-trunc --filter "label=com.docker.compose.project=$PROJECT" |
        while read -r id; do echo "br-${id:0:12}"; done >>"$WORK/bridges"
}

# What the dockerd this script started added to iptables and was not there before it started:
# its rules (deleted one by one), then its chains (flushed, then deleted). Nothing else.
restore_iptables() {
    iptables_rules | sort >"$WORK/iptables.after"
    comm -13 "$WORK/iptables.before" "$WORK/iptables.after" >"$WORK/iptables.added"
    local table rule chain
    grep -E '^[a-z]+ -A ' "$WORK/iptables.added" | grep -E 'DOCKER|docker0|br-[0-9a-f]{12}' |
        while read -r table rule; do eval "iptables -t $table ${rule/#-A/-D}" 2>/dev/null; done
    grep -E '^[a-z]+ -N ' "$WORK/iptables.added" | while read -r table _ chain; do
        iptables -t "$table" -F "$chain" 2>/dev/null; done
    grep -E '^[a-z]+ -N ' "$WORK/iptables.added" | while read -r table _ chain; do
        iptables -t "$table" -X "$chain" 2>/dev/null; done
}

cleanup() {
    local rc=$?
    set +e
    if docker info >/dev/null 2>&1; then
        project_bridges
        "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1
        docker ps -aq --filter "label=$CHAOS_LABEL" | xargs -r docker rm -f >/dev/null 2>&1
    fi
    if [[ -n $DOCKERD_PID ]]; then
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$DOCKERD_PID" 2>/dev/null
        for pid in $DOCKERD_CHILDREN; do  # the containerd it started, if it outlived it
            grep -qa containerd "/proc/$pid/cmdline" 2>/dev/null && kill "$pid" 2>/dev/null
        done
        restore_iptables
        [[ $DOCKER0_BEFORE == yes ]] || ip link delete docker0 2>/dev/null
        sort -u "$WORK/bridges" | while read -r br; do ip link delete "$br" 2>/dev/null; done
        [[ -n $FORWARD_POLICY ]] && iptables -P FORWARD "$FORWARD_POLICY"
        sysctl -qw net.ipv4.ip_forward="$IP_FORWARD"
        say "dockerd stopped; FORWARD policy ${FORWARD_POLICY:-?}, ip_forward $IP_FORWARD restored"
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT

# -- engine -------------------------------------------------------------------------------------------
need=()
for cmd in dockerd:docker.io docker-compose:docker-compose debootstrap:debootstrap; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || need+=("${cmd##*:}")
done
if ((${#need[@]})); then
    say "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[[ -n $FORWARD_POLICY ]] || FORWARD_POLICY=$(forward_policy)
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd"
    iptables_rules | sort >"$WORK/iptables.before"
    if ip link show docker0 >/dev/null 2>&1; then DOCKER0_BEFORE=yes; else DOCKER0_BEFORE=no; fi
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
    docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; exit 1; }
    DOCKERD_CHILDREN=$(pgrep -P "$DOCKERD_PID" || true)
fi

# -- images ---------------------------------------------------------------------------------------------
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [[ ! -x $CACHE/rootfs/usr/bin/python3 ]]; then
        say "debootstrap bookworm (minbase + python3)"
        rm -rf "$CACHE/rootfs"; mkdir -p "$CACHE"
        debootstrap --variant=minbase --include=python3,python3-venv,passwd bookworm "$CACHE/rootfs" \
            >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    fi
    tar -C "$CACHE/rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
fi
say "wheelhouse"
PYTHON=$PY bash deploy/docker/build-wheelhouse.sh
say "building images"
"${COMPOSE[@]}" build -q
docker build -q -t "$PROM_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    -f deploy/docker/prometheus.Dockerfile deploy/docker >/dev/null

# -- the stack ------------------------------------------------------------------------------------------
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
say "compose up (project $PROJECT)"
"${COMPOSE[@]}" up -d 2>&1 | grep -v '^Creating' || true
project_bridges
health() {  # the health of every container of a service ("healthy", "starting", ...), one a line
    docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1" |
        xargs -r docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}'
}
for svc in netproxy uv hv guest; do
    for _ in $(seq 150); do
        states=$(health "$svc")
        [[ -n $states && -z $(grep -v '^healthy$' <<<"$states") ]] && break
        sleep 0.4
    done
    [[ -n $states && -z $(grep -v '^healthy$' <<<"$states") ]] ||
        { "${COMPOSE[@]}" ps; "${COMPOSE[@]}" logs --tail 30 "$svc"; exit 1; }
done
say "healthy: netproxy, uv, hv, guests"

say "least privilege: each container holds its own key only, the CA key none, credentials read-only"
"$PY" - "$PROJECT" <<'PYEOF'
import sys
import docker

project = sys.argv[1]
client = docker.from_env()


def of(svc, running=True):
    found = client.containers.list(all=not running, filters={"label": [
        f"com.docker.compose.project={project}", f"com.docker.compose.service={svc}"]})
    assert found, f"no {svc} container in project {project}"
    return found


def held(c):
    """Credential files in a running container: every *.key anywhere, every *.pem / *.key / *.pub
    under its mounts, and which files under its mounts hold a private key (whatever their name)."""
    mounts = [m["Destination"] for m in c.attrs["Mounts"]]
    script = ('find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -type f -name "*.key" -print; '
              'for d in "$@"; do [ -d "$d" ] || continue; '
              'find "$d" -type f \\( -name "*.pem" -o -name "*.key" -o -name "*.pub" \\) -print; '
              'find "$d" -type f -size -64k -exec grep -l "PRIVATE KEY" {} + | sed "s/^/private /"; done')
    rc, out = c.exec_run(["sh", "-c", script, "sh", *mounts], user="root")
    assert rc == 0, (c.name, out)
    private = {line for line in out.decode().splitlines() if line.startswith("private ")}
    files = {line for line in out.decode().splitlines() if not line.startswith("private ")}
    return files, {p.split(" ", 1)[1] for p in private}


def tls(name):
    return {f"/tls/ca.pem", f"/tls/{name}.pem", f"/tls/{name}.key"}


expected = {  # service: (credential files, files with a private key)
    "uv": (tls("uv") | {"/keys/esm-signing.pub"}, {"/tls/uv.key"}),
    "hv": (tls("hv"), {"/tls/hv.key"}),
    "guest": (tls("guest-compose") | {"/keys/esm-signing.key", "/keys/esm-signing.pub"},
              {"/tls/guest-compose.key", "/keys/esm-signing.key"}),
    "netproxy": (set(), set()),
    "prometheus": (set(), set()),
}
for svc, (want_files, want_private) in expected.items():
    for c in of(svc):
        files, private = held(c)
        assert files == want_files, f"{c.name} holds {sorted(files)}, not {sorted(want_files)}"
        assert private == want_private, f"{c.name}: private keys in {sorted(private)}, not {sorted(want_private)}"
        for m in c.attrs["Mounts"]:
            if m["Destination"] in ("/tls", "/keys"):
                assert not m["RW"], f"{c.name}: {m['Destination']} is mounted read-write"
        print(f"[compose-check]   {c.name}: {', '.join(sorted(files)) or 'no credentials'}")

# the UV writes the pages it gives back into the HV's RAM files (docker-compose.yml says so)
(uv,) = of("uv")
data = [m for m in uv.attrs["Mounts"] if m["Destination"] == "/data"]
assert data and data[0]["RW"] and data[0]["Name"] == f"{project}_hv-data", data

# The CA key is in the one-shot keys job's volume and no service mounts that volume; and the same
# lister flags a container that does (as every container did before), so this check can fail.
(keys,) = of("keys", running=False)
assert any(m["Destination"] == "/tls" and m["Name"] == f"{project}_tls-ca" for m in keys.attrs["Mounts"])
assert not any(m.get("Name") == f"{project}_tls-ca" for svc in expected for c in of(svc)
               for m in c.attrs["Mounts"]), "a service mounts the CA's volume"
probe = client.containers.run(uv.image, ["sleep", "60"], detach=True, network_disabled=True,
                              volumes={f"{project}_tls-ca": {"bind": "/tls", "mode": "ro"}},
                              labels={"com.docker.compose.project": f"{project}-chaos"})
try:
    probe.reload()
    files, private = held(probe)
finally:
    probe.remove(force=True)
assert {"/tls/ca.key", "/tls/hv.key"} <= files & private and files != expected["uv"][0], (files, private)
print(f"[compose-check] least privilege: ca.key only in the keys job ({keys.name}); a container mounting "
      f"its volume is flagged ({len(private)} private keys)")
PYEOF

export TMPDIR=$WORK/tmp  # where the harness copies its credentials: checked empty after each command
mkdir -p "$TMPDIR"
left_behind() {
    local left
    left=$(find "$TMPDIR" -maxdepth 1 -name 'pefsim-docker-*')
    [[ -z $left ]] || { say "left behind after $1: $left"; exit 1; }
}

say "demo against the containers"
"$PY" -m pefsim demo --compose --compose-project "$PROJECT" --json --mem-mib 4 >"$WORK/demo.json"
"$PY" - "$WORK/demo.json" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
outcomes = [g["outcome"] for g in doc["guests"]]
assert outcomes == ["secure", "aborted", "terminated", "reset"], outcomes
assert all(g["memory_intact"] for g in doc["guests"]), doc
assert doc["uv_secure_pages_in_use"] == 0, doc
print("[compose-check] demo: every guest's memory intact, no secure page left")
PYEOF
left_behind "the demo"

say "the chaos harness's credentials: the operator's only, and its guests guest:harness's only"
"$PY" - "$PROJECT" <<'PYEOF'
import os, stat, sys
import docker
from pefsim.blob import make_blob
from pefsim.chaos.docker_backend import DockerBackend
from pefsim.image import GuestImage

project = sys.argv[1]
backend = DockerBackend(project=project)
try:
    backend.start()
    creds = backend.tls("operator").directory
    assert sorted(os.listdir(creds)) == ["ca.pem", "operator.key", "operator.pem"], os.listdir(creds)
    assert stat.S_IMODE(os.stat(creds / "operator.key").st_mode) & 0o077 == 0
    backend.add_guest("lpcheck", 1 << 20, make_blob(GuestImage.of_size("lpcheck", 1 << 20), backend.signing_key()))
    guest = backend.guests["lpcheck"]
    rc, out = guest.exec_run(["find", "/tls", "/keys", "-type", "f"], user="root")
    files = set(out.decode().split())
    assert files == {"/tls/ca.pem", "/tls/guest-harness.pem", "/tls/guest-harness.key"}, files
    assert [m["RW"] for m in guest.attrs["Mounts"] if m["Destination"] == "/tls"] == [False], guest.attrs["Mounts"]
finally:
    backend.stop()
assert not creds.exists(), f"{creds} left behind"
readers = docker.from_env().containers.list(all=True, filters={"label": f"com.docker.compose.project={project}-chaos"})
assert not readers, f"harness containers left: {[c.name for c in readers]}"
print(f"[compose-check] harness: {creds} held ca.pem + operator's, removed; its guest mounts {sorted(files)}")
PYEOF
left_behind "the harness check"

# The harness's metrics, for the chaos dashboard: the stack's Prometheus scrapes host.docker.internal:9109,
# the host's address on the Docker bridge (docker0): served there, not on 0.0.0.0.
BRIDGE_IP=$(docker network inspect bridge -f '{{range .IPAM.Config}}{{.Gateway}}{{end}}')
say "chaos through the Docker SDK: every fault kind (net-* through the netproxy), invariants checked, metrics on $BRIDGE_IP:9109"
# Each fault lands at an HV failpoint armed through SetFailpoint (a page-out, a page-in), so every
# run injects its fault (a fault timed by polling once missed a 64 MiB abort over shared memory)
for spec in "kill-hv abort ${PEFSIM_COMPOSE_CHAOS_RUNS:-3} 64" "pause-hv abort 1 64" "kill-guest esm 1 16" \
            "kill-uv secure 1 16" "net-reset abort 1 64" "net-blackhole esm 1 16" "net-latency abort 1 64" \
            "net-bandwidth esm 1 16"; do
    read -r fault during runs mib <<<"$spec"
    "$PY" -m pefsim chaos --backend docker --compose-project "$PROJECT" --fault "$fault" --during "$during" \
        --runs "$runs" --seed 1 --mem-mib "$mib" --pause 1 --fault-time 1 --json --results "$WORK/chaos" \
        --metrics-listen "$BRIDGE_IP:9109" >"$WORK/chaos.json"
    "$PY" - "$WORK/chaos.json" "$fault" "$during" <<'PYEOF'
import json, sys
doc = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
assert doc["violations"] == [], doc["violations"]
assert doc["faults_injected"] == doc["runs"], doc
print(f"[compose-check] chaos --backend docker --fault {sys.argv[2]} --during {sys.argv[3]}: {doc['runs']} runs, "
      f"{doc['faults_injected']} faults, 0 violations, recovery p50 {doc['recovery_s']['p50']} s")
PYEOF
    left_behind "chaos --fault $fault"
done

say "Prometheus in the stack scrapes every service, and scraped the harness"
"$PY" - <<'PYEOF'
import json, time, urllib.parse, urllib.request


def query(expr):
    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url) as r:
        return json.loads(r.read())["data"]["result"]


deadline = time.monotonic() + 60
while True:
    up = {}
    for s in query("up"):
        up.setdefault(s["metric"]["job"], []).append(s["value"][1])
    if all(up.get(job) and all(v == "1" for v in up[job]) for job in ("uv", "hv", "guest")) and len(up["guest"]) >= 2:
        break
    if time.monotonic() > deadline:
        raise SystemExit(f"[compose-check] Prometheus does not see every service up: {up}")
    time.sleep(1)
chaos_up = query('max_over_time(up{job="chaos"}[30m])')
assert chaos_up and chaos_up[0]["value"][1] == "1", f"the harness was never scraped: {chaos_up}"
runs = query('max_over_time(pefsim_chaos_runs_total{job="chaos"}[30m])')
assert runs and float(runs[0]["value"][1]) >= 1, f"no chaos run seen: {runs}"
print(f"[compose-check] Prometheus: uv, hv and {len(up['guest'])} guests up; the harness scraped on the bridge")
PYEOF

say "compose down -v"
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1
say "passed"
