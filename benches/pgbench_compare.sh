#!/usr/bin/env bash
# Runs pgbench through pgrelay and through PgBouncer side by side, against one local
# PostgreSQL, and prints throughput, latency, proxy CPU per 1,000 transactions and
# large-result throughput, with pgrelay/PgBouncer ratios; for each proxy, user and
# system CPU µs per transaction (/proc/PID/stat) and voluntary and involuntary context
# switches per transaction (/proc/PID/task/*/status, all threads); then KiB of RSS per
# idle logged-in client (IDLE_CLIENTS of them) and whether MANY_CLIENTS clients are
# all accepted and each answered `SELECT 1` (benches/idle_clients.py); then a SCRAM
# login storm: LOGIN_CLIENTS clients logging in at once through a PgBouncer and a
# pgrelay that both require scram-sha-256, timed until every one has ReadyForQuery,
# with each proxy's CPU seconds (benches/login_storm.py); then pgrelay with
# worker_threads = 1 against 2 (and PgBouncer) under `pgbench -S -M simple`; then TLS
# from clients: a PgBouncer (client_tls_sslmode = require) and a pgrelay
# (client_mode = "require") with a throwaway CA and server certificate made by the
# openssl CLI in the temp dir, against the plain pair: the 200 MB result (MB/s and
# proxy CPU s per GB), `pgbench -S -M simple` with PGSSLMODE=require, and a SCRAM login
# storm of TLS_CLIENTS clients, each sending SSLRequest and handshaking first.
#
#   benches/pgbench_compare.sh            # 10 s per run, 3 interleaved rounds
#   DURATION=5 ROUNDS=1 CLIENTS=32 benches/pgbench_compare.sh
#   MAIN_ONLY=1 benches/pgbench_compare.sh     # only the pgbench workloads (-S, -N, c=1)
#   STREAM_ONLY=1 benches/pgbench_compare.sh   # only the 200 MB result
#   ROUTING_ONLY=1 benches/pgbench_compare.sh  # only the routing on/off comparison
#   PREPARED_ONLY=1 benches/pgbench_compare.sh # only -M prepared against -M extended
#   IDLE_ONLY=1 benches/pgbench_compare.sh     # only the idle and many-client runs
#   IDLE_CLIENTS=2000 MANY_CLIENTS=10000 benches/pgbench_compare.sh  # 0 skips either
#   LOGIN_ONLY=1 benches/pgbench_compare.sh    # only the SCRAM login storm
#   LOGIN_CLIENTS=2000 LOGIN_SECRET=scram benches/pgbench_compare.sh
#                                         # the proxies hold the SCRAM secret from
#                                         # pg_authid (scram) or the password (plain)
#   WORKERS_ONLY=1 benches/pgbench_compare.sh  # only worker_threads = 1 against 2
#   TLS_ONLY=1 benches/pgbench_compare.sh      # only TLS from clients against plain
#   TLS_CLIENTS=500 TLS_KEY=ec benches/pgbench_compare.sh
#                                         # the TLS login storm's size (0 skips it) and
#                                         # the server key: ec (P-256) or rsa (2048 bits)
#   BASELINE_BIN=/path/to/old/pgrelay benches/pgbench_compare.sh
#                                         # also an older pgrelay build, in the same rounds
#
# A shared 2-core machine is noisy: each workload runs PgBouncer and pgrelay
# alternately ROUNDS times and reports the medians.
#
# Needs PostgreSQL's binaries, pgbench, psql and pgbouncer (Debian: postgresql,
# pgbouncer). Builds pgrelay in release mode. Both proxies run in transaction mode with
# trust auth and a pool of 20, so the comparison is of the relay itself; the login storm
# has its own pair of proxies requiring scram-sha-256, neither logging each connection.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
RELAY_WORKERS=${RELAY_WORKERS:-1}   # pgrelay worker_threads
CLIENTS=${CLIENTS:-32}
POOL=${POOL:-20}
IDLE_CLIENTS=${IDLE_CLIENTS:-2000}
MANY_CLIENTS=${MANY_CLIENTS:-10000}
LOGIN_CLIENTS=${LOGIN_CLIENTS:-2000}
LOGIN_SECRET=${LOGIN_SECRET:-scram}   # scram | plain: what the proxies store for the storm's user
TLS_CLIENTS=${TLS_CLIENTS:-500}
TLS_KEY=${TLS_KEY:-ec}                # ec | rsa: the throwaway server certificate's key
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BINDIR=${PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[ -x "$BINDIR/initdb" ] || { echo "PostgreSQL binaries not found (set PG_BINDIR)"; exit 1; }
[ -x "$PGBOUNCER" ] || { echo "pgbouncer not found (apt-get install pgbouncer)"; exit 1; }

# Which sections run: all of them, unless *_ONLY=1 picks some.
ONLY="${STREAM_ONLY:+ stream}${ROUTING_ONLY:+ routing}${IDLE_ONLY:+ idle}${LOGIN_ONLY:+ login}"
ONLY+="${WORKERS_ONLY:+ workers}${TLS_ONLY:+ tls}${MAIN_ONLY:+ main}"
runs() { [ -z "$ONLY" ] || [[ "$ONLY " == *" $1 "* ]]; }

# Every idle client is a socket in the client script and one in the proxy.
MOST_CLIENTS=$(printf '%s\n' "$IDLE_CLIENTS" "$MANY_CLIENTS" "$LOGIN_CLIENTS" "$TLS_CLIENTS" | sort -n | tail -1)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((MOST_CLIENTS + 500)) ]; then
  echo "open-files limit $(ulimit -n) is too low for $MOST_CLIENTS clients; raise it (ulimit -Hn)"; exit 1
