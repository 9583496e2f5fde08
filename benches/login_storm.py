#!/usr/bin/env python3
"""A SCRAM-SHA-256 login storm through a proxy, for benches/pgbench_compare.sh.

Opens N client connections at once, each logging in with SCRAM-SHA-256 (a
StartupMessage, the full SASL exchange with the server's signature checked, then
reads until ReadyForQuery), and reports how long it took until every one was in
and how much CPU the proxy (--pid) spent meanwhile: user and system time from
/proc/PID/stat, which counts in 10 ms ticks, and in total from the scheduler's
nanosecond count (se.sum_exec_runtime in /proc/PID/task/*/sched) where the kernel
has it; a storm of 2,000 costs a proxy only tens of milliseconds.
With --tls each client first sends an SSLRequest, expects 'S' and runs a TLS
handshake (certificate not verified) before the StartupMessage; the login time
then includes the handshake.
The clients then say Terminate and close; the script waits until the proxy's CPU
time stops moving, so the next run starts on a quiet proxy.

Prints one line of `key=value` pairs for the calling script:

    clients=2000 failures=0 login_s=0.512 p50_ms=495.3 cpu_ms=71.2 user_ms=30 sys_ms=40
    client_cpu_ms=480

(on one line).

The client derives SCRAM's SaltedPassword (PBKDF2, 4096 rounds by default) once per
salt and iteration count and reuses it: a proxy that keeps a stored secret sends
every client the same salt, and in production each client would run on its own
machine, so the PBKDF2 of 2,000 clients should not share these two cores with the
proxy. A proxy that salts each login afresh costs the client one PBKDF2 per login.

Exits 1 when a client could not log in. Standard library only; one asyncio event
loop holds every socket.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import secrets
import ssl
import struct
import sys
import time

PROTOCOL_3_0 = 196608
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
MECHANISM = b"SCRAM-SHA-256"
AUTH_OK, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 10, 11, 12


def startup_message(user, database):
    body = struct.pack("!i", PROTOCOL_3_0)
    for key, value in (("user", user), ("database", database)):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def password_message(body):
    return b"p" + struct.pack("!i", len(body) + 4) + body


async def read_message(reader):
    header = await reader.readexactly(5)
    length = struct.unpack("!i", header[1:5])[0]
    return header[0:1], await reader.readexactly(length - 4)


async def read_auth(reader, expected):
    """The next Authentication message, which must be of type `expected`; its data."""
    tag, body = await read_message(reader)
    if tag == b"E":
        raise RuntimeError(body.replace(b"\0", b" ").decode(errors="replace"))
    code = struct.unpack("!i", body[:4])[0] if tag == b"R" else None
    if code != expected:
        raise RuntimeError(f"expected authentication message {expected}, got {tag!r} {code}")
    return body[4:]


class Keys:
    """SCRAM keys derived from the password, one PBKDF2 per (salt, iterations)."""

    def __init__(self, password):
        self.password = password.encode()
        self.cache = {}

    def get(self, salt, iterations):
        keys = self.cache.get((salt, iterations))
        if keys is None:
            salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, iterations)
            client_key = hmac.digest(salted, b"Client Key", "sha256")
            server_key = hmac.digest(salted, b"Server Key", "sha256")
            keys = (client_key, hashlib.sha256(client_key).digest(), server_key)
            self.cache[(salt, iterations)] = keys
        return keys


def attributes(message):
    return dict(part.split("=", 1) for part in message.split(","))


async def scram(reader, writer, keys):
    """The client's side of SCRAM-SHA-256, without channel binding."""
    mechanisms = (await read_auth(reader, AUTH_SASL)).split(b"\0")
    if MECHANISM not in mechanisms:
        raise RuntimeError(f"the proxy does not offer SCRAM-SHA-256: {mechanisms!r}")
    client_nonce = base64.b64encode(secrets.token_bytes(18)).decode()
    client_first_bare = f"n=,r={client_nonce}"
    first = f"n,,{client_first_bare}".encode()
    writer.write(password_message(MECHANISM + b"\0" + struct.pack("!i", len(first)) + first))
    server_first = (await read_auth(reader, AUTH_SASL_CONTINUE)).decode()
    server = attributes(server_first)
    if not server["r"].startswith(client_nonce):
        raise RuntimeError("the server nonce does not extend the client's")
    client_key, stored_key, server_key = keys.get(base64.b64decode(server["s"]), int(server["i"]))
    without_proof = f"c=biws,r={server['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(stored_key, auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    writer.write(password_message(f"{without_proof},p={base64.b64encode(proof).decode()}".encode()))
    server_final = (await read_auth(reader, AUTH_SASL_FINAL)).decode()
    expected = base64.b64encode(hmac.digest(server_key, auth_message, "sha256")).decode()
    if server_final != f"v={expected}":
        raise RuntimeError("the server's SCRAM signature does not match")
    await read_auth(reader, AUTH_OK)


