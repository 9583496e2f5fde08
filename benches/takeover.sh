#!/usr/bin/env bash
# A takeover (`pgrelay run --takeover`) under load: CLIENTS idle logged-in clients
# (benches/idle_clients.py) and pgbench -S -M prepared with 8 persistent clients run
# through one pgrelay while a second process takes over from it. Prints how long the
# new process took to serve the sockets, how long until the old one had handed over
# every client and exited, whether every idle client answered `SELECT 1` afterwards,
# and pgbench's transactions, failures and worst latency.
#
#   benches/takeover.sh                 # 2000 idle clients, pgbench for 20 s
#   CLIENTS=10000 DURATION=30 benches/takeover.sh
#
# Needs PostgreSQL's binaries, pgbench and python3; builds pgrelay in release mode.
set -euo pipefail

CLIENTS=${CLIENTS:-2000}
DURATION=${DURATION:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/benches/common.sh"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((CLIENTS * 2 + 500)) ]; then
  echo "open-files limit $(ulimit -n) is too low for $CLIENTS clients"; exit 1
fi


WORK=$(mktemp -d /tmp/pgrelay-takeover.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
PG_PORT=$(free_port); RELAY_PORT=$(free_port)
cleanup() {
  pkill -f "$WORK/pgrelay.toml" 2>/dev/null || true
  stop_postgres "$WORK"
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "building pgrelay (release)..."
(cd "$ROOT" && cargo build --release --quiet)
BIN=$ROOT/target/release/pgrelay

start_postgres "$WORK" "$PG_PORT" "max_connections = 200" "fsync = off" "synchronous_commit = off"

relay_config "$WORK/pgrelay.toml" "$RELAY_PORT" "$PG_PORT" \
  "takeover_socket = \"$WORK/takeover.sock\"" \
  "default_pool_size = 20
max_client_conn = $((CLIENTS + 100))"

"$BIN" run -c "$WORK/pgrelay.toml" > "$WORK/old.log" 2>&1 &
OLD_PID=$!
for _ in $(seq 100); do grep -q "listening addr" "$WORK/old.log" && break; sleep 0.1; done
kill -0 "$OLD_PID" 2>/dev/null || { echo "pgrelay did not start:"; cat "$WORK/old.log"; exit 1; }

"$BINDIR/pgbench" -n -S -M prepared -c 8 -j 2 -T "$DURATION" -l --log-prefix="$WORK/latency" \
  -h 127.0.0.1 -p "$RELAY_PORT" -U postgres postgres > "$WORK/pgbench.out" 2>&1 &
BENCH_PID=$!
sleep 3

# Run by idle_clients.py once every client is logged in: the takeover, timed.
cat > "$WORK/take-over.sh" <<SCRIPT
#!/usr/bin/env bash
start=\$(date +%s%3N)
"$BIN" run -c "$WORK/pgrelay.toml" --takeover > "$WORK/new.log" 2>&1 &
until grep -q "took over the running" "$WORK/new.log"; do sleep 0.01; done
served=\$(date +%s%3N)
while kill -0 $OLD_PID 2>/dev/null; do sleep 0.01; done
done_at=\$(date +%s%3N)
handed=\$(grep -o 'handed_over=[0-9]*' "$WORK/old.log" | cut -d= -f2)
echo "sockets_taken_ms=\$((served - start)) old_exited_ms=\$((done_at - start)) handed_over=\$handed"
SCRIPT
chmod +x "$WORK/take-over.sh"

echo "takeover with $CLIENTS idle clients and pgbench -S -M prepared -c 8 running:"
python3 "$ROOT/benches/idle_clients.py" --port "$RELAY_PORT" --pid "$OLD_PID" \
  --clients "$CLIENTS" --select --between "$WORK/take-over.sh"
wait "$BENCH_PID" || true
grep -E "number of transactions actually processed|number of failed transactions|^tps" "$WORK/pgbench.out"
# pgbench's per-transaction log: the third field is the latency in µs.
cat "$WORK"/latency.* | awk '{ if ($3 > max) max = $3 } END { printf "worst pgbench latency: %.1f ms\n", max / 1000 }'
