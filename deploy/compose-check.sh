#!/usr/bin/env bash
# The compose stack, tested on a real Docker engine (called from .ci/run; runs on its own too).
#
#   installs docker.io, docker-compose and debootstrap (Debian) if missing; starts dockerd;
#   builds a local base image (debootstrap + docker import: no registry is reachable), the
#   wheelhouse and the images; docker-compose up; waits for health; runs the demo against the
#   containers; kills the HV mid-abort through the Docker SDK (pefsim chaos --backend docker) and
#   checks the invariants; checks that the stack's Prometheus scrapes every service; then
#   docker-compose down -v, stops dockerd and puts back what dockerd changed (FORWARD policy,
#   ip_forward, docker0, its iptables chains). Idempotent, and it cleans up after a failure too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
PROJECT=${PEFSIM_COMPOSE_PROJECT:-pefsim}
BASE_IMAGE=${PEFSIM_LOCAL_BASE:-pefsim-base:bookworm}
PROM_IMAGE=pefsim-prometheus:local
CACHE=${PEFSIM_CACHE:-/var/cache/pefsim}
WORK=$(mktemp -d)
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
export PEFSIM_BASE_IMAGE=$BASE_IMAGE PEFSIM_PROMETHEUS_IMAGE=$PROM_IMAGE
COMPOSE=(docker-compose -p "$PROJECT" -f "$ROOT/docker-compose.yml")
DOCKERD_PID=""

say() { printf '[compose-check] %s\n' "$*"; }

# -- host state dockerd changes, to put back -------------------------------------------------------
# (iptables comes with docker.io: on a fresh machine the policy is read once it is installed)
forward_policy() { { iptables -S FORWARD 2>/dev/null || true; } | awk '/^-P FORWARD/ {print $3}'; }
FORWARD_POLICY=$(forward_policy)
IP_FORWARD=$(sysctl -n net.ipv4.ip_forward)

cleanup() {
    local rc=$?
    set +e
    if docker info >/dev/null 2>&1; then
        "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1
        docker ps -aq --filter "label=pefsim.chaos-guest" | xargs -r docker rm -f >/dev/null 2>&1
    fi
    if [[ -n $DOCKERD_PID ]]; then
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$DOCKERD_PID" 2>/dev/null
        pkill -f "containerd --config /var/run/docker/containerd" 2>/dev/null
        for chain in DOCKER DOCKER-ISOLATION-STAGE-1 DOCKER-ISOLATION-STAGE-2 DOCKER-USER; do
            iptables -F "$chain" 2>/dev/null; iptables -t nat -F "$chain" 2>/dev/null
        done
        iptables -S FORWARD | grep -E '^-A FORWARD .*(DOCKER|docker0)' | sed 's/^-A/-D/' |
            while read -r rule; do eval "iptables $rule" 2>/dev/null; done
        iptables -t nat -S POSTROUTING | grep -E 'docker0|MASQUERADE -s 172\.' | sed 's/^-A/-D/' |
            while read -r rule; do eval "iptables -t nat $rule" 2>/dev/null; done
        iptables -t nat -S | grep -E '^-A (PREROUTING|OUTPUT) .*DOCKER' | sed 's/^-A/-D/' |
            while read -r rule; do eval "iptables -t nat $rule" 2>/dev/null; done
        for chain in DOCKER DOCKER-ISOLATION-STAGE-1 DOCKER-ISOLATION-STAGE-2 DOCKER-USER; do
            iptables -X "$chain" 2>/dev/null; iptables -t nat -X "$chain" 2>/dev/null
        done
        ip link delete docker0 2>/dev/null
        ip -o link show | awk -F': ' '/br-[0-9a-f]+/ {print $2}' | cut -d@ -f1 |
            while read -r br; do ip link delete "$br" 2>/dev/null; done
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
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
    docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; exit 1; }
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
say "docker-compose up"
"${COMPOSE[@]}" up -d 2>&1 | grep -v '^Creating' || true
for svc in netproxy uv hv guest; do
    for _ in $(seq 150); do
        unhealthy=$("${COMPOSE[@]}" ps "$svc" | tail -n +3 | grep -vc '(healthy)' || true)
        [[ $unhealthy == 0 ]] && break
        sleep 0.4
    done
    [[ $unhealthy == 0 ]] || { "${COMPOSE[@]}" ps; "${COMPOSE[@]}" logs --tail 30 "$svc"; exit 1; }
done
say "healthy: netproxy, uv, hv, guests"

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

say "chaos through the Docker SDK: every fault kind (net-* through the stack's netproxy), invariants checked"
# (abort runs use 64 MiB guests: through shared memory a smaller abort is over before a fault lands)
for spec in "kill-hv abort ${PEFSIM_COMPOSE_CHAOS_RUNS:-3} 64" "pause-hv abort 1 64" "kill-guest esm 1 16" \
            "kill-uv secure 1 16" "net-reset abort 1 64" "net-blackhole esm 1 16" "net-latency abort 1 64" \
            "net-bandwidth esm 1 16"; do
    read -r fault during runs mib <<<"$spec"
    "$PY" -m pefsim chaos --backend docker --compose-project "$PROJECT" --fault "$fault" --during "$during" \
        --runs "$runs" --seed 1 --mem-mib "$mib" --pause 1 --fault-time 1 --json --results "$WORK/chaos" >"$WORK/chaos.json"
    "$PY" - "$WORK/chaos.json" "$fault" "$during" <<'PYEOF'
import json, sys
doc = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
assert doc["violations"] == [], doc["violations"]
assert doc["faults_injected"] == doc["runs"], doc
print(f"[compose-check] chaos --backend docker --fault {sys.argv[2]} --during {sys.argv[3]}: {doc['runs']} runs, "
      f"{doc['faults_injected']} faults, 0 violations, recovery p50 {doc['recovery_s']['p50']} s")
PYEOF
done

say "Prometheus in the stack scrapes every service"
"$PY" - <<'PYEOF'
import json, time, urllib.request
deadline = time.monotonic() + 60
while True:
    with urllib.request.urlopen("http://127.0.0.1:9090/api/v1/query?query=up") as r:
        result = json.loads(r.read())["data"]["result"]
    up = {}
    for s in result:
        up.setdefault(s["metric"]["job"], []).append(s["value"][1])
    if all(up.get(job) and all(v == "1" for v in up[job]) for job in ("uv", "hv", "guest")) and len(up["guest"]) >= 2:
        break
    if time.monotonic() > deadline:
        raise SystemExit(f"[compose-check] Prometheus does not see every service up: {up}")
    time.sleep(1)
print(f"[compose-check] Prometheus: uv, hv and {len(up['guest'])} guests up")
PYEOF

say "docker-compose down -v"
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1
say "passed"
