#!/usr/bin/env bash
# Builds pgrelay's image around a binary built on this machine (the Dockerfile's
# `prebuilt` stage) and runs it in front of a throwaway PostgreSQL on the host:
#
#   bash conf/docker/smoke.sh [PGRELAY_BIN]      # default target/release/pgrelay
#
# It checks that the container runs as the non-root user, answers /healthz and /readyz,
# relays psql, and that `stop` (SIGTERM) lets an open transaction commit, tells an idle
# client 57P01 and exits 0 within pool.shutdown_timeout; then that the Kubernetes
# sidecar's config serves its Unix socket without a password and the loopback with one.
# Run from the repository root, as root (PostgreSQL runs as `postgres`). Needs podman (or ENGINE=docker), PostgreSQL's
# server binaries, psql and curl. Everything listens on 127.0.0.1 (host networking).
#
# Environment:
#   ENGINE       podman (default) or docker
#   BASE_IMAGE   the runtime base (default docker.io/library/debian:bookworm-slim). With
#                MAKE_BASE=1 and no such image, one is made with debootstrap and imported
#                as localhost/debian:bookworm-slim (for machines that reach Debian's
#                mirror but no container registry).
#   ENGINE_FLAGS extra flags for the engine itself, e.g. "--runtime runc" where crun
#                refuses a cgroup v1/v2 hybrid host
#   IMAGE        an image already built (e.g. the Dockerfile's default target) to run
#                instead of building the prebuilt one; PGRELAY_BIN is then not used
#   RUN_FLAGS    extra flags for build and run, e.g. "--ulimit nofile=20000:20000" where
#                the engine's default limits exceed the host's
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${1:-target/release/pgrelay}
ENGINE=${ENGINE:-podman}
BASE_IMAGE=${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}
PG_PORT=${PG_PORT:-25432}
RELAY_PORT=${RELAY_PORT:-26432}
METRICS_PORT=${METRICS_PORT:-29930}
read -r -a engine_flags <<<"${ENGINE_FLAGS:-}"
read -r -a run_flags <<<"${RUN_FLAGS:-}"
engine() { "$ENGINE" "${engine_flags[@]}" "$@"; }
say() { echo "smoke: $*" >&2; }
fail() {
  say "FAILED: $*"
  exit 1
}

if [ -n "${IMAGE:-}" ]; then
  say "using the image $IMAGE as it is"
else
  IMAGE=localhost/pgrelay:smoke
  [ -x "$BIN" ] || fail "no pgrelay binary at $BIN (cargo build --release, or pass its path)"
  case $BIN in
    target/*) ;;
    *) fail "the binary must be under target/ (the build context's ignore file lets only it in)" ;;
  esac

  if ! engine image exists "$BASE_IMAGE" 2>/dev/null && [ "${MAKE_BASE:-}" = 1 ]; then
    BASE_IMAGE=localhost/debian:bookworm-slim
    if ! engine image exists "$BASE_IMAGE"; then
      say "making $BASE_IMAGE with debootstrap"
      rootfs=$(mktemp -d)
      debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
      rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
      tar -C "$rootfs" -c . | engine import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
      rm -rf "$rootfs"
    fi
  fi

  say "building $IMAGE (target prebuilt, base $BASE_IMAGE, binary $BIN)"
  ignore=()  # Docker finds Dockerfile.dockerignore beside the Dockerfile by itself
  # podman: its own ignore file flag, and Docker's image format, which keeps HEALTHCHECK.
  [ "$ENGINE" = podman ] && ignore=(--ignorefile conf/docker/Dockerfile.dockerignore --format docker)
  engine build -f conf/docker/Dockerfile "${ignore[@]}" \
    --target prebuilt --build-arg "RUNTIME_IMAGE=$BASE_IMAGE" --build-arg "PGRELAY_BIN=$BIN" \
    --network host "${run_flags[@]}" -t "$IMAGE" . >"${TMPDIR:-/tmp}/pgrelay-smoke-build.log" 2>&1 \
    || fail "build: $(tail -n 20 "${TMPDIR:-/tmp}/pgrelay-smoke-build.log")"
fi

work=$(mktemp -d)
container=""
cleanup() {
  [ -n "$container" ] && engine rm -f "$container" >/dev/null 2>&1
  runuser -u postgres -- "${pgbin:-/nonexistent}/pg_ctl" -D "$work/data" -m immediate stop \
    >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
chmod 755 "$work"

say "starting PostgreSQL on 127.0.0.1:$PG_PORT"
initdbs=(/usr/lib/postgresql/*/bin/initdb)
initdb=${initdbs[-1]}
[ -x "$initdb" ] || fail "no PostgreSQL server binaries (apt-get install postgresql)"
pgbin=$(dirname "$initdb")
install -d -o postgres "$work/data"
runuser -u postgres -- "$initdb" -D "$work/data" -U postgres --auth=trust >/dev/null
runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -l "$work/data/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=$work/data" \
  start >/dev/null
psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE ROLE app LOGIN PASSWORD 'app-secret'"
psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE app OWNER app"

cat >"$work/pgrelay.toml" <<EOF
listen = ["127.0.0.1:$RELAY_PORT"]
metrics_listen = "127.0.0.1:$METRICS_PORT"
log_format = "json"

[pool]
shutdown_timeout = "10s"

[[backends]]
host = "127.0.0.1"
port = $PG_PORT

[[users]]
name = "app"
password = "app-secret"
EOF
chmod 644 "$work/pgrelay.toml"

say "checking the config with the image's own binary"
engine run --rm --network host "${run_flags[@]}" \
  -v "$work/pgrelay.toml:/etc/pgrelay/pgrelay.toml:ro" "$IMAGE" \
  check --config /etc/pgrelay/pgrelay.toml >/dev/null

say "running the image"
container=$(engine run -d --network host "${run_flags[@]}" --read-only --cap-drop ALL \
  -e "PGRELAY_HEALTH_PORT=$METRICS_PORT" \
  -v "$work/pgrelay.toml:/etc/pgrelay/pgrelay.toml:ro" "$IMAGE")
for _ in $(seq 50); do
  curl -fs "http://127.0.0.1:$METRICS_PORT/readyz" >/dev/null && break
  sleep 0.2
done
curl -fs "http://127.0.0.1:$METRICS_PORT/healthz" | grep -q ok || fail "/healthz"
curl -fs "http://127.0.0.1:$METRICS_PORT/readyz" | grep -q ready || fail "/readyz"
if [ "$ENGINE" = podman ]; then
  # podman schedules health checks through systemd timers; run the image's once by hand.
  engine healthcheck run "$container" || fail "the image's HEALTHCHECK"
fi
user=$(engine exec "$container" id -u)
[ "$user" = 10001 ] || fail "the container runs as uid $user, not 10001"
[ "$(engine inspect -f '{{.Config.StopSignal}}' "$container")" = SIGTERM ] \
  || [ "$(engine inspect -f '{{.Config.StopSignal}}' "$container")" = 15 ] \
  || fail "StopSignal is not SIGTERM"

url="postgres://app:app-secret@127.0.0.1:$RELAY_PORT/app"
[ "$(psql "$url" -Atc 'SELECT 40 + 2')" = 42 ] || fail "psql through the container"
say "psql through the container: ok (uid $user)"

say "stopping it (SIGTERM) with one transaction in progress and one idle client"
psql "$url" -v ON_ERROR_STOP=1 -Atc "BEGIN" -c "SELECT pg_sleep(3)" -c "SELECT 'committed'" \
  -c "COMMIT" >"$work/busy.out" 2>&1 &
busy=$!
{ echo "SELECT 1;"; sleep 6; echo "SELECT 2;"; } | psql "$url" -At -v VERBOSITY=verbose >"$work/idle.out" 2>&1 &
idle=$!
sleep 1
started=$(date +%s)
engine stop -t 30 "$container" >/dev/null &
stopper=$!
sleep 0.5
# Draining: /readyz says 503 at once, /healthz stays 200 until the drain is over.
if curl -fs "http://127.0.0.1:$METRICS_PORT/readyz" >/dev/null; then
  fail "/readyz still says ready while draining"
