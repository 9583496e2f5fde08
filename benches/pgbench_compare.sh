#!/usr/bin/env bash
# Runs pgbench through pgrelay and through PgBouncer side by side, against one local
# PostgreSQL, and prints throughput, latency, proxy CPU per 1,000 transactions and
# large-result throughput, with pgrelay/PgBouncer ratios.
#
#   benches/pgbench_compare.sh            # 15 s per run
#   DURATION=5 CLIENTS=32 benches/pgbench_compare.sh
#
# Needs PostgreSQL's binaries, pgbench, psql and pgbouncer (Debian: postgresql,
# pgbouncer). Builds pgrelay in release mode. Both proxies run in transaction mode with
# trust auth and a pool of 20, so the comparison is of the relay itself.
set -euo pipefail

DURATION=${DURATION:-15}
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
RELAY_PID=""; BOUNCER_PID=""
cleanup() {
  [ -n "$RELAY_PID" ] && kill "$RELAY_PID" 2>/dev/null || true
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

cat > "$WORK/pgrelay.toml" <<TOML
listen = ["127.0.0.1:$RELAY_PORT"]
metrics_listen = ""
auth_type = "trust"
[pool]
mode = "transaction"
default_pool_size = $POOL
[[backends]]
host = "127.0.0.1"
port = $PG_PORT
[[users]]
name = "postgres"
password = "unused-with-trust"
TOML
PGRELAY_LOG=warn "$ROOT/target/release/pgrelay" run -c "$WORK/pgrelay.toml" &
RELAY_PID=$!

for port in $BOUNCER_PORT $RELAY_PORT; do
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

printf '\n%-34s %12s %12s %12s %9s %22s\n' "workload (c=$CLIENTS, ${DURATION}s)" direct pgbouncer pgrelay ratio "cpu ms/1k tx b / r"
compare() {
  local label=$1; shift
  read -r d_tps _ _ d_lat <<<"$(run_pgbench "$PG_PORT" "" "$@")"
  read -r b_tps b_tx b_cpu b_lat <<<"$(run_pgbench "$BOUNCER_PORT" "$BOUNCER_PID" "$@")"
  read -r r_tps r_tx r_cpu r_lat <<<"$(run_pgbench "$RELAY_PORT" "$RELAY_PID" "$@")"
  local b_ms r_ms
  b_ms=$(awk -v c="$b_cpu" -v n="$b_tx" -v hz="$HZ" 'BEGIN{printf "%.1f", c*1000/hz/n*1000}')
  r_ms=$(awk -v c="$r_cpu" -v n="$r_tx" -v hz="$HZ" 'BEGIN{printf "%.1f", c*1000/hz/n*1000}')
  printf '%-34s %12.0f %12.0f %12.0f %9.2f %10s / %-10s cpu ratio %.2f\n' "$label" "$d_tps" "$b_tps" "$r_tps" \
    "$(awk -v a="$r_tps" -v b="$b_tps" 'BEGIN{print a/b}')" "$b_ms" "$r_ms" \
    "$(awk -v a="$r_ms" -v b="$b_ms" 'BEGIN{print (b>0)?a/b:0}')"
  [ "$label" = "latency -S simple (c=1)" ] && printf '%-34s %11sms %11sms %11sms\n' "  average latency" "$d_lat" "$b_lat" "$r_lat"
  return 0
}

compare "pgbench -S simple" -S -M simple -c "$CLIENTS" -j 2
compare "pgbench -S extended" -S -M extended -c "$CLIENTS" -j 2
compare "pgbench -N simple" -N -M simple -c "$CLIENTS" -j 2
compare "latency -S simple (c=1)" -S -M simple -c 1 -j 1

# A 200 MB result through each path; psql discards it.
stream() {
  local port=$1 start end
  start=$(date +%s.%N)
  psql -X -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atq -o /dev/null \
    -c "SELECT repeat('x', 1000) FROM generate_series(1, 200000)"
  end=$(date +%s.%N)
  awk -v s="$start" -v e="$end" 'BEGIN{printf "%.1f", 200/(e-s)}'
}
d_mb=$(stream "$PG_PORT"); b_mb=$(stream "$BOUNCER_PORT"); r_mb=$(stream "$RELAY_PORT")
printf '%-34s %10s MB/s %7s MB/s %7s MB/s  pgrelay/direct %.2f\n' "200 MB result (psql)" "$d_mb" "$b_mb" "$r_mb" \
  "$(awk -v a="$r_mb" -v b="$d_mb" 'BEGIN{print a/b}')"
