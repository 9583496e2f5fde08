"""Drivers that prepare statements, through pgrelay in transaction mode.

Run by tests/prepared.rs with a postgresql:// URL. Prints "psycopg ok" and
"asyncpg ok"; any failure raises (non-zero exit).
"""

import asyncio
import sys

import asyncpg
import psycopg

URL = sys.argv[1]


def run_psycopg():
    conns = [psycopg.connect(URL) for _ in range(8)]
    for conn in conns:
        # Prepare on first use; keep only two, so psycopg deallocates the others.
        conn.prepare_threshold = 0
        conn.prepared_max = 2
    texts = [
        "SELECT %s::int + 1",
        "SELECT %s::int + 2",
        "SELECT %s::int + 3",
        "SELECT %s::int * 10",
    ]
    checks = [lambda n: n + 1, lambda n: n + 2, lambda n: n + 3, lambda n: n * 10]
    for n in range(40):
        for i, conn in enumerate(conns):
            k = (n + i) % len(texts)
            got = conn.execute(texts[k], (n,)).fetchone()[0]
            assert got == checks[k](n), (texts[k], n, got)
            conn.commit()
    # Autocommit connections and a failing statement in between.
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.prepare_threshold = 0
        for n in range(20):
            assert conn.execute("SELECT %s::int - 1", (n,)).fetchone()[0] == n - 1
            try:
                conn.execute("SELECT 1 / %s::int", (0,))
                raise AssertionError("division by zero succeeded")
            except psycopg.errors.DivisionByZero:
                pass
    for conn in conns:
        conn.close()
    print("psycopg ok")


async def run_asyncpg():
    # asyncpg names every statement it caches; with the cache off it parses the
    # unnamed statement, describes it, syncs, and binds it afterwards.
    conns = [await asyncpg.connect(URL) for _ in range(6)]
    conns += [await asyncpg.connect(URL, statement_cache_size=0) for _ in range(4)]

    async def work(conn, i):
        stmt = await conn.prepare("SELECT $1::int * $2::int")
        for n in range(30):
            assert await conn.fetchval("SELECT $1::int + 1", n) == n + 1
            assert await stmt.fetchval(n, i) == n * i
            async with conn.transaction():
                assert await conn.fetchval("SELECT $1::text || 'x'", str(n)) == f"{n}x"
            rows = await conn.fetch("SELECT g FROM generate_series(1, $1::int) AS g", n % 5 + 1)
            assert [r["g"] for r in rows] == list(range(1, n % 5 + 2))

    await asyncio.gather(*(work(c, i) for i, c in enumerate(conns)))
    for conn in conns:
        await conn.close()
    print("asyncpg ok")


run_psycopg()
asyncio.run(run_asyncpg())
