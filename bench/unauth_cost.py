"""What a request without a valid token costs, against a plain public call, in one run.

One ``fedrpc serve`` (defaults, except the per-principal and per-address call limits
raised out of the way and housekeeping put off) on a throwaway PostgreSQL that logs
every statement it runs (``log_statement = 'all'``: the database's own count of round
trips). The same load generator as bench/rpc_overhead.py (wrk, one thread, keep-alive)
runs each target in turn, in rotating order over a few rounds:

- ``system.version`` without a token: the plain public call, the reference;
- ``system.ping`` with an org API key in the auth cache: an authenticated call;
- ``system.ping`` without a token: refused (401) after reading its small body;
- ``system.ping`` with one unknown token, repeated: refused (401) from memory after one
  lookup;
- ``system.ping`` with a new unknown token on every request: each would need a lookup;
  the per-address lookup limit (defaults) lets its burst and rate through, the rest 429.

For each: requests/s, the server's CPU time per request (from /proc), and the database
statements logged per 1,000 requests. Then one 40 MB body each with an unknown token,
without a token and with a valid key (read, then refused as invalid JSON): how long
until the answer and how much of the body the socket took.

    .venv/bin/python bench/unauth_cost.py [--rounds 3] [--seconds 3] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import create_org, envelope, free_port, wait_ready  # noqa: E402
from rpc_overhead import cpu_seconds, ensure_wrk, postgres_pids, stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STATEMENT = re.compile(rb" LOG:  (?:execute|statement)\b")
BIG = 40 * 1024 * 1024
READING = (
    "What it shows: a request refused for its token costs the server less CPU than the plain "
    "public call and no database statement, but one lookup per unknown token per "
    "`FEDRPC_UNKNOWN_TOKEN_CACHE_SECONDS` and, for a stream of distinct unknown tokens from one "
    "address, no more lookups than that address's budget (`FEDRPC_TOKEN_LOOKUP_BURST`, then "
    "`FEDRPC_TOKEN_LOOKUPS_PER_SECOND`); a 40 MB body sent with a missing or unknown token is "
    "answered within milliseconds and never read. "
)

# One thread; statuses are read from the server's /metrics, not from wrk.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
%(auth)s
done = function(summary, latency, requests)
  io.write(string.format(
    '\\n@@{"requests":%%d,"duration_us":%%d,"socket":%%d,"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""
FRESH_TOKEN = """
local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
math.randomseed(os.time())
request = function()
  local t = {}
  for i = 1, 43 do local k = math.random(1, 64); t[i] = chars:sub(k, k) end
  local headers = {["Content-Type"] = "application/json"}
  headers["Authorization"] = "Bearer fk_" .. table.concat(t)
  return wrk.format(nil, nil, headers)
end
"""


class Target(msgspec.Struct):
    name: str
    answer: str  # what every request must get, checked in /metrics
    body: bytes
    auth: str  # Lua lines setting the Authorization header, if any


def targets(org_token: str) -> list[Target]:
    version, ping = envelope("system.version"), envelope("system.ping")
    header = 'wrk.headers["Authorization"] = "Bearer %s"'
    return [
        Target("`system.version`, no token (public call)", "200", version, ""),
        Target("`system.ping`, org key (cached)", "200", ping, header % org_token),
        Target("`system.ping`, no token", "401", ping, ""),
        Target("`system.ping`, one unknown token, repeated", "401", ping, header % unknown()),
        Target("`system.ping`, a new unknown token each time", "401 or 429", ping, FRESH_TOKEN),
    ]


def unknown() -> str:
    return "fk_" + secrets.token_urlsafe(32)


def outcomes(port: int) -> dict[str, float]:
    """Successful calls and refusals by type, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("fedrpc_calls_total{") and 'outcome="ok"' in line:
            out["200"] = out.get("200", 0.0) + float(line.rsplit(" ", 1)[1])
        for type_, status in (("unauthorized", "401"), ("rate_limited", "429")):
            if line.startswith(f'fedrpc_errors_total{{type="{type_}"}}'):
                out[status] = float(line.rsplit(" ", 1)[1])
    return out