fi
MAX_CLIENT_CONN=$((MOST_CLIENTS + 100))

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK=$(mktemp -d /tmp/pgrelay-bench.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
PG_PORT=$(free_port); BOUNCER_PORT=$(free_port); RELAY_PORT=$(free_port)
RELAY_PID=""; BOUNCER_PID=""; BASE_PID=""
PROXY_PIDS=() # every proxy started, for cleanup
cleanup() {
  for pid in "${PROXY_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  as_pg "$BINDIR/pg_ctl" -D "$WORK/replica" -m immediate stop >/dev/null 2>&1 || true
  as_pg "$BINDIR/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "building pgrelay (release)..."
(cd "$ROOT" && cargo build --release --quiet)

# Room for every proxy's pools (the sections' proxies keep their server connections).
as_pg "$BINDIR/initdb" -D "$WORK/data" -U postgres --auth=trust --no-sync >/dev/null
cat >> "$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = 400
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

# bouncer_ini NAME PORT AUTH_TYPE: a PgBouncer config whose user list is $WORK/NAME.users.
# CLIENT_TLS=1, set for one call, makes it require TLS from clients (make_certs first).
bouncer_ini() {
  cat <<INI
[databases]
* = host=127.0.0.1 port=$PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $2
unix_socket_dir =
auth_type = $3
auth_file = $WORK/$1.users
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = $MAX_CLIENT_CONN
$BOUNCER_PREPARED
ignore_startup_parameters = extra_float_digits
logfile = $WORK/$1.log
pidfile = $WORK/$1.pid
INI
  if [ -n "${CLIENT_TLS:-}" ]; then
    printf 'client_tls_sslmode = require\nclient_tls_cert_file = %s\nclient_tls_key_file = %s\n' \
      "$WORK/server.crt" "$WORK/server.key"
  fi
}
# start_bouncer NAME: runs PgBouncer on $WORK/NAME.ini as a daemon; prints its pid.
start_bouncer() {
  [ "$(id -u)" = 0 ] && chown postgres "$WORK"/*
  # runuser's PAM session resets the open-files limit: raise it again inside.
  # shellcheck disable=SC2016
  as_pg sh -c 'ulimit -n "$(ulimit -Hn)"; exec "$0" "$@"' "$PGBOUNCER" -d "$WORK/$1.ini" >/dev/null 2>&1
  for _ in $(seq 50); do [ -s "$WORK/$1.pid" ] && break; sleep 0.1; done
  cat "$WORK/$1.pid"
}
echo '"postgres" ""' > "$WORK/pgbouncer.users"
bouncer_ini pgbouncer "$BOUNCER_PORT" trust > "$WORK/pgbouncer.ini"
BOUNCER_PID=$(start_bouncer pgbouncer); PROXY_PIDS+=("$BOUNCER_PID")

# relay_config PORT ROUTING [REPLICA_PORT REPLICA_WEIGHT]. RELAY_WORKERS, RELAY_AUTH,
# RELAY_USER and RELAY_PASSWORD, when set for one call, change the rest; CLIENT_TLS=1
# makes it require TLS from clients (make_certs first).
relay_config() {
  cat <<TOML
listen = ["127.0.0.1:$1"]
metrics_listen = ""
worker_threads = $RELAY_WORKERS
auth_type = "${RELAY_AUTH:-trust}"
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
name = "${RELAY_USER:-postgres}"
password = "${RELAY_PASSWORD:-unused-with-trust}"
TOML
  if [ -n "${3:-}" ]; then
    printf '[[backends]]\nhost = "127.0.0.1"\nport = %s\nweight = %s\n' "$3" "$4"
  fi
  if [ -n "${CLIENT_TLS:-}" ]; then
    printf '[tls]\nclient_mode = "require"\nclient_cert = "%s"\nclient_key = "%s"\n' \
      "$WORK/server.crt" "$WORK/server.key"
  fi
}
# make_certs: a throwaway CA and a server certificate it signed, for 127.0.0.1 and
# localhost, in $WORK (server.crt, server.key, ca.crt); TLS_KEY picks the key type.
make_certs() {
  local key=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1)
  [ "$TLS_KEY" = rsa ] && key=(-newkey rsa:2048)
  openssl req -x509 -nodes "${key[@]}" -keyout "$WORK/ca.key" -out "$WORK/ca.crt" -days 2 \
    -subj "/CN=pgrelay bench CA" 2>/dev/null
  openssl req -new -nodes "${key[@]}" -keyout "$WORK/server.key" -out "$WORK/server.csr" \
    -subj "/CN=localhost" 2>/dev/null
  printf 'subjectAltName = IP:127.0.0.1, DNS:localhost\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n' \
    > "$WORK/server.ext"
  openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" -CAcreateserial \
    -days 2 -extfile "$WORK/server.ext" -out "$WORK/server.crt" 2>/dev/null
  rm -f "$WORK/ca.key"
}
# start_relay NAME [BINARY]: runs pgrelay on $WORK/NAME.toml, logging warnings to
# $WORK/NAME.log; $! is its pid.
start_relay() {
  PGRELAY_LOG=${RELAY_LOG:-warn} "${2:-$ROOT/target/release/pgrelay}" run -c "$WORK/$1.toml" \
    >"$WORK/$1.log" 2>&1 &
  PROXY_PIDS+=("$!")
}
# await_login PORT [USER]: waits (10 s at most) until a login through PORT answers `SELECT 1`.
await_login() {
  for _ in $(seq 50); do
    PGPASSWORD=$STORM_PASSWORD psql -X -h 127.0.0.1 -p "$1" -U "${2:-postgres}" -d postgres \
      -Atc 'select 1' >/dev/null 2>&1 && return
    sleep 0.2
  done
}
STORM_USER=storm; STORM_PASSWORD=storm-password # the login storm's role

relay_config "$RELAY_PORT" true > "$WORK/pgrelay.toml"
RELAY_LOG=warn,pgrelay::listener=info start_relay pgrelay; RELAY_PID=$!
BASE_PORT=""
if [ -n "${BASELINE_BIN:-}" ]; then
  BASE_PORT=$(free_port)
  relay_config "$BASE_PORT" true > "$WORK/baseline.toml"
  start_relay baseline "$BASELINE_BIN"; BASE_PID=$!
fi

for port in $BOUNCER_PORT $RELAY_PORT $BASE_PORT; do await_login "$port"; done
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

if runs main; then
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

# cpu_ms PID: the process's CPU time so far in ms, summed over its threads from the
# scheduler's nanosecond count (/proc/PID/task/*/sched).
cpu_ms() {
  cat "/proc/$1"/task/*/sched 2>/dev/null | awk '/^se.sum_exec_runtime/ {t += $3} END {printf "%.3f", t}'
}
# stream PORT [PID]: a 200 MB result through one path, which psql discards -> MB/s, and
# with a PID also the proxy's CPU seconds per GB. PGSSLMODE, set for the call, is psql's.
stream() {
  local port=$1 pid=${2:-} start end cpu0=0 cpu1=0
  [ -n "$pid" ] && cpu0=$(cpu_ms "$pid")
  start=$(date +%s.%N)
  psql -X -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atq -o /dev/null \
    -c "SELECT repeat('x', 1000) FROM generate_series(1, 200000)"
  end=$(date +%s.%N)
  [ -n "$pid" ] && cpu1=$(cpu_ms "$pid")
  awk -v s="$start" -v e="$end" 'BEGIN{printf "%.1f", 200/(e-s)}'
  if [ -n "$pid" ]; then awk -v a="$cpu0" -v b="$cpu1" 'BEGIN{printf " %.3f", (b - a) / 1000 / 0.2}'; fi
  echo
}
if runs stream; then
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
if runs idle; then
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
if runs routing; then
  cat >> "$WORK/data/pg_hba.conf" <<HBA
host replication all 127.0.0.1/32 trust
HBA
  as_pg "$BINDIR/pg_ctl" -D "$WORK/data" reload >/dev/null
  REPLICA_PORT=$(free_port)
  as_pg "$BINDIR/pg_basebackup" -h 127.0.0.1 -p "$PG_PORT" -U postgres -D "$WORK/replica" -R -X stream -c fast >/dev/null 2>&1
  cat >> "$WORK/replica/postgresql.conf" <<CONF
port = $REPLICA_PORT
CONF
  as_pg "$BINDIR/pg_ctl" -D "$WORK/replica" -l "$WORK/replica.log" -w start >/dev/null
  OFF_PORT=$(free_port); ON_PORT=$(free_port)
  relay_config "$OFF_PORT" false "$REPLICA_PORT" 0 > "$WORK/off.toml"
  relay_config "$ON_PORT" true "$REPLICA_PORT" 0 > "$WORK/on.toml"
  start_relay off; OFF_PID=$!
  start_relay on; ON_PID=$!
  for port in $OFF_PORT $ON_PORT; do await_login "$port"; done
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

# storm_role: creates the storm's role once (SCRAM secret derived by PostgreSQL) and
# sets STORM_SECRET, what the proxies hold for it (LOGIN_SECRET).
storm_role() {
  [ -n "${STORM_SECRET:-}" ] && return 0
  psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c \
    "SET password_encryption = 'scram-sha-256'; CREATE ROLE $STORM_USER LOGIN PASSWORD '$STORM_PASSWORD'"
  case "$LOGIN_SECRET" in
    scram) STORM_SECRET=$(psql -X -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atc \
      "SELECT rolpassword FROM pg_authid WHERE rolname = '$STORM_USER'") ;;
    plain) STORM_SECRET=$STORM_PASSWORD ;;
    *) echo "LOGIN_SECRET must be scram or plain"; exit 1 ;;
  esac
}
# start_storm_proxies NAME: a PgBouncer and a pgrelay requiring scram-sha-256 for the
# storm's role ($WORK/NAME-bouncer.*, $WORK/NAME-relay.*; CLIENT_TLS as for
# bouncer_ini and relay_config), logged into once; sets STORM_BOUNCER_PORT and _PID,
# STORM_RELAY_PORT and _PID.
start_storm_proxies() {
  storm_role
  STORM_BOUNCER_PORT=$(free_port); STORM_RELAY_PORT=$(free_port)
  printf '"%s" "%s"\n' "$STORM_USER" "$STORM_SECRET" > "$WORK/$1-bouncer.users"
  { bouncer_ini "$1-bouncer" "$STORM_BOUNCER_PORT" scram-sha-256
    printf 'log_connections = 0\nlog_disconnections = 0\nlisten_backlog = 4096\n'; } > "$WORK/$1-bouncer.ini"
  STORM_BOUNCER_PID=$(start_bouncer "$1-bouncer"); PROXY_PIDS+=("$STORM_BOUNCER_PID")
  RELAY_AUTH=scram-sha-256 RELAY_USER=$STORM_USER RELAY_PASSWORD=$STORM_SECRET \
    relay_config "$STORM_RELAY_PORT" false > "$WORK/$1-relay.toml"
  start_relay "$1-relay"; STORM_RELAY_PID=$!
  for port in $STORM_BOUNCER_PORT $STORM_RELAY_PORT; do await_login "$port" "$STORM_USER"; done
}
# storm_compare TITLE CLIENTS [login_storm.py options]: ROUNDS storms through each of
# the storm proxies, interleaved; a table of the medians.
storm_compare() {
  local title=$1 clients=$2; shift 2
  storm() { # PORT PID -> one line of benches/login_storm.py's key=value pairs
    python3 "$ROOT/benches/login_storm.py" --port "$1" --pid "$2" --clients "$clients" \
      --user "$STORM_USER" --password "$STORM_PASSWORD" "${@:3}" \
      || echo "not every client logged in (see above)" >&2
  }
  local b="" r="" lines
  for _ in $(seq "$ROUNDS"); do
    b+="$(storm "$STORM_BOUNCER_PORT" "$STORM_BOUNCER_PID" "$@")"$'\n'
    r+="$(storm "$STORM_RELAY_PORT" "$STORM_RELAY_PID" "$@")"$'\n'
  done
  # value KEY: the median over rounds of KEY=value in login_storm.py's lines
  value() { grep -o "\b$1=[0-9.]*" | cut -d= -f2 | median; }
  failures() { grep -o '\bfailures=[0-9]*' | cut -d= -f2 | awk '{n += $1} END {print n + 0}'; }
  printf '\n%-34s %9s %10s %9s %12s %15s %14s\n' "$title" \
    "all in s" "median ms" failures "proxy CPU ms" "user / sys ms" "client CPU ms"
  for proxy in pgbouncer pgrelay; do
    lines=$b; [ "$proxy" = pgrelay ] && lines=$r
    printf '%-34s %9s %10s %9s %12s %15s %14s\n' "$proxy" "$(value login_s <<<"$lines")" \
      "$(value p50_ms <<<"$lines")" "$(failures <<<"$lines")" "$(value cpu_ms <<<"$lines")" \
      "$(value user_ms <<<"$lines") / $(value sys_ms <<<"$lines")" "$(value client_cpu_ms <<<"$lines")"
  done
  awk -v rt="$(value login_s <<<"$r")" -v bt="$(value login_s <<<"$b")" \
    -v rc="$(value cpu_ms <<<"$r")" -v bc="$(value cpu_ms <<<"$b")" \
    'BEGIN {printf "%-34s %9.2f %10s %9s %12.2f\n", "pgrelay / pgbouncer", (bt > 0) ? rt / bt : 0,
      "", "", (bc > 0) ? rc / bc : 0}'
}
# A SCRAM login storm: LOGIN_CLIENTS clients at once through a PgBouncer and a pgrelay
# that both require scram-sha-256 for a role whose secret PostgreSQL derived. Neither
# logs each connection (pgrelay does not; PgBouncer is told not to), and both listen
# with a backlog of 4096 (pgrelay's), so the figures are of the login work. A first
# login through each proxy has its pool learn the server's parameters; after that,
# logging in in transaction mode needs no server connection in either.
if runs login; then
  start_storm_proxies login
  storm_compare "$LOGIN_CLIENTS SCRAM logins ($LOGIN_SECRET, x$ROUNDS)" "$LOGIN_CLIENTS"
fi

# cost_header TITLE, then cost_row NAME RUNS for each proxy: medians of run_pgbench
# lines, with the proxy's CPU and context switches per transaction.
cost_header() {
  printf '\n%-34s %9s %11s %9s %9s %12s %12s\n' "$1" \
    tps "CPU µs/tx" "user µs" "sys µs" "vol cs/tx" "invol cs/tx"
}
cost_row() {
  printf '%-34s %9.0f %11s %9s %9s %12s %12s\n' "$1" "$(col 1 <<<"$2")" "$(col 4 <<<"$2")" \
    "$(col 5 <<<"$2")" "$(col 6 <<<"$2")" "$(col 7 <<<"$2")" "$(col 8 <<<"$2")"
}

# worker_threads = 1 against 2: two pgrelay builds alike but for it, and PgBouncer for
# reference, under the same pgbench in interleaved rounds.
if runs workers; then
  W1_PORT=$(free_port); W2_PORT=$(free_port)
  RELAY_WORKERS=1 relay_config "$W1_PORT" true > "$WORK/workers-1.toml"
  RELAY_WORKERS=2 relay_config "$W2_PORT" true > "$WORK/workers-2.toml"
  start_relay workers-1; W1_PID=$!
  start_relay workers-2; W2_PID=$!
  for port in $W1_PORT $W2_PORT; do await_login "$port"; done
  args=(-S -M simple -c "$CLIENTS" -j 2)
  b=""; w1=""; w2=""
  for _ in $(seq "$ROUNDS"); do
    b+="$(run_pgbench "$BOUNCER_PORT" "$BOUNCER_PID" "${args[@]}")"$'\n'
    w1+="$(run_pgbench "$W1_PORT" "$W1_PID" "${args[@]}")"$'\n'
    w2+="$(run_pgbench "$W2_PORT" "$W2_PID" "${args[@]}")"$'\n'
  done
  cost_header "pgbench ${args[*]} (${DURATION}s x$ROUNDS)"
  cost_row pgbouncer "$b"
  cost_row "pgrelay, worker_threads = 1" "$w1"
  cost_row "pgrelay, worker_threads = 2" "$w2"
  awk -v t1="$(col 1 <<<"$w1")" -v t2="$(col 1 <<<"$w2")" -v c1="$(col 4 <<<"$w1")" -v c2="$(col 4 <<<"$w2")" \
    'BEGIN {printf "%-34s %9.2f %11.2f\n", "worker_threads 2 / 1", t2 / t1, c2 / c1}'
fi

# TLS from clients: a PgBouncer and a pgrelay alike but for requiring TLS (trust auth,
# the throwaway certificate), against the plain pair, in interleaved rounds. Servers
# are reached in plaintext by all four (PostgreSQL here has ssl off).
if runs tls; then
  make_certs
  TLS_BOUNCER_PORT=$(free_port); TLS_RELAY_PORT=$(free_port)
  cp "$WORK/pgbouncer.users" "$WORK/tls-bouncer.users"
  CLIENT_TLS=1 bouncer_ini tls-bouncer "$TLS_BOUNCER_PORT" trust > "$WORK/tls-bouncer.ini"
  TLS_BOUNCER_PID=$(start_bouncer tls-bouncer); PROXY_PIDS+=("$TLS_BOUNCER_PID")
  CLIENT_TLS=1 relay_config "$TLS_RELAY_PORT" true > "$WORK/tls-relay.toml"
  start_relay tls-relay; TLS_RELAY_PID=$!
  for port in $TLS_BOUNCER_PORT $TLS_RELAY_PORT; do await_login "$port"; done
  for port in $TLS_BOUNCER_PORT $TLS_RELAY_PORT; do
    PGSSLMODE=disable psql -X -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1 \
      && { echo "port $port accepted a plaintext client: TLS is not required"; exit 1; }
  done
  # name port pid sslmode: the four paths, plain first
  paths=("pgbouncer plain|$BOUNCER_PORT|$BOUNCER_PID|disable" "pgrelay plain|$RELAY_PORT|$RELAY_PID|disable"
    "pgbouncer TLS|$TLS_BOUNCER_PORT|$TLS_BOUNCER_PID|require" "pgrelay TLS|$TLS_RELAY_PORT|$TLS_RELAY_PID|require")
  declare -A streams=() costs=()
  for _ in $(seq "$ROUNDS"); do
    for path in "${paths[@]}"; do
      IFS='|' read -r name port pid mode <<<"$path"
      streams[$name]+="$(PGSSLMODE=$mode stream "$port" "$pid")"$'\n'
    done
  done
  printf '\n%-34s %10s %12s %14s\n' "200 MB result (psql, x$ROUNDS)" "MB/s" "CPU s/GB" "MB/s / plain"
  for path in "${paths[@]}"; do
    IFS='|' read -r name _ _ _ <<<"$path"
    plain=$(col 1 <<<"${streams[${name% *} plain]}")
    printf '%-34s %10s %12s %14.2f\n' "$name" "$(col 1 <<<"${streams[$name]}")" \
      "$(col 2 <<<"${streams[$name]}")" "$(awk -v a="$(col 1 <<<"${streams[$name]}")" -v b="$plain" 'BEGIN{print (b>0)?a/b:0}')"
  done
  awk -v r="$(col 1 <<<"${streams[pgrelay TLS]}")" -v b="$(col 1 <<<"${streams[pgbouncer TLS]}")" \
    'BEGIN {printf "%-34s %10.2f\n", "pgrelay TLS / pgbouncer TLS", (b > 0) ? r / b : 0}'

  args=(-S -M simple -c "$CLIENTS" -j 2)
  for _ in $(seq "$ROUNDS"); do
    for path in "${paths[@]}"; do
      IFS='|' read -r name port pid mode <<<"$path"
      costs[$name]+="$(PGSSLMODE=$mode run_pgbench "$port" "$pid" "${args[@]}")"$'\n'
    done
  done
  cost_header "pgbench ${args[*]} (${DURATION}s x$ROUNDS)"
  for path in "${paths[@]}"; do
    IFS='|' read -r name _ _ _ <<<"$path"
    cost_row "$name" "${costs[$name]}"
  done
  awk -v t1="$(col 1 <<<"${costs[pgbouncer TLS]}")" -v t2="$(col 1 <<<"${costs[pgrelay TLS]}")" \
    -v c1="$(col 4 <<<"${costs[pgbouncer TLS]}")" -v c2="$(col 4 <<<"${costs[pgrelay TLS]}")" \
    'BEGIN {printf "%-34s %9.2f %11.2f\n", "pgrelay TLS / pgbouncer TLS", t2 / t1, c2 / c1}'

  if [ "$TLS_CLIENTS" -gt 0 ]; then
    CLIENT_TLS=1 start_storm_proxies tls-login
    storm_compare "$TLS_CLIENTS TLS + SCRAM logins (x$ROUNDS)" "$TLS_CLIENTS" --tls
  fi
fi
