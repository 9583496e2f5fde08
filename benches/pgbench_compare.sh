#!/usr/bin/env bash
# Runs pgbench through pgrelay and through PgBouncer side by side, against one local
# PostgreSQL, and prints throughput, latency, proxy CPU per 1,000 transactions and
# large-result throughput, with pgrelay/PgBouncer ratios; for each proxy, user and
# system CPU µs per transaction (/proc/PID/stat) and voluntary and involuntary context
# switches per transaction (/proc/PID/task/*/status, all threads); then KiB of RSS per
# idle logged-in client (IDLE_CLIENTS of them) and whether MANY_CLIENTS clients are
# all accepted and each answered `SELECT 1` (benches/idle_clients.py).
#
#   benches/pgbench_compare.sh            # 10 s per run, 3 interleaved rounds
#   DURATION=5 ROUNDS=1 CLIENTS=32 benches/pgbench_compare.sh
#   STREAM_ONLY=1 benches/pgbench_compare.sh   # only the 200 MB result
#   ROUTING_ONLY=1 benches/pgbench_compare.sh  # only the routing on/off comparison
#   PREPARED_ONLY=1 benches/pgbench_compare.sh # only -M prepared against -M extended
#   IDLE_ONLY=1 benches/pgbench_compare.sh     # only the idle and many-client runs
#   IDLE_CLIENTS=2000 MANY_CLIENTS=10000 benches/pgbench_compare.sh  # 0 skips either
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
IDLE_CLIENTS=${IDLE_CLIENTS:-2000}
MANY_CLIENTS=${MANY_CLIENTS:-10000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BINDIR=${PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[ -x "$BINDIR/initdb" ] || { echo "PostgreSQL binaries not found (set PG_BINDIR)"; exit 1; }
[ -x "$PGBOUNCER" ] || { echo "pgbouncer not found (apt-get install pgbouncer)"; exit 1; }

# Every idle client is a socket in the client script and one in the proxy.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$MANY_CLIENTS" -gt 0 ] && [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((MANY_CLIENTS + 500)) ]; then
  echo "open-files limit $(ulimit -n) is too low for MANY_CLIENTS=$MANY_CLIENTS; raise it (ulimit -Hn)"; exit 1
fi
MAX_CLIENT_CONN=$(( (MANY_CLIENTS > IDLE_CLIENTS ? MANY_CLIENTS : IDLE_CLIENTS) + 100 ))

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

# PgBouncer tracks named prepared statements in transaction mode from 1.21 on; before
# that, -M prepared runs through pgrelay only.
BOUNCER_VERSION=$("$PGBOUNCER" --version | awk 'NR == 1 {print $2}')
BOUNCER_PREPARED=""
if [ "$(printf '1.21\n%s\n' "$BOUNCER_VERSION" | sort -V | head -1)" = 1.21 ]; then
  BOUNCER_PREPARED="max_prepared_statements = 200"
fi

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
max_client_conn = $MAX_CLIENT_CONN
$BOUNCER_PREPARED
ignore_startup_parameters = extra_float_digits
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
[ "$(id -u)" = 0 ] && chown postgres "$WORK"/*
# runuser's PAM session resets the open-files limit: raise it again inside.
# shellcheck disable=SC2016
as_pg sh -c 'ulimit -n "$(ulimit -Hn)"; exec "$0" "$@"' "$PGBOUNCER" -d "$WORK/pgbouncer.ini" >/dev/null 2>&1
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
max_client_conn = $MAX_CLIENT_CONN
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

HZ=$(getconf CLK_TCK)

# proc_sample PID -> "user_ticks system_ticks voluntary involuntary": CPU time of the
# whole process, context switches summed over its threads (a thread's own counts are
# in its task status; the process's status has only the main thread's).
proc_sample() {
  if [ -z "$1" ]; then echo "0 0 0 0"; return; fi
  local user system
  read -r user system < <(awk '{print $14, $15}' "/proc/$1/stat")
  cat "/proc/$1"/task/*/status 2>/dev/null | awk -v u="$user" -v s="$system" '
    /^voluntary_ctxt_switches/ {v += $2} /^nonvoluntary_ctxt_switches/ {n += $2}
    END {print u, s, v + 0, n + 0}'
}

# run_pgbench PORT PID pgbench-args... -> "tps txns latency_ms cpu user system vol invol",
# the last five per transaction: CPU, user and system µs, voluntary and involuntary
# context switches of the proxy (zeros without a PID).
run_pgbench() {
  local port=$1 pid=$2; shift 2
  local before after out
  before=$(proc_sample "$pid")
  out=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -T "$DURATION" "$@" postgres 2>&1)
  after=$(proc_sample "$pid")
  local tps txns lat
  tps=$(echo "$out" | awk '/^tps/ {print $3; exit}')
  txns=$(echo "$out" | awk '/number of transactions actually processed/ {split($NF,a,"/"); print a[1]; exit}')
  lat=$(echo "$out" | awk '/latency average/ {print $4; exit}')
  if echo "$out" | grep -q "number of failed transactions: [1-9]"; then echo "FAILED transactions: $out" >&2; fi
  [ -n "$tps" ] || { echo "pgbench failed: $out" >&2; tps=0 txns=0 lat=0; }
  awk -v tps="$tps" -v n="$txns" -v lat="$lat" -v hz="$HZ" -v b="$before" -v a="$after" 'BEGIN {
    split(b, x, " "); split(a, y, " ")
    if (n <= 0) n = 1
    us = 1e6 / hz / n
    printf "%s %s %s %.1f %.1f %.1f %.3f %.3f\n", tps, n, lat, (y[1] - x[1] + y[2] - x[2]) * us,
      (y[1] - x[1]) * us, (y[2] - x[2]) * us, (y[3] - x[3]) / n, (y[4] - x[4]) / n }'
}

median() { sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
# column N of run_pgbench lines, the median over rounds
col() { awk -v c="$1" 'NF {print $c}' | median; }


# cost_line NAME RUNS: the proxy's median CPU split and context switches per transaction.
cost_line() {
  [ -n "$2" ] || return 0
  printf '  %-32s user %6.1f µs  system %6.1f µs  context switches %.3f voluntary %.3f involuntary\n' \
    "$1 per transaction" "$(col 5 <<<"$2")" "$(col 6 <<<"$2")" "$(col 7 <<<"$2")" "$(col 8 <<<"$2")"
}

# compare LABEL [--no-bouncer] pgbench-args...: direct once, then each proxy ROUNDS
# times, interleaved; medians.
compare() {
  local label=$1; shift
  local with_bouncer=1
  if [ "$1" = --no-bouncer ]; then with_bouncer=""; shift; fi
  local d_tps d_lat b="" r="" o=""
  read -r d_tps _ d_lat _ <<<"$(run_pgbench "$PG_PORT" "" "$@")"
  for _ in $(seq "$ROUNDS"); do
    if [ -n "$BASE_PID" ]; then o+="$(run_pgbench "$BASE_PORT" "$BASE_PID" "$@")"$'\n'; fi
    if [ -n "$with_bouncer" ]; then b+="$(run_pgbench "$BOUNCER_PORT" "$BOUNCER_PID" "$@")"$'\n'; fi
    r+="$(run_pgbench "$RELAY_PORT" "$RELAY_PID" "$@")"$'\n'
  done
  local rt rm bt=n/a bm=n/a ratio=n/a cpu_ratio=n/a
  rt=$(col 1 <<<"$r"); rm=$(col 4 <<<"$r")
  if [ -n "$b" ]; then
    bt=$(col 1 <<<"$b" | awk '{printf "%.0f", $1}'); bm=$(col 4 <<<"$b")
    ratio=$(awk -v a="$rt" -v b="$bt" 'BEGIN{printf "%.2f", (b>0)?a/b:0}')
    cpu_ratio=$(awk -v a="$rm" -v b="$bm" 'BEGIN{printf "%.2f", (b>0)?a/b:0}')
  fi
  printf '%-34s %12.0f %12s %12.0f %9s %10s / %-10s cpu ratio %s\n' "$label" "$d_tps" \
    "$bt" "$rt" "$ratio" "$bm" "$rm" "$cpu_ratio"
  if [ -n "$o" ]; then
    printf '%-34s %12s %12s %12.0f %9s %10s / %-10s (baseline build)\n' "  baseline pgrelay" "" "" \
      "$(col 1 <<<"$o")" "" "" "$(col 4 <<<"$o")"
  fi
  cost_line pgbouncer "$b"
  cost_line pgrelay "$r"
  cost_line "baseline pgrelay" "$o"
  case "$label" in latency*) printf '%-34s %11sms %11sms %11sms\n' "  average latency (median)" "$d_lat" \
    "$( [ -n "$b" ] && col 3 <<<"$b" || echo n/a)" "$(col 3 <<<"$r")";; esac
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

if [ -z "${STREAM_ONLY:-}${ROUTING_ONLY:-}${IDLE_ONLY:-}" ]; then
  printf '\n%-34s %12s %12s %12s %9s %22s\n' "workload (c=$CLIENTS, ${DURATION}s x$ROUNDS)" direct pgbouncer pgrelay ratio "cpu µs/tx b / r"
  compare "pgbench -S simple" -S -M simple -c "$CLIENTS" -j 2
  compare "pgbench -S extended" -S -M extended -c "$CLIENTS" -j 2
  if [ -n "$BOUNCER_PREPARED" ]; then
    compare "pgbench -S prepared" -S -M prepared -c "$CLIENTS" -j 2
  else
    echo "  (PgBouncer $BOUNCER_VERSION cannot run -M prepared in transaction mode: pgrelay only)"
    compare "pgbench -S prepared" --no-bouncer -S -M prepared -c "$CLIENTS" -j 2
  fi
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
if [ -z "${ROUTING_ONLY:-}${IDLE_ONLY:-}" ]; then
d_all=(); b_all=(); r_all=()
for _ in $(seq "$ROUNDS"); do
  d_all+=("$(stream "$PG_PORT")"); b_all+=("$(stream "$BOUNCER_PORT")"); r_all+=("$(stream "$RELAY_PORT")")
done
d_mb=$(printf '%s\n' "${d_all[@]}" | median); b_mb=$(printf '%s\n' "${b_all[@]}" | median)
r_mb=$(printf '%s\n' "${r_all[@]}" | median)
printf '%-34s %10s MB/s %7s MB/s %7s MB/s  pgrelay/direct %.2f (medians)\n' "200 MB result (psql)" "$d_mb" "$b_mb" "$r_mb" \
  "$(awk -v a="$r_mb" -v b="$d_mb" 'BEGIN{print a/b}')"
fi

# Idle logged-in clients: each proxy's RSS before and after IDLE_CLIENTS log in, per
# client; then MANY_CLIENTS at once, each running `SELECT 1` once all are in.
idle_run() { # NAME PORT PID CLIENTS [--select]
  local name=$1 port=$2 pid=$3 n=$4 line
  shift 4
  line=$(python3 "$ROOT/benches/idle_clients.py" --port "$port" --pid "$pid" --clients "$n" "$@") \
    || echo "$name: not every client logged in or answered (see above)" >&2
  echo "$name $line"
}
if [ -z "${STREAM_ONLY:-}${ROUTING_ONLY:-}" ]; then
  if [ "$IDLE_CLIENTS" -gt 0 ]; then
    printf '\n%-34s %12s %12s %12s %12s\n' "$IDLE_CLIENTS idle clients" "KiB/client" "RSS before" "RSS after" "login s"
    for proxy in "pgbouncer $BOUNCER_PORT $BOUNCER_PID" "pgrelay $RELAY_PORT $RELAY_PID" \
      ${BASE_PID:+"baseline-pgrelay $BASE_PORT $BASE_PID"}; do
      # shellcheck disable=SC2086
      idle_run $proxy "$IDLE_CLIENTS" | awk '{for (i = 2; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}
        printf "%-34s %12s %10s KiB %8s KiB %12s\n", $1, v["kib_per_client"], v["rss_before"], v["rss_after"], v["login_s"]}'
    done
  fi
  if [ "$MANY_CLIENTS" -gt 0 ]; then
    printf '\n%-34s %12s %12s %12s %12s\n' "$MANY_CLIENTS clients, then SELECT 1 each" "logged in" "answered" "login s" "KiB/client"
    for proxy in "pgbouncer $BOUNCER_PORT $BOUNCER_PID" "pgrelay $RELAY_PORT $RELAY_PID" \
      ${BASE_PID:+"baseline-pgrelay $BASE_PORT $BASE_PID"}; do
      # shellcheck disable=SC2086
      idle_run $proxy "$MANY_CLIENTS" --select | awk '{for (i = 2; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}
        printf "%-34s %12s %12s %12s %12s\n", $1, v["clients"], v["answered"], v["login_s"], v["kib_per_client"]}'
    done
  fi