def run_wrk(
    wrk: str, target: Target, port: int, args, seconds: int, scratch: Path, pids, log: Path
) -> dict:
    script = scratch / "load.lua"
    script.write_text(WRK_SCRIPT % {"body": target.body.decode(), "auth": target.auth})
    cmd = [wrk, "-t1", f"-c{args.connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
           f"http://127.0.0.1:{port}/rpc"]  # fmt: skip
    server_pid, db_pids = pids
    before = outcomes(port)
    offset = log.stat().st_size
    server0, db0 = cpu_seconds([server_pid]), cpu_seconds(db_pids)
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, timeout=seconds + 30
    ).stdout
    server1, db1 = cpu_seconds([server_pid]), cpu_seconds(db_pids)
    time.sleep(0.3)  # requests in flight when wrk stopped
    with open(log, "rb") as f:
        f.seek(offset)
        statements = len(STATEMENT.findall(f.read()))
    after = outcomes(port)
    stats = json.loads(out.split("@@", 1)[1])
    answered = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    wanted = sum(answered.get(k, 0) for k in target.answer.split(" or "))
    if stats["socket"] or not stats["requests"] or wanted < stats["requests"]:
        sys.exit(f"unauth_cost: {target.name}: {stats}, answers {answered}\n{out}")
    n = stats["requests"]
    stats.update(
        rps=n / (stats["duration_us"] / 1e6),
        server_us=(server1 - server0) / n * 1e6,
        db_us=(db1 - db0) / n * 1e6,
        statements=statements,
        answered=answered,
    )
    return stats