fi
curl -fs "http://127.0.0.1:$METRICS_PORT/healthz" | grep -q ok \
  || fail "/healthz stopped answering while draining"
wait "$stopper"
stopped=$(($(date +%s) - started))
wait "$busy" || fail "the transaction in progress was cut: $(cat "$work/busy.out")"
grep -q committed "$work/busy.out" || fail "no commit: $(cat "$work/busy.out")"
wait "$idle" || true
grep -q "FATAL:  57P01" "$work/idle.out" \
  || fail "the idle client was not told 57P01: $(cat "$work/idle.out")"
code=$(engine inspect -f '{{.State.ExitCode}}' "$container")
[ "$code" = 0 ] || fail "exit code $code after SIGTERM; logs: $(engine logs "$container" 2>&1 | tail -5)"
[ "$stopped" -lt 10 ] || fail "stop took ${stopped}s (shutdown_timeout is 10s)"
say "idle client: $(tr '\n' ' ' <"$work/idle.out")"
say "SIGTERM drained: the transaction committed, the idle client got 57P01, exit 0 after ${stopped}s"
engine rm "$container" >/dev/null
container=""

# The Kubernetes sidecar's own config, with the database's addresses and the ports
# changed to this machine's: its Unix socket in a shared directory (an emptyDir there),
# where the application needs no password, and SCRAM on the loopback.
say "running the image with conf/kubernetes/sidecar/pgrelay.toml"
python3 - conf/kubernetes/sidecar/pgrelay.toml "$work/sidecar.toml" \
  "$PG_PORT" "$RELAY_PORT" "$METRICS_PORT" <<'PY'
import re, sys
src, dst, pg, relay, metrics = sys.argv[1:]
text = open(src).read()
blocks = text.split("[[backends]]")
text = blocks[0] + "[[backends]]" + blocks[1] + "".join(
    b[b.index("[[databases]]"):] for b in blocks[2:])  # one server here, not two
text = re.sub(r"pg-0\.pg\.db\.svc\.cluster\.local", "127.0.0.1", text)
text = text.replace("port = 5432", f"port = {pg}")
text = text.replace("127.0.0.1:6432", f"127.0.0.1:{relay}")
text = text.replace(".s.PGSQL.6432", f".s.PGSQL.{relay}")
text = text.replace("0.0.0.0:9930", f"127.0.0.1:{metrics}")
open(dst, "w").write(text)
PY
chmod 644 "$work/sidecar.toml"
psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "ALTER ROLE app PASSWORD 'change-me-app'" \
  -c "CREATE ROLE pgrelay_health LOGIN PASSWORD 'change-me-health'"
install -d -m 0777 "$work/socket"  # an emptyDir's mode
container=$(engine run -d --network host "${run_flags[@]}" --read-only --cap-drop ALL \
  -e "PGRELAY_HEALTH_PORT=$METRICS_PORT" \
  -v "$work/sidecar.toml:/etc/pgrelay/pgrelay.toml:ro" -v "$work/socket:/var/run/pgrelay" \
  "$IMAGE")
for _ in $(seq 50); do
  curl -fs "http://127.0.0.1:$METRICS_PORT/readyz" >/dev/null && break
  sleep 0.2
done
[ "$(PGPASSWORD='' psql -w -h "$work/socket" -p "$RELAY_PORT" -U app -d app -Atc 'SELECT 1')" = 1 ] \
  || fail "psql on the sidecar's Unix socket without a password"
[ "$(psql "postgres://app:change-me-app@127.0.0.1:$RELAY_PORT/app" -Atc 'SELECT 2')" = 2 ] \
  || fail "psql on the sidecar's loopback with its password"
if PGPASSWORD=wrong psql -w -h 127.0.0.1 -p "$RELAY_PORT" -U app -d app -c 'SELECT 3' \
  >/dev/null 2>&1; then
  fail "the loopback took a wrong password"
fi
engine stop -t 30 "$container" >/dev/null
[ ! -e "$work/socket/.s.PGSQL.$RELAY_PORT" ] || fail "the socket file is left after stop"
say "sidecar config: Unix socket without a password, SCRAM on the loopback, socket removed at stop"
echo "smoke: ok"
