#!/usr/bin/env bash
# Instructions per transaction of pgrelay builds, counted by valgrind's callgrind: the
# one figure that does not drift with what else the machine is doing. For each binary
# given, pgbench -S (MODE: simple, extended or prepared) runs N1 and then N2
# transactions through it with one client, and the difference of the two totals over
# N2 - N1 is printed, so that start-up and login cancel out.
#
#   benches/instructions_per_tx.sh /tmp/pgrelay-old target/release/pgrelay
#   MODE=extended N1=500 N2=2500 benches/instructions_per_tx.sh target/release/pgrelay
#
# Needs valgrind, PostgreSQL's binaries and pgbench; runs its own PostgreSQL on a free
# port in a temp dir (as `postgres` when run as root).
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 PGRELAY_BINARY..."; exit 1; }
. "$(dirname "$0")/common.sh"
N1=${N1:-500}
N2=${N2:-2500}
MODE=${MODE:-simple}
WORK=$(mktemp -d /tmp/pgrelay-instructions.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
PG_PORT=$(free_port)
RELAY_PORT=$(free_port)
cleanup() { stop_postgres "$WORK"; rm -rf "$WORK"; }
trap cleanup EXIT
start_postgres "$WORK" "$PG_PORT"
relay_config "$WORK/relay.toml" "$RELAY_PORT" "$PG_PORT" "worker_threads = 1" "default_pool_size = 2"
# instructions BINARY N: callgrind's total for N transactions (and pgrelay's start).
instructions() {
  local out="$WORK/callgrind.$2"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$1" run -c "$WORK/relay.toml" \
    >"$WORK/relay.log" 2>&1 &
  local pid=$!
  for _ in $(seq 150); do (echo >"/dev/tcp/127.0.0.1/$RELAY_PORT") 2>/dev/null && break; sleep 0.2; done
  "$BINDIR/pgbench" -n -S -M "$MODE" -c 1 -j 1 -t "$2" -h 127.0.0.1 -p "$RELAY_PORT" \
    -U postgres postgres >/dev/null
  kill -INT "$pid"
  wait "$pid" 2>/dev/null || true
  awk '/^(summary|totals):/ {print $2; exit}' "$out"
}
for binary in "$@"; do
  a=$(instructions "$binary" "$N1")
  b=$(instructions "$binary" "$N2")
  echo "$binary -M $MODE: $(( (b - a) / (N2 - N1) )) instructions per transaction"
done