async def until_ready(reader):
    while True:
        tag, body = await read_message(reader)
        if tag == b"Z":
            return
        if tag == b"E":
            raise RuntimeError(body.replace(b"\0", b" ").decode(errors="replace"))


def tls_context():
    """TLS for the benchmark's throwaway certificate: nothing is verified."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def start_tls(reader, writer, context):
    """SSLRequest, then the TLS handshake on the same stream once the proxy says 'S'."""
    writer.write(SSL_REQUEST)
    answer = await reader.readexactly(1)
    if answer != b"S":
        raise RuntimeError(f"the proxy refused TLS: {answer!r}")
    await writer.start_tls(context)


async def log_in(args, keys, gate):
    """One client: connected, authenticated and at ReadyForQuery; with its login time."""
    async with gate:
        started = time.monotonic()
        connect = asyncio.open_connection(args.host, args.port)
        reader, writer = await asyncio.wait_for(connect, args.timeout)
        try:
            if args.tls:
                await asyncio.wait_for(start_tls(reader, writer, args.tls), args.timeout)
            writer.write(startup_message(args.user, args.database))
            await asyncio.wait_for(scram(reader, writer, keys), args.timeout)
            await asyncio.wait_for(until_ready(reader), args.timeout)
        except BaseException:
            writer.close()
            raise
        return reader, writer, time.monotonic() - started


def cpu_ms(pid):
    """The process's CPU time so far in ms: (user, system, total). Total is the
    scheduler's exact count where /proc has it, else user + system."""
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the command name, which may hold spaces: utime is the 12th.
        fields = stat.read().rsplit(")", 1)[1].split()
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    user, system = int(fields[11]) * tick_ms, int(fields[12]) * tick_ms
    total = 0.0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/sched") as sched:
                for line in sched:
                    if line.startswith("se.sum_exec_runtime"):
                        total += float(line.split(":")[1])
    except OSError:
        total = user + system
    return user, system, total or user + system


async def settle_cpu(pid):
    """Waits (up to 5 s) until the proxy's CPU time stops moving."""
    last = cpu_ms(pid)[2]
    for _ in range(20):
        await asyncio.sleep(0.25)
        now = cpu_ms(pid)[2]
        if now - last < 0.5:
            return
        last = now


async def main(args):
    keys = Keys(args.password)
    await settle_cpu(args.pid)
    gate = asyncio.Semaphore(args.concurrency or args.clients)
    cpu_before, client_before = cpu_ms(args.pid), time.process_time()
    started = time.monotonic()
    results = await asyncio.gather(
        *(log_in(args, keys, gate) for _ in range(args.clients)), return_exceptions=True
    )
    login_s = time.monotonic() - started
    cpu = [after - before for after, before in zip(cpu_ms(args.pid), cpu_before)]
    client_cpu_s = time.process_time() - client_before
    conns = [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    each = sorted(seconds for _, _, seconds in conns) or [0]
    for _, writer, _ in conns:
        writer.write(b"X\0\0\0\4")
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w, _ in conns), return_exceptions=True)
    await settle_cpu(args.pid)
    line = {
        "clients": len(conns),
        "failures": len(failures),
        "login_s": f"{login_s:.3f}",
        "p50_ms": f"{each[len(each) // 2] * 1000:.1f}",
        "cpu_ms": f"{cpu[2]:.1f}",
        "user_ms": f"{cpu[0]:.0f}",
        "sys_ms": f"{cpu[1]:.0f}",
        "client_cpu_ms": f"{client_cpu_s * 1000:.0f}",
    }
    print(" ".join(f"{k}={v}" for k, v in line.items()))
    if failures:
        print(f"{len(failures)} failures, first: {failures[0]!r}", file=sys.stderr)
    return 0 if not failures else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--database", default="postgres")
    parser.add_argument("--pid", type=int, required=True, help="the proxy's pid")
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument(
        "--concurrency", type=int, default=0, help="logins in flight at most (0: all at once)"
    )
    parser.add_argument("--timeout", type=float, default=60, help="seconds per login")
    parser.add_argument(
        "--tls", action="store_true", help="SSLRequest and TLS before logging in (not verified)"
    )
    arguments = parser.parse_args()
    arguments.tls = tls_context() if arguments.tls else None
    sys.exit(asyncio.run(main(arguments)))