fi

# Routing on against routing off: the same pgrelay build in front of the primary and a
# streaming replica. With the replica's weight at 0 every read still lands on the
# primary, so the difference is what classifying and routing each transaction costs.
if [ -z "${STREAM_ONLY:-}${IDLE_ONLY:-}" ]; then
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
  printf '\n%-34s %12s %12s %9s %22s\n' "routing (c=$CLIENTS, ${DURATION}s x$ROUNDS)" "routing off" "routing on" ratio "cpu µs/tx off / on"
  route_compare() {
    local label=$1; shift
    local off="" on=""
    for _ in $(seq "$ROUNDS"); do
      off+="$(run_pgbench "$OFF_PORT" "$OFF_PID" "$@")"$'\n'
      on+="$(run_pgbench "$ON_PORT" "$ON_PID" "$@")"$'\n'
    done
    local a b
    a=$(col 1 <<<"$off"); b=$(col 1 <<<"$on")
    printf '%-34s %12.0f %12.0f %9.2f %10s / %-10s\n' "$label" "$a" "$b" \
      "$(awk -v a="$b" -v b="$a" 'BEGIN{print a/b}')" "$(col 4 <<<"$off")" "$(col 4 <<<"$on")"
  }
  route_compare "pgbench -S simple" -S -M simple -c "$CLIENTS" -j 2
  route_compare "pgbench -S extended" -S -M extended -c "$CLIENTS" -j 2
fi
