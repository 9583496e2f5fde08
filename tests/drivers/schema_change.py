"""Schema changes under asyncpg's statement cache, told as the application sees them.

Run by tests/prepared.rs twice: once straight to PostgreSQL, once through pgrelay in
transaction mode, each time with its own table names. Prints one JSON list of what
every read returned (rows, or the error the application got), which must be the same
both times: asyncpg re-prepares a statement PostgreSQL refuses as stale (0A000) and
retries it once, so an application sees an error only where PostgreSQL gives it one
that asyncpg does not retry.

usage: schema_change.py URL SUFFIX
"""

import asyncio
import json
import sys

import asyncpg

URL = sys.argv[1]
T = "sc_t_" + sys.argv[2]
C = "sc_c_" + sys.argv[2]
U = "sc_u_" + sys.argv[2]
CLIENTS = 5


async def read(conn, sql):
    try:
        rows = await conn.fetch(sql)
        return ["ok", [list(map(str, r.values())) for r in rows]]
    except (asyncpg.PostgresError, asyncpg.InterfaceError,
            asyncpg.exceptions.InternalClientError) as e:
        return ["error", type(e).__name__, getattr(e, "sqlstate", None)]


async def main():
    admin = await asyncpg.connect(URL)
    await admin.execute(
        f"DROP TABLE IF EXISTS {T}, {U}; DROP TYPE IF EXISTS {C};"
        f"CREATE TABLE {T} (a int); INSERT INTO {T} VALUES (1);"
        f"CREATE TYPE {C} AS (x int, y int);"
        f"CREATE TABLE {U} (k int, c {C}); INSERT INTO {U} VALUES (1, ROW(1, 2))"
    )
    clients = [await asyncpg.connect(URL) for _ in range(CLIENTS)]
    queries = [f"SELECT * FROM {T} ORDER BY 1", f"SELECT k, c FROM {U}"]
    log = []

    async def round_of_reads(step):
        # The changer reads first, then every other client, one after the other.
        for i, conn in enumerate([admin] + clients):
            for q, sql in enumerate(queries):
                for attempt in range(2):
                    log.append([step, i, q, attempt, await read(conn, sql)])

    # Warm up concurrently, so the statements are prepared on several servers.
    async def warm(conn):
        for _ in range(4):
            for q in queries:
                await conn.fetch(q)

    await asyncio.gather(*(warm(c) for c in [admin] + clients))
    await round_of_reads("before")
    changes = [
        ("add column", f"ALTER TABLE {T} ADD COLUMN b int DEFAULT 2"),
        ("alter type", f"ALTER TABLE {T} ALTER COLUMN a TYPE bigint"),
        ("recreate", f"DROP TABLE {T}; CREATE TABLE {T} (a text, b int, c int);"
                     f"INSERT INTO {T} VALUES ('x', 1, 2)"),
        ("composite", f"ALTER TYPE {C} ADD ATTRIBUTE z int"),
        ("unrelated", f"CREATE INDEX ON {T} (b)"),
    ]
    for step, ddl in changes:
        await admin.execute(ddl)
        await round_of_reads(step)
    for conn in [admin] + clients:
        await conn.close()
    print(json.dumps(log))


asyncio.run(main())
