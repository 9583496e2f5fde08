#!/usr/bin/env python3
"""Idle logged-in clients through a proxy, for benches/pgbench_compare.sh.

Opens N client connections with trust auth (a StartupMessage, then reads until
ReadyForQuery), holds them all open, and reports the proxy's resident memory
(VmRSS of --pid) before and after, in KiB per idle client. With --between, a shell
command runs while they are idle (benches/takeover.sh: a takeover). With --select,
every client then runs `SELECT 1` and the script checks that each one got its row back.

Prints one line of `key=value` pairs for the calling script:

    clients=2000 rss_before=9123 rss_after=17456 kib_per_client=4.17 answered=2000

Exits 1 when a client could not log in or (with --select) did not get its answer.
Standard library only; one asyncio event loop holds every socket.
"""

import argparse
import asyncio
import struct
import subprocess
import sys
import time

PROTOCOL_3_0 = 196608


def startup_message(user, database):
    body = struct.pack("!i", PROTOCOL_3_0)
    for key, value in (("user", user), ("database", database)):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def query_message(sql):
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


async def read_message(reader):
    header = await reader.readexactly(5)
    length = struct.unpack("!i", header[1:5])[0]
    return header[0:1], await reader.readexactly(length - 4)


async def until_ready(reader):
    """Reads messages up to ReadyForQuery; returns the DataRows' first columns."""
    values = []
    while True:
        tag, body = await read_message(reader)
        if tag == b"Z":
            return values
        if tag == b"E":
            raise RuntimeError(body.replace(b"\0", b" ").decode(errors="replace"))
        if tag == b"R" and struct.unpack("!i", body[:4])[0] != 0:
            raise RuntimeError("the proxy asked for a password (trust auth expected)")
        if tag == b"D":
            length = struct.unpack("!i", body[2:6])[0]
            values.append(body[6 : 6 + length])


async def log_in(args, gate):
    async with gate:
        reader, writer = await asyncio.open_connection(args.host, args.port)
        writer.write(startup_message(args.user, args.database))
        await asyncio.wait_for(until_ready(reader), args.timeout)
        return reader, writer


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def settle_rss(pid):
    """The proxy's RSS once it stops changing (allocations finish after the last
    ReadyForQuery is written)."""
    last = rss_kib(pid)
    for _ in range(20):
        await asyncio.sleep(0.25)
        now = rss_kib(pid)
        if now == last:
            break
        last = now
    return last


async def select_one(reader, writer, timeout):
    writer.write(query_message("SELECT 1"))
    return await asyncio.wait_for(until_ready(reader), timeout) == [b"1"]


async def main(args):
    before = await settle_rss(args.pid)
    # A bounded number of logins in flight: listen backlogs are short (PgBouncer's
    # default is 128) and a dropped SYN costs a second's retransmit.
    gate = asyncio.Semaphore(args.concurrency)
    started = time.monotonic()
    results = await asyncio.gather(
        *(log_in(args, gate) for _ in range(args.clients)), return_exceptions=True
    )
    login_s = time.monotonic() - started
    conns = [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    after = await settle_rss(args.pid)
    line = {
        "clients": len(conns),
        "login_s": f"{login_s:.2f}",
        "rss_before": before,
        "rss_after": after,
        "kib_per_client": f"{(after - before) / max(len(conns), 1):.2f}",
    }
    if args.between:
        # Something to happen while every client is idle (a takeover): the clients
        # answered afterwards show whether they survived it.
        between = subprocess.run(args.between, shell=True, capture_output=True, text=True)
        if between.returncode != 0:
            failures.append(RuntimeError(f"--between failed: {between.stderr.strip()}"))
        line.update(kv.split("=", 1) for kv in between.stdout.split() if "=" in kv)
    if args.select and conns:
        answers = await asyncio.gather(
            *(select_one(r, w, args.timeout) for r, w in conns), return_exceptions=True
        )
        line["answered"] = sum(1 for a in answers if a is True)
        failures += [a for a in answers if isinstance(a, BaseException)]
    for _, writer in conns:
        writer.write(b"X\0\0\0\4")
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    print(" ".join(f"{k}={v}" for k, v in line.items()))
    if failures:
        print(f"{len(failures)} failures, first: {failures[0]!r}", file=sys.stderr)
    ok = not failures and len(conns) == args.clients
    if args.select:
        ok = ok and line.get("answered") == args.clients
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--database", default="postgres")
    parser.add_argument("--pid", type=int, required=True, help="the proxy's pid")
    parser.add_argument(
        "--between",
        help="a shell command run while every client is logged in and idle, before "
        "--select; its key=value output is added to the line",
    )
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--select", action="store_true", help="then SELECT 1 on each")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per answer")
    sys.exit(asyncio.run(main(parser.parse_args())))
