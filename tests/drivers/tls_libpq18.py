"""libpq 18 (psycopg's binary wheel) against pgrelay's client-side TLS.

Usage: tls_libpq18.py CONNINFO [NAME=EXTRA_CONNINFO ...]

Connects once per NAME with CONNINFO plus EXTRA_CONNINFO and prints one JSON line per
attempt: {"name", "ok", "ssl_in_use", "user", "value", "error"}. Whether an
attempt ought to succeed is the Rust test's to judge.
"""

import json
import sys

import psycopg


def attempt(conninfo):
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            row = conn.execute("SELECT current_user, 40 + 2").fetchone()
            return {
                "ok": True,
                "ssl_in_use": bool(conn.pgconn.ssl_in_use),
                "user": row[0],
                "value": row[1],
            }
    except psycopg.Error as err:
        return {"ok": False, "error": str(err)}


def main():
    base = sys.argv[1]
    for spec in sys.argv[2:]:
        name, extra = spec.split("=", 1)
        result = attempt(f"{base} {extra}")
        result["name"] = name
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
