"""Protocol 3.2 through pgrelay with libpq 18 (psycopg's binary wheel).

Run by tests/protocol32.rs with a postgresql:// URL through pgrelay and the pool mode.
A client that asks for 3.2 (max_protocol_version=3.2) speaks 3.2 with pgrelay, and its
cancels (the new PQcancelCreate API and the old PQcancel) stop a running query; a 3.0
client's still do. Prints "protocol32 ok"; any failure raises (non-zero exit).
"""

import sys
import threading
import time

import psycopg

URL, MODE = sys.argv[1], sys.argv[2]


def connect(**protocol):
    return psycopg.connect(URL, autocommit=True, **protocol)


def cancelled_quickly(conn, cancel):
    """Runs pg_sleep(10) and cancels it with `cancel` once it runs on a server."""
    timer = threading.Timer(0.5, cancel)
    timer.start()
    began = time.monotonic()
    try:
        conn.execute("SELECT pg_sleep(10)")
        raise AssertionError("the sleep was not cancelled")
    except psycopg.errors.QueryCanceled:
        pass
    finally:
        timer.cancel()
    took = time.monotonic() - began
    assert took < 5, took
    assert conn.execute("SELECT 'after'").fetchone() == ("after",)


def check(conn, full_version):
    pgconn = conn.pgconn
    assert pgconn.protocol_version == 3, pgconn.protocol_version
    assert pgconn.full_protocol_version == full_version, pgconn.full_protocol_version
    pid = conn.info.backend_pid
    assert pid != 0
    if MODE == "session":
        # Session mode: the key's pid is the server's, whatever the secret's length.
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == (pid,)
    cancelled_quickly(conn, conn.cancel_safe)
    cancelled_quickly(conn, conn.cancel)


def main():
    assert psycopg.pq.version() >= 180000, psycopg.pq.version()
    with connect(max_protocol_version="3.2") as conn:
        check(conn, 30002)
    with connect(min_protocol_version="3.2", max_protocol_version="3.2") as conn:
        assert conn.pgconn.full_protocol_version == 30002
    with connect(max_protocol_version="3.0") as conn:
        check(conn, 30000)
    # libpq 18's default is 3.0.
    with connect() as conn:
        assert conn.pgconn.full_protocol_version == 30000
    print("protocol32 ok")


main()
