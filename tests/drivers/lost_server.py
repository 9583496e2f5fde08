"""psycopg 3 and a server terminated under it, through pgrelay in transaction mode.

Run by tests/lost_server.rs with the pgrelay URL and a superuser URL straight to
PostgreSQL. Prints "psycopg lost server ok"; any failure raises (non-zero exit).
"""

import sys
import time

import psycopg

RELAYED, DIRECT = sys.argv[1], sys.argv[2]


def terminate(admin, pid):
    assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
    for _ in range(100):
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        if row[0] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"backend {pid} survived")


def in_transaction(admin):
    # Not autocommit: psycopg opens a transaction with the first statement.
    conn = psycopg.connect(RELAYED)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    terminate(admin, pid)
    try:
        conn.execute("SELECT 1")
        raise AssertionError("a statement ran in a lost transaction")
    except psycopg.OperationalError as err:
        assert "terminating connection due to administrator command" in str(err), err
    assert conn.broken, "the connection is not marked broken"
    conn.close()


def between_statements(admin):
    conn = psycopg.connect(RELAYED, autocommit=True)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    terminate(admin, pid)
    time.sleep(0.2)
    for n in range(5):
        assert conn.execute("SELECT %s::int", (n,)).fetchone()[0] == n
    assert not conn.broken
    conn.close()


def main():
    with psycopg.connect(DIRECT, autocommit=True) as admin:
        in_transaction(admin)
        between_statements(admin)
    print("psycopg lost server ok")


main()
