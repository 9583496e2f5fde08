"""The pids pgrelay issues in transaction mode, as psycopg and asyncpg use them.

Run by tests/pids.rs with a postgresql:// URL through pgrelay. Prints "psycopg ok"
and "asyncpg ok"; any failure raises (non-zero exit).
"""

import asyncio
import sys
import threading
import time

import asyncpg
import psycopg

URL = sys.argv[1]
# Pids pgrelay issues lie above Linux's largest pid_max.
ISSUED_PID_MIN = 1 << 22


def connect():
    return psycopg.connect(URL, autocommit=True)


def psycopg_notifications():
    listener = connect()
    pid = listener.info.backend_pid
    assert pid >= ISSUED_PID_MIN, pid
    seen = []
    listener.add_notify_handler(seen.append)
    listener.execute("LISTEN chan")
    listener.execute("NOTIFY chan, 'self'")
    mine = [n for n in seen if n.payload == "self"]
    assert len(mine) == 1, seen
    assert mine[0].pid == pid, (mine[0].pid, pid)

    # Another client's notification carries its server's pid, not the listener's.
    other = connect()
    sender = other.execute("SELECT pg_backend_pid(), pg_notify('chan', 'other')").fetchone()[0]
    deadline = time.time() + 5
    while not any(n.payload == "other" for n in seen) and time.time() < deadline:
        listener.execute("SELECT 1")
        time.sleep(0.05)
    theirs = [n for n in seen if n.payload == "other"]
    assert len(theirs) == 1, seen
    assert theirs[0].pid == sender, (theirs[0].pid, sender)
    assert theirs[0].pid != pid
    other.close()
    return listener


def psycopg_terminate(caller):
    victim = connect()
    victim.execute("SELECT 1")
    row = caller.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,)).fetchone()
    assert row == (True,), row
    try:
        victim.execute("SELECT 1")
        raise AssertionError("a terminated connection still works")
    except psycopg.errors.AdminShutdown:
        pass
    except psycopg.OperationalError as err:
        # The FATAL may arrive before the query is sent: then it is read as the
        # connection's end.
        assert "administrator command" in str(err), err
    assert victim.broken, "psycopg sees the connection broken"
    # Through a prepared statement too (psycopg prepares from the first use here).
    victim = connect()
    caller.prepare_threshold = 0
    row = caller.execute(
        "SELECT pg_catalog.pg_terminate_backend(%s)", (victim.info.backend_pid,)
    ).fetchone()
    assert row == (True,), row
    try:
        victim.execute("SELECT 1")
        raise AssertionError("a terminated connection still works")
    except psycopg.OperationalError:
        pass
    assert victim.broken
    caller.prepare_threshold = 5
    # psycopg's default: not autocommit, so the call runs in a transaction (BEGIN first).
    victim = connect()
    with psycopg.connect(URL) as in_transaction:
        row = in_transaction.execute(
            "SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,)
        ).fetchone()
        assert row == (True,), row
        assert in_transaction.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        in_transaction.commit()
    try:
        victim.execute("SELECT 1")
        raise AssertionError("a terminated connection still works")
    except psycopg.OperationalError:
        pass
    assert victim.broken


def psycopg_cancel(caller):
    sleeper = connect()
    outcome = {}

    def sleep():
        start = time.time()
        try:
            sleeper.execute("SELECT pg_sleep(10)")
            outcome["error"] = None
        except psycopg.errors.QueryCanceled as err:
            outcome["error"] = err.sqlstate
        outcome["took"] = time.time() - start

    thread = threading.Thread(target=sleep)
    thread.start()
    time.sleep(0.5)
    row = caller.execute("SELECT pg_cancel_backend(%s)", (sleeper.info.backend_pid,)).fetchone()
    assert row == (True,), row
    thread.join(10)
    assert outcome.get("error") == "57014", outcome
    assert outcome["took"] < 3, outcome
    # The session goes on.
    assert sleeper.execute("SELECT 41 + 1").fetchone() == (42,)
    sleeper.close()


def run_psycopg():
    listener = psycopg_notifications()
    caller = connect()
    psycopg_terminate(caller)
    psycopg_cancel(caller)
    # The pinned listener is still fine.
    assert listener.execute("SELECT 1").fetchone() == (1,)
    listener.close()
    caller.close()
    print("psycopg ok")


async def run_asyncpg():
    conn = await asyncpg.connect(URL)
    pid = conn.get_server_pid()
    assert pid >= ISSUED_PID_MIN, pid
    got = asyncio.get_running_loop().create_future()

    def on_notify(_conn, sender, channel, payload):
        if not got.done():
            got.set_result((sender, channel, payload))

    await conn.add_listener("chan2", on_notify)
    await conn.execute("NOTIFY chan2, 'mine'")
    sender, channel, payload = await asyncio.wait_for(got, 5)
    assert (channel, payload) == ("chan2", "mine")
    assert sender == pid, (sender, pid)

    # asyncpg's own statement (prepared, then bound in binary) ends another client.
    caller = await asyncpg.connect(URL)
    victim = await asyncpg.connect(URL)
    assert await victim.fetchval("SELECT 1") == 1
    assert await caller.fetchval("SELECT pg_terminate_backend($1)", victim.get_server_pid()) is True
    # As with PostgreSQL itself, the FATAL and the close reach the victim a moment
    # after the caller's answer; asyncpg acts on them once its loop has read both.
    await asyncio.sleep(0.3)
    assert victim.is_closed(), "asyncpg saw its connection end"
    try:
        await victim.fetchval("SELECT 1")
        raise AssertionError("a terminated connection still works")
    except asyncpg.exceptions.InterfaceError:
        pass
    # The caller and the listener go on.
    assert await caller.fetchval("SELECT 2") == 2
    assert await conn.fetchval("SELECT 3") == 3
    await caller.close()
    await conn.close()
    print("asyncpg ok")


run_psycopg()
asyncio.run(run_asyncpg())
