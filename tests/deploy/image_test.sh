#!/usr/bin/env bash
# The container image end to end: builds it from a kiln binary (deploy/docker/build-image.sh, no
# registry needed), runs it with models/repository mounted read-only, waits for Docker's health
# status to be `healthy` (the image's HEALTHCHECK, `kiln health`), runs the Triton client tests
# (crates/kiln-serve/tests/python/tritonclient_test.py --http/--grpc/--metrics) against the
# container, stops it with `docker stop -t 10` while clients keep sending (every accepted request
# answered, exit code 0, the drain in its log), and checks that the server ran as uid/gid 65532.
#
#   tests/deploy/image_test.sh [KILN_BINARY]     default: ${CARGO_TARGET_DIR:-target}/debug/kiln
#
# Needs root for dockerd: installs docker.io with apt when dockerd is missing, and starts dockerd
# (--iptables=false --ip6tables=false --bridge=none --storage-driver=vfs, log in a temp file) when
# no daemon answers; a daemon it started is stopped at exit. The container uses the host network
# (--network host) on three free ports. The image and container are removed at exit.
# Environment: KILN_IMAGE_TEST_HEALTH_TIMEOUT (seconds to wait for `healthy`, default 90).
# Prints one summary line; exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
t_start=$SECONDS

# A relative path (the argument, or CARGO_TARGET_DIR as cargo took it) is relative to where the
# script was started.
BINARY="${1:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/kiln}"
[[ "$BINARY" == /* ]] || BINARY="$PWD/$BINARY"
cd "$ROOT"
HEALTH_TIMEOUT="${KILN_IMAGE_TEST_HEALTH_TIMEOUT:-90}"
NAME="kiln-image-test-$$"
TAG="kiln-image-test:$$"

log() { printf 'image_test: %s\n' "$*" >&2; }
fail() {
  log "FAIL: $*"
  exit 1
}

work="$(mktemp -d "${TMPDIR:-/tmp}/kiln-image-test.XXXXXX")"
dockerd_pid=""
container_started=0
image_built=0
cleanup() {
  local rc=$?
  if [[ $container_started == 1 ]]; then
    docker rm -f "$NAME" >/dev/null 2>&1 || true
  fi
  if [[ $image_built == 1 ]]; then
    docker rmi -f "$TAG" >/dev/null 2>&1 || true
  fi
  if [[ -n "$dockerd_pid" ]]; then
    kill -TERM "$dockerd_pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
      kill -0 "$dockerd_pid" 2>/dev/null || break
      sleep 0.5
    done
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

[[ -x "$BINARY" ]] || fail "$BINARY is not an executable (build it: cargo build -p kiln-cli)"

# Docker: install and start the daemon when needed.
if ! command -v dockerd >/dev/null 2>&1; then
  [[ $(id -u) == 0 ]] || fail "dockerd is missing and installing docker.io needs root"
  log "installing docker.io (apt)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >&2
fi
if ! docker info >/dev/null 2>&1; then
  [[ $(id -u) == 0 ]] || fail "no Docker daemon answers and starting one needs root"
  log "starting dockerd (log: $work/dockerd.log)"
  dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs \
    >"$work/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || { tail -n 20 "$work/dockerd.log" >&2; fail "dockerd exited"; }
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { tail -n 20 "$work/dockerd.log" >&2; fail "dockerd did not answer within 30s"; }
fi

VENV="$(bash scripts/setup-python.sh serve </dev/null | tail -n 1)"
PY="$VENV/bin/python"

# The image.
t0=$SECONDS
image_built=1
built="$(bash deploy/docker/build-image.sh --binary "$BINARY" --tag "$TAG" | tail -n 1)" ||
  fail "build-image.sh failed"
t_build=$((SECONDS - t0))
size_mb="$(awk '{print $2}' <<<"$built")"
log "built $built in ${t_build}s"

# What the image declares.
expect_config() {
  local what="$1" want="$2" got
  got="$(docker image inspect -f "$what" "$TAG")"
  [[ "$got" == "$want" ]] || fail "image $what is '$got', want '$want'"
}
expect_config '{{.Config.User}}' '65532:65532'
expect_config '{{json .Config.Entrypoint}}' '["/usr/local/bin/kiln","serve"]'
expect_config '{{json .Config.Cmd}}' '["--model-repository","/models"]'
expect_config '{{json .Config.Healthcheck.Test}}' '["CMD","/usr/local/bin/kiln","health"]'
expect_config '{{.Config.StopSignal}}' 'SIGTERM'
expect_config '{{json .Config.ExposedPorts}}' '{"8000/tcp":{},"8001/tcp":{},"8002/tcp":{}}'
expect_config '{{json .Config.Volumes}}' '{"/models":{}}'

# Three free ports on the host (the container shares its network).
read -r HTTP_PORT GRPC_PORT METRICS_PORT < <("$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
)

# The container: ports through the KILN_* variables (the HEALTHCHECK's `kiln health` reads
# KILN_HTTP_PORT too); the health interval is shortened so that the test does not wait 10s per probe.
t0=$SECONDS
docker run -d --name "$NAME" --network host \
  -v "$ROOT/models/repository:/models:ro" \
  -e KILN_HOST=127.0.0.1 -e KILN_HTTP_PORT="$HTTP_PORT" -e KILN_GRPC_PORT="$GRPC_PORT" \
  -e KILN_METRICS_PORT="$METRICS_PORT" \
  --health-interval 1s --health-timeout 5s --health-retries 3 \
  "$TAG" >/dev/null
container_started=1

show_logs() {
  log "docker logs $NAME:"
  docker logs "$NAME" 2>&1 | tail -n 40 | sed 's/^/    /' >&2
  log "health probes:"
  docker inspect -f '{{range .State.Health.Log}}{{.ExitCode}} {{.Output}}{{end}}' "$NAME" 2>&1 |
    tail -n 10 | sed 's/^/    /' >&2 || true
}

status=""
for _ in $(seq 1 $((HEALTH_TIMEOUT * 2))); do
  status="$(docker inspect -f '{{.State.Health.Status}}' "$NAME")"
  [[ "$status" == healthy ]] && break
  if [[ "$(docker inspect -f '{{.State.Running}}' "$NAME")" != true ]]; then
    show_logs
    fail "the container exited (code $(docker inspect -f '{{.State.ExitCode}}' "$NAME")) before it was healthy"
  fi
  sleep 0.5
done
if [[ "$status" != healthy ]]; then
  show_logs
  fail "the container is '$status', not healthy, after ${HEALTH_TIMEOUT}s"
fi
t_healthy=$((SECONDS - t0))
# The latest probe: `kiln health` exited 0 and said which URL answered 200.
probe="$(docker inspect -f '{{json .State.Health.Log}}' "$NAME" |
  "$PY" -c 'import json, sys; p = json.load(sys.stdin)[-1]; print(p["ExitCode"], p["Output"].strip())')"
[[ "$probe" == "0 http://127.0.0.1:$HTTP_PORT/v2/health/ready: HTTP 200 OK"* ]] ||
  fail "unexpected health probe result: $probe"
log "healthy after ${t_healthy}s (probe: $probe)"

# The server process: uid and gid 65532, as seen from the host.
pid="$(docker inspect -f '{{.State.Pid}}' "$NAME")"
[[ "$pid" =~ ^[0-9]+$ && "$pid" != 0 ]] || fail "no pid for the container: '$pid'"
uids="$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")"
gids="$(awk '/^Gid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")"
[[ "$uids" == "65532 65532 65532 65532" ]] || fail "the server runs with uids '$uids', want 65532"
[[ "$gids" == "65532 65532 65532 65532" ]] || fail "the server runs with gids '$gids', want 65532"
exe="$(readlink "/proc/$pid/exe")"
[[ "$exe" == /usr/local/bin/kiln ]] || fail "pid $pid runs '$exe', not /usr/local/bin/kiln"

# The client tests against the container, then `docker stop` under load as the last test.
t0=$SECONDS
set +e
"$PY" crates/kiln-serve/tests/python/tritonclient_test.py \
  --http "127.0.0.1:$HTTP_PORT" --grpc "127.0.0.1:$GRPC_PORT" --metrics "127.0.0.1:$METRICS_PORT" \
  --stop-command "docker stop -t 10 $NAME" </dev/null 2>&1 | tee "$work/client.txt"
client_rc=${PIPESTATUS[0]}
set -e
t_client=$((SECONDS - t0))
client_summary="$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$work/client.txt" | tail -n 1)"
if [[ $client_rc != 0 ]]; then
  show_logs
  fail "client tests: ${client_summary:-no summary} (exit $client_rc)"
fi
stop_took="$(grep -oE "'docker stop -t 10 [^']*' took [0-9.]+s" "$work/client.txt" | grep -oE '[0-9.]+s$' || true)"
[[ -n "$stop_took" ]] || fail "the client test did not report how long docker stop took"

# The stop: SIGTERM, drained, exit 0 well before docker stop's 10s SIGKILL.
[[ "$(docker inspect -f '{{.State.Running}}' "$NAME")" == false ]] || fail "the container still runs after docker stop"
code="$(docker inspect -f '{{.State.ExitCode}}' "$NAME")"
oom="$(docker inspect -f '{{.State.OOMKilled}}' "$NAME")"
[[ "$code" == 0 && "$oom" == false ]] || { show_logs; fail "exit code $code (OOM killed: $oom), want 0"; }
logs="$(docker logs "$NAME" 2>&1)"
grep -q 'shutting down: draining in-flight requests' <<<"$logs" || { show_logs; fail "no drain in the log"; }
grep -q 'stopped' <<<"$logs" || { show_logs; fail "no 'stopped' in the log"; }
awk -v t="${stop_took%s}" 'BEGIN { exit !(t < 8) }' ||
  fail "docker stop took ${stop_took}: the server did not exit well within the 10s timeout"

echo "image_test: PASS: image $TAG (${size_mb} MB) built in ${t_build}s, healthy in ${t_healthy}s, client tests ${client_summary} in ${t_client}s, docker stop drained in ${stop_took} with exit 0, uid/gid 65532, total $((SECONDS - t_start))s"
