#!/usr/bin/env bash
# Runs pgbench through pgrelay and through PgBouncer side by side, against one local
# PostgreSQL, and prints throughput, latency, proxy CPU per 1,000 transactions and
# large-result throughput, with pgrelay/PgBouncer ratios.
#
#   benches/pgbench_compare.sh            # 10 s per run, 3 interleaved rounds
#   DURATION=5 ROUNDS=1 CLIENTS=32 benches/pgbench_compare.sh
#   STREAM_ONLY=1 benches/pgbench_compare.sh   # only the 200 MB result
#   ROUTING_ONLY=1 benches/pgbench_compare.sh  # only the routing on/off comparison
#   PREPARED_ONLY=1 benches/pgbench_compare.sh # only -M prepared against -M extended
#   BASELINE_BIN=/path/to/old/pgrelay benches/pgbench_compare.sh
#                                         # also an older pgrelay build, in the same rounds
#
# A shared 2-core machine is noisy: each workload runs PgBouncer and pgrelay
# alternately ROUNDS times and reports the medians.
#
# Needs PostgreSQL's binaries, pgbench, psql and pgbouncer (Debian: postgresql,
# pgbouncer). Builds pgrelay in release mode. Both proxies run in transaction mode with
# trust auth and a pool of 20, so the comparison is of the relay itself.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
RELAY_WORKERS=${RELAY_WORKERS:-1}   # pgrelay worker_threads
CLIENTS=${CLIENTS:-32}
POOL=${POOL:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BINDIR=${PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[ -x "$BINDIR/initdb" ] || { echo "PostgreSQL binaries not found (set PG_BINDIR)"; exit 1; }
[ -x "$PGBOUNCER" ] || { echo "pgbouncer not found (apt-get install pgbouncer)"; exit 1; }

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK=$(mktemp -d /tmp/pgrelay-bench.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
PG_PORT=$(free_port); BOUNCER_PORT=$(free_port); RELAY_PORT=$(free_port)
RELAY_PID=""; BOUNCER_PID=""; OFF_PID=""; ON_PID=""; BASE_PID=""
cleanup() {
  [ -n "$RELAY_PID" ] && kill "$RELAY_PID" 2>/dev/null || true
  [ -n "$BASE_PID" ] && kill "$BASE_PID" 2>/dev/null || true
  [ -n "$OFF_PID" ] && kill "$OFF_PID" 2>/dev/null || true
  [ -n "$ON_PID" ] && kill "$ON_PID" 2>/dev/null || true
  as_pg "$BINDIR/pg_ctl" -D "$WORK/replica" -m immediate stop >/dev/null 2>&1 || true
  [ -n "$BOUNCER_PID" ] && kill "$BOUNCER_PID" 2>/dev/null || true
  as_pg "$BINDIR/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "building pgrelay (release)..."
(cd "$ROOT" && cargo build --release --quiet)

as_pg "$BINDIR/initdb" -D "$WORK/data" -U postgres --auth=trust --no-sync >/dev/null
cat >> "$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = 200
shared_buffers = 128MB
fsync = off
synchronous_commit = off
CONF
as_pg "$BINDIR/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null

cat > "$WORK/userlist.txt" <<USERS
"postgres" ""
USERS
cat > "$WORK/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 1000
ignore_startup_parameters = extra_float_digits
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
[ "$(id -u)" = 0 ] && chown postgres "$WORK"/*
as_pg "$PGBOUNCER" -d "$WORK/pgbouncer.ini" >/dev/null 2>&1
for _ in $(seq 50); do [ -s "$WORK/pgbouncer.pid" ] && break; sleep 0.1; done
BOUNCER_PID=$(cat "$WORK/pgbouncer.pid")

# relay_config PORT ROUTING [REPLICA_PORT REPLICA_WEIGHT]
relay_config() {
  cat <<TOML
listen = ["127.0.0.1:$1"]
metrics_listen = ""
worker_threads = $RELAY_WORKERS
auth_type = "trust"
[pool]
mode = "transaction"
default_pool_size = $POOL
[routing]
enabled = $2
[[backends]]
host = "127.0.0.1"
port = $PG_PORT
[[users]]
name = "postgres"
password = "unused-with-trust"
TOML
  if [ -n "${3:-}" ]; then
    printf '[[backends]]\nhost = "127.0.0.1"\nport = %s\nweight = %s\n' "$3" "$4"
  fi
}
relay_config "$RELAY_PORT" true > "$WORK/pgrelay.toml"
PGRELAY_LOG=warn,pgrelay::listener=info "$ROOT/target/release/pgrelay" run -c "$WORK/pgrelay.toml" \
  >"$WORK/pgrelay.log" 2>&1 &
RELAY_PID=$!
BASE_PORT=""
if [ -n "${BASELINE_BIN:-}" ]; then
  BASE_PORT=$(free_port)
  relay_config "$BASE_PORT" true > "$WORK/baseline.toml"
  PGRELAY_LOG=warn "$BASELINE_BIN" run -c "$WORK/baseline.toml" >"$WORK/baseline.log" 2>&1 &
  BASE_PID=$!
fi

for port in $BOUNCER_PORT $RELAY_PORT $BASE_PORT; do
  for _ in $(seq 50); do psql -X -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
done
pgbench -i -s 10 -q -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >/dev/null 2>&1

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# run NAME PORT PID pgbench-args... -> prints "tps txns cpu_s"
run_pgbench() {
  local port=$1 pid=$2; shift 2
  local before after out
  before=$([ -n "$pid" ] && cpu_ticks "$pid" || echo 0)
  out=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -T "$DURATION" "$@" postgres 2>&1)
  after=$([ -n "$pid" ] && cpu_ticks "$pid" || echo 0)
  local tps txns lat
  tps=$(echo "$out" | awk '/^tps/ {print $3; exit}')
  txns=$(echo "$out" | awk '/number of transactions actually processed/ {split($NF,a,"/"); print a[1]; exit}')
  lat=$(echo "$out" | awk '/latency average/ {print $4; exit}')
  if echo "$out" | grep -q "number of failed transactions: [1-9]"; then echo "FAILED transactions: $out" >&2; fi
  echo "$tps $txns $(( after - before )) $lat"
}

printf '\n%-34s %12s %12s %12s %9s %22s\n' "workload (c=$CLIENTS, ${DURATION}s x$ROUNDS)" direct pgbouncer pgrelay ratio "cpu ms/1k tx b / r"
median() { sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
ms_per_1k() { awk -v c="$1" -v n="$2" -v hz="$HZ" 'BEGIN{printf "%.1f", (n>0)?c*1000/hz/n*1000:0}'; }

compare() {
  local label=$1; shift
  local d_tps d_lat b_tps=() r_tps=() b_ms=() r_ms=() b_lat=() r_lat=() o_tps=() o_ms=()
  read -r d_tps _ _ d_lat <<<"$(run_pgbench "$PG_PORT" "" "$@")"
  for _ in $(seq "$ROUNDS"); do
    if [ -n "$BASE_PID" ]; then
      read -r tps tx cpu _ <<<"$(run_pgbench "$BASE_PORT" "$BASE_PID" "$@")"
      o_tps+=("$tps"); o_ms+=("$(ms_per_1k "$cpu" "$tx")")
    fi
    read -r tps tx cpu lat <<<"$(run_pgbench "$BOUNCER_PORT" "$BOUNCER_PID" "$@")"
    b_tps+=("$tps"); b_ms+=("$(ms_per_1k "$cpu" "$tx")"); b_lat+=("$lat")
    read -r tps tx cpu lat <<<"$(run_pgbench "$RELAY_PORT" "$RELAY_PID" "$@")"
    r_tps+=("$tps"); r_ms+=("$(ms_per_1k "$cpu" "$tx")"); r_lat+=("$lat")
  done
  local bt rt bm rm bl rl
  bt=$(printf '%s\n' "${b_tps[@]}" | median); rt=$(printf '%s\n' "${r_tps[@]}" | median)
  bm=$(printf '%s\n' "${b_ms[@]}" | median); rm=$(printf '%s\n' "${r_ms[@]}" | median)
  bl=$(printf '%s\n' "${b_lat[@]}" | median); rl=$(printf '%s\n' "${r_lat[@]}" | median)
  printf '%-34s %12.0f %12.0f %12.0f %9.2f %10s / %-10s cpu ratio %.2f\n' "$label" "$d_tps" "$bt" "$rt" \
    "$(awk -v a="$rt" -v b="$bt" 'BEGIN{print a/b}')" "$bm" "$rm" \
    "$(awk -v a="$rm" -v b="$bm" 'BEGIN{print (b>0)?a/b:0}')"
  if [ -n "$BASE_PID" ]; then
    printf '%-34s %12s %12s %12.0f %9s %10s / %-10s (baseline build)\n' "  baseline pgrelay" "" "" \
      "$(printf '%s\n' "${o_tps[@]}" | median)" "" "" "$(printf '%s\n' "${o_ms[@]}" | median)"
  fi
  case "$label" in latency*) printf '%-34s %11sms %11sms %11sms\n' "  average latency (median)" "$d_lat" "$bl" "$rl";; esac
  return 0
}

# Named prepared statements in transaction mode: pgrelay only (PgBouncer before 1.21
# cannot run -M prepared in transaction mode), against -M extended.
if [ -n "${PREPARED_ONLY:-}" ]; then
  printf '\n%-34s %12s %12s %12s\n' "pgrelay, transaction mode" "-M extended" "-M prepared" ratio
  for args in "-S -c $CLIENTS -j 2" "-S -c 1 -j 1" "-N -c $CLIENTS -j 2"; do
    e_all=(); p_all=()
    for _ in $(seq "$ROUNDS"); do
      # shellcheck disable=SC2086
      read -r tps _ _ _ <<<"$(run_pgbench "$RELAY_PORT" "$RELAY_PID" $args -M extended)"; e_all+=("$tps")
      # shellcheck disable=SC2086
      read -r tps _ _ _ <<<"$(run_pgbench "$RELAY_PORT" "$RELAY_PID" $args -M prepared)"; p_all+=("$tps")
    done
    e=$(printf '%s\n' "${e_all[@]}" | median); p=$(printf '%s\n' "${p_all[@]}" | median)
    printf '%-34s %12.0f %12.0f %12.2f\n' "pgbench $args" "$e" "$p" "$(awk -v a="$p" -v b="$e" 'BEGIN{print a/b}')"
  done
  kill -TERM "$RELAY_PID"; wait "$RELAY_PID" 2>/dev/null || true; RELAY_PID=""
  sed 's/\x1b\[[0-9;]*m//g' "$WORK/pgrelay.log" | grep -o 'hits=[0-9]* misses=[0-9]*' \
    | awk -F'[= ]' '{printf "prepared statement cache: %s hits, %s misses, hit rate %.5f\n", $2, $4, $2/($2+$4)}' || true
  exit 0
fi

if [ -z "${STREAM_ONLY:-}${ROUTING_ONLY:-}" ]; then
  compare "pgbench -S simple" -S -M simple -c "$CLIENTS" -j 2
  compare "pgbench -S extended" -S -M extended -c "$CLIENTS" -j 2
  compare "pgbench -N simple" -N -M simple -c "$CLIENTS" -j 2
  compare "latency -S simple (c=1)" -S -M simple -c 1 -j 1
fi

# A 200 MB result through each path; psql discards it.
stream() {
  local port=$1 start end
  start=$(date +%s.%N)
  psql -X -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atq -o /dev/null \
    -c "SELECT repeat('x', 1000) FROM generate_series(1, 200000)"
  end=$(date +%s.%N)
  awk -v s="$start" -v e="$end" 'BEGIN{printf "%.1f", 200/(e-s)}'
}
if [ -z "${ROUTING_ONLY:-}" ]; then
d_all=(); b_all=(); r_all=()
for _ in $(seq "$ROUNDS"); do
  d_all+=("$(stream "$PG_PORT")"); b_all+=("$(stream "$BOUNCER_PORT")"); r_all+=("$(stream "$RELAY_PORT")")
done
d_mb=$(printf '%s\n' "${d_all[@]}" | median); b_mb=$(printf '%s\n' "${b_all[@]}" | median)
r_mb=$(printf '%s\n' "${r_all[@]}" | median)
printf '%-34s %10s MB/s %7s MB/s %7s MB/s  pgrelay/direct %.2f (medians)\n' "200 MB result (psql)" "$d_mb" "$b_mb" "$r_mb" \
  "$(awk -v a="$r_mb" -v b="$d_mb" 'BEGIN{print a/b}')"
fi

# Routing on against routing off: the same pgrelay build in front of the primary and a
# streaming replica. With the replica's weight at 0 every read still lands on the
# primary, so the difference is what classifying and routing each transaction costs.
if [ -z "${STREAM_ONLY:-}" ]; then
  cat >> "$WORK/data/pg_hba.conf" <<HBA
host replication all 127.0.0.1/32 trust
HBA
  as_pg "$BINDIR/pg_ctl" -D "$WORK/data" reload >/dev/null
  REPLICA_PORT=$(free_port)
  as_pg "$BINDIR/pg_basebackup" -h 127.0.0.1 -p "$PG_PORT" -U postgres -D "$WORK/replica" -R -X stream >/dev/null 2>&1
  cat >> "$WORK/replica/postgresql.conf" <<CONF
port = $REPLICA_PORT
CONF
  as_pg "$BINDIR/pg_ctl" -D "$WORK/replica" -l "$WORK/replica.log" -w start >/dev/null
  OFF_PORT=$(free_port); ON_PORT=$(free_port)
  relay_config "$OFF_PORT" false "$REPLICA_PORT" 0 > "$WORK/off.toml"
  relay_config "$ON_PORT" true "$REPLICA_PORT" 0 > "$WORK/on.toml"
  PGRELAY_LOG=warn "$ROOT/target/release/pgrelay" run -c "$WORK/off.toml" & OFF_PID=$!
  PGRELAY_LOG=warn "$ROOT/target/release/pgrelay" run -c "$WORK/on.toml" & ON_PID=$!
  for port in $OFF_PORT $ON_PORT; do
    for _ in $(seq 50); do psql -X -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
  done
  sleep 2 # the first lag measurement puts the replica in the read set
  printf '\n%-34s %12s %12s %9s %22s\n' "routing (c=$CLIENTS, ${DURATION}s x$ROUNDS)" "routing off" "routing on" ratio "cpu ms/1k tx off / on"
  route_compare() {
    local label=$1; shift
    local off_tps=() on_tps=() off_ms=() on_ms=()
    for _ in $(seq "$ROUNDS"); do
      read -r tps tx cpu _ <<<"$(run_pgbench "$OFF_PORT" "$OFF_PID" "$@")"
      off_tps+=("$tps"); off_ms+=("$(ms_per_1k "$cpu" "$tx")")
      read -r tps tx cpu _ <<<"$(run_pgbench "$ON_PORT" "$ON_PID" "$@")"
      on_tps+=("$tps"); on_ms+=("$(ms_per_1k "$cpu" "$tx")")
    done
    local a b am bm
    a=$(printf '%s\n' "${off_tps[@]}" | median); b=$(printf '%s\n' "${on_tps[@]}" | median)
    am=$(printf '%s\n' "${off_ms[@]}" | median); bm=$(printf '%s\n' "${on_ms[@]}" | median)
    printf '%-34s %12.0f %12.0f %9.2f %10s / %-10s\n' "$label" "$a" "$b" \
      "$(awk -v a="$b" -v b="$a" 'BEGIN{print a/b}')" "$am" "$bm"
  }
  route_compare "pgbench -S simple" -S -M simple -c "$CLIENTS" -j 2
  route_compare "pgbench -S extended" -S -M extended -c "$CLIENTS" -j 2
fi
