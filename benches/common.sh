# Shared by the benchmark scripts (sourced, not run): PostgreSQL's binaries, running
# them as `postgres` when root, free ports, and a throwaway trust-auth server.

BINDIR=${PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$BINDIR/initdb" ] || { echo "PostgreSQL binaries not found (set PG_BINDIR)"; exit 1; }

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_postgres DIR PORT [postgresql.conf lines...]: a trust-auth server in DIR/data
# on 127.0.0.1:PORT (its socket in DIR), with pgbench's tables at scale 1.
start_postgres() {
  local dir=$1 port=$2
  shift 2
  as_pg "$BINDIR/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync >/dev/null
  {
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $port"
    echo "unix_socket_directories = '$dir'"
    printf '%s\n' "$@"
  } >> "$dir/data/postgresql.conf"
  as_pg "$BINDIR/pg_ctl" -D "$dir/data" -l "$dir/pg.log" -w start >/dev/null
  "$BINDIR/pgbench" -i -s 1 -q -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null 2>&1
}

# stop_postgres DIR: the server start_postgres started there, at once.
stop_postgres() {
  as_pg "$BINDIR/pg_ctl" -D "$1/data" -m immediate stop >/dev/null 2>&1 || true
}

# relay_config FILE RELAY_PORT PG_PORT TOP POOL: a pgrelay config in FILE listening on
# 127.0.0.1:RELAY_PORT in front of the server on PG_PORT, trust auth for `postgres`,
# transaction mode; TOP and POOL are extra lines for the top level and for [pool].
relay_config() {
  cat > "$1" <<TOML
listen = ["127.0.0.1:$2"]
metrics_listen = ""
auth_type = "trust"
$4
[pool]
mode = "transaction"
$5
[[backends]]
host = "127.0.0.1"
port = $3
[[users]]
name = "postgres"
password = "unused-with-trust"
TOML
}