def push(port: int, token: str | None) -> tuple[float, int, int, int]:
    """POST a 40 MB body, reading the answer meanwhile, until all is sent or the connection
    ends: (seconds to the answer, bytes the socket took by then, bytes it took in all, status)."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"POST /rpc HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: {BIG}\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    started = time.perf_counter()
    sock.sendall((head + "\r\n").encode())
    sock.setblocking(False)
    piece, sent, answered_at, sent_then, answer = b" " * 262144, 0, None, 0, b""
    reading = True
    while (reading or sent < BIG) and time.perf_counter() - started < 15:
        wanted = ([sock] if reading else [], [sock] if sent < BIG else [])
        readable, writable, _ = select.select(*wanted, [], 1)
        if readable:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if answered_at is None and data:
                answered_at, sent_then = time.perf_counter() - started, sent
            answer += data
            reading = bool(data) and not complete(answer)
        if writable:
            try:
                sent += sock.send(piece[: BIG - sent])
            except OSError:  # the server dropped the connection
                break
    sock.close()
    assert answered_at is not None, "no answer"
    return answered_at, sent_then, sent, int(answer.split(b" ", 2)[1])


def complete(answer: bytes) -> bool:
    """Whether ``answer`` holds a whole HTTP response (headers and Content-Length bytes)."""
    head, found, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return bool(found and length) and len(body) >= int(length.group(1))


def measure(args, wrk: str, scratch: Path) -> tuple[dict[str, list[dict]], list[tuple[str, tuple]]]:
    from fedrpc.embedded import EmbeddedPostgres, EmbeddedS3

    with EmbeddedPostgres.temporary() as pg, EmbeddedS3.temporary() as s3:
        org_token = create_org(pg.url)
        import psycopg

        with psycopg.connect(pg.url, autocommit=True) as conn:
            name = conn.execute("SELECT current_database()").fetchone()[0]
            conn.execute(f"ALTER DATABASE {name} SET log_statement = 'all'")
        port = free_port()
        env = os.environ | {
            "DATABASE_URL": pg.url, "FEDRPC_S3_ENDPOINT": s3.endpoint, "FEDRPC_S3_ACCESS_KEY": s3.access_key,
            "FEDRPC_S3_SECRET_KEY": s3.secret_key, "FEDRPC_HOST": "127.0.0.1", "FEDRPC_PORT": str(port),
            "FEDRPC_RATE_LIMIT_PER_SECOND": "1000000000", "FEDRPC_RATE_LIMIT_BURST": "1000000000",
            "FEDRPC_BACKGROUND_INTERVAL_SECONDS": "3600", "FEDRPC_LOG_LEVEL": "INFO",
        }  # fmt: skip
        procs: list[subprocess.Popen] = []
        try:
            with open(scratch / "server.log", "wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "fedrpc.cli", "serve"], env=env,
                                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log))  # fmt: skip
            wait_ready(port, procs[0], "fedrpc serve")
            pids = (procs[0].pid, postgres_pids(pg.pid))
            load = targets(org_token)
            for target in load[:4]:  # warm-up: connections, caches, the pool
                run_wrk(wrk, target, port, args, 1, scratch, pids, pg.log_path)
            runs: dict[str, list[dict]] = {t.name: [] for t in load}
            for r in range(args.rounds):
                for target in load[r % len(load) :] + load[: r % len(load)]:
                    stats = run_wrk(
                        wrk, target, port, args, args.seconds, scratch, pids, pg.log_path
                    )
                    runs[target.name].append(stats)
            bodies = [
                ("unknown token", push(port, unknown())),
                ("no token", push(port, None)),
                ("org key (the body is read)", push(port, org_token)),
            ]
        finally:
            stop(procs)
    return runs, bodies


def report(runs: dict[str, list[dict]], bodies, args, wrk_version: str, elapsed: float) -> None:
    from _report import table, write_section

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    reference = next(iter(runs))
    rows = []
    for name, stats in runs.items():
        requests = sum(r["requests"] for r in stats)
        statements = sum(r["statements"] for r in stats)
        answered: dict[str, float] = {}
        for r in stats:
            for k, v in r["answered"].items():
                answered[k] = answered.get(k, 0) + v
        answers = ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(answered.items()) if v)
        rows.append([
            name, answers, f"{median(name, 'rps'):,.0f}", f"{median(name, 'p50_us') / 1000:.2f}",
            f"{median(name, 'server_us'):.0f}", f"{median(name, 'server_us') / median(reference, 'server_us'):.2f}",
            f"{statements:,} ({statements / requests * 1000:.2f})",
        ])  # fmt: skip
    body = table(
        ["target", "answers", "req/s", "p50 ms", "server CPU µs/request", "x public call",
         "DB statements (per 1,000 requests)"],
        rows,
    )  # fmt: skip
    body += "\n\n" + table(
        ["40 MB body", "answer", "answered after ms", "MB the socket took by then", "MB it took in all"],
        [[who, str(status), f"{t * 1000:.0f}", f"{then / 2**20:.1f}", f"{total / 2**20:.1f}"]
         for who, (t, then, total, status) in bodies],
    )  # fmt: skip
    body += (
        f"\n\n{READING}Load: {wrk_version}, `-t1 -c{args.connections}`, keep-alive, POST /rpc; {args.rounds} rounds of "
        f"{args.seconds} s per target in rotating order; medians over rounds, statements summed. fedrpc is "
        "`python -m fedrpc.cli serve` with its defaults (auth cache, unknown-token cache, per-address lookup "
        "limit) except the call limits raised out of the way and housekeeping put off; PostgreSQL from pgserver "
        "logs every statement (`log_statement = 'all'`), and the statements column counts that log's lines "
        "during each run. Answers are read from the server's /metrics. The 40 MB bodies are sent by one "
        "socket as fast as the server takes them; an unread one is refused at once and the connection dropped "
        f"half a second later (the MB taken are kernel buffers). Whole bench: {elapsed:.0f} s."
    )
    write_section("unauth_cost", "Requests without a valid token vs a public call", body)
    print(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the targets (default 3)")
    parser.add_argument("--seconds", type=int, default=3, help="seconds per wrk run (default 3)")
    parser.add_argument(
        "--connections", type=int, default=16, help="keep-alive connections (default 16)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    wrk = ensure_wrk()
    wrk_version = (
        subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split(" [")[0].strip()
    )
    with tempfile.TemporaryDirectory(prefix="fedrpc-bench-") as tmp:
        runs, bodies = measure(args, wrk, Path(tmp))
    report(runs, bodies, args, wrk_version, time.monotonic() - started)


if __name__ == "__main__":
    main()
