"""Per-call overhead of the fedrpc stack against a raw aiohttp+msgspec echo server.

Three targets are loaded one after another by the same load generator (wrk,
one thread, the same connections, duration and keep-alive), in several short
rounds whose order rotates, so that drift on a shared machine hits them all:

- ``echo``: a bare aiohttp handler that decodes the envelope with msgspec and
  answers it (the ceiling: HTTP and JSON, nothing else), in its own process;
- ``system.ping``: the real server (``python -m fedrpc.cli serve``) called with
  an org API key through the whole stack: envelope, auth, rate limit,
  jsonrpcserver dispatch, params, metrics and the one JSON log line per call
  (kept on, written to a file);
- ``devices.sync``: the same server called with a device token; the heartbeat
  runs its statement in a throwaway PostgreSQL.

Goals: ping >= 0.7x and sync >= 0.35x the echo requests/s. Besides requests/s
the table gives the server's CPU time per call (and PostgreSQL's, for sync),
read from /proc: on a shared 2-core machine it moves much less than
throughput does.

wrk is the Debian package. When it is missing and the bench runs as root it
installs it (``apt-get install -y wrk``, and says so); otherwise it stops and
asks for it.

    .venv/bin/python bench/rpc_overhead.py [--rounds 6] [--seconds 4] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"system.ping": 0.7, "devices.sync": 0.35}
HEARTBEAT = {
    "battery_pct": 81,
    "charging": True,
    "network_type": "wifi",
    "available_storage_mb": 20480,
}
REGISTRATION = {
    "platform": "android", "os_version": "14", "model": "bench", "app_version": "1.0",
    "capabilities": {"battery_pct": 90, "charging": False, "network_type": "wifi", "available_storage_mb": 1024},
}  # fmt: skip

# wrk prints its own report; done() adds one machine-readable line after it.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n@@{"requests":%%d,"duration_us":%%d,"status":%%d,"socket":%%d,"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


# -- the ceiling: a raw aiohttp + msgspec JSON-RPC echo, run as `rpc_overhead.py --echo PORT` --------


class EchoEnvelope(msgspec.Struct):
    jsonrpc: str
    method: str
    id: int | str | None = None
    params: msgspec.Raw = msgspec.Raw(b"{}")


class EchoAnswer(msgspec.Struct):
    jsonrpc: str
    result: msgspec.Raw
    id: int | str | None


def echo_server(port: int) -> None:
    from aiohttp import web

    decode, encode = msgspec.json.Decoder(EchoEnvelope).decode, msgspec.json.Encoder().encode

    async def rpc(request: web.Request) -> web.Response:
        env = decode(await request.read())
        return web.Response(
            body=encode(EchoAnswer("2.0", env.params, env.id)), content_type="application/json"
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/rpc", rpc)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- set-up ------------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(
            "rpc_overhead: wrk is missing; installing the Debian package: apt-get install -y wrk",
            flush=True,
        )
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk"], check=True, stdout=subprocess.DEVNULL
        )
        path = shutil.which("wrk")
    if not path:
        sys.exit("rpc_overhead: needs wrk as its load generator (Debian: apt-get install wrk)")
    return path


def post(port: int, body: bytes, token: str) -> dict:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/rpc", data=body, headers=headers, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def calls_by_outcome(port: int) -> dict[str, float]:
    """fedrpc_calls_total summed by outcome, read from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("fedrpc_calls_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes (0 where /proc cannot tell)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def postgres_pids(postmaster: int | None) -> list[int]:
    """The postmaster and its backends (the server's pool connections among them)."""
    if postmaster is None:
        return []
    try:
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    except OSError:
        return []
    return [postmaster, *map(int, children)]


# -- measuring ---------------------------------------------------------------------------------------


class Target(msgspec.Struct):
    name: str
    port: int
    body: bytes
    token: str
    server_pid: int
    postmaster: int | None = None


def run_wrk(
    wrk: str, target: Target, args: argparse.Namespace, seconds: int, scratch: Path
) -> dict:
    script = scratch / "load.lua"
    script.write_text(WRK_SCRIPT % {"body": target.body.decode(), "token": target.token})
    cmd = [
        wrk,
        "-t1",
        f"-c{args.connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        f"http://127.0.0.1:{target.port}/rpc",
    ]
    db_pids = postgres_pids(target.postmaster)
    server0, db0 = cpu_seconds([target.server_pid]), cpu_seconds(db_pids)
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, timeout=seconds + 30
    ).stdout
    server1, db1 = cpu_seconds([target.server_pid]), cpu_seconds(db_pids)
    stats = json.loads(out.split("@@", 1)[1])
    if stats["status"] or stats["socket"] or not stats["requests"]:
        sys.exit(
            f"rpc_overhead: wrk against {target.name} saw {stats['status']} non-2xx answers and "
            f"{stats['socket']} socket errors:\n{out}"
        )
    stats["rps"] = stats["requests"] / (stats["duration_us"] / 1e6)
    stats["server_us"] = (server1 - server0) / stats["requests"] * 1e6
    stats["db_us"] = (db1 - db0) / stats["requests"] * 1e6
    return stats


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(
    args: argparse.Namespace, wrk: str, scratch: Path
) -> tuple[dict[str, list[dict]], int, int]:
    """Runs of every target, the calls the server counted, and the call lines it logged."""
    from fedrpc.embedded import EmbeddedPostgres, EmbeddedS3

    with EmbeddedPostgres.temporary() as pg, EmbeddedS3.temporary() as s3:
        org_token = create_org(pg.url)
        app_port, echo_port = free_port(), free_port()
        env = os.environ | {
            "DATABASE_URL": pg.url, "FEDRPC_S3_ENDPOINT": s3.endpoint, "FEDRPC_S3_ACCESS_KEY": s3.access_key,
            "FEDRPC_S3_SECRET_KEY": s3.secret_key, "FEDRPC_HOST": "127.0.0.1", "FEDRPC_PORT": str(app_port),
            "FEDRPC_RATE_LIMIT_PER_SECOND": "1000000000", "FEDRPC_RATE_LIMIT_BURST": "1000000000",
            "FEDRPC_LOG_LEVEL": "INFO",
        }  # fmt: skip
        log_path = scratch / "server.log"
        procs: list[subprocess.Popen] = []
        try:
            with open(log_path, "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "fedrpc.cli", "serve"],
                        env=env,
                        cwd=ROOT,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                    )
                )
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--echo", str(echo_port)], stdout=subprocess.DEVNULL
                )
            )
            wait_ready(app_port, procs[0], "fedrpc serve")
            wait_ready(echo_port, procs[1], "the echo server")
            device_token = post(app_port, envelope("devices.register", REGISTRATION), org_token)[
                "result"
            ]["token"]
            ping, sync = envelope("system.ping"), envelope("devices.sync", HEARTBEAT)
            targets = [
                Target("echo", echo_port, ping, org_token, procs[1].pid),
                Target("system.ping", app_port, ping, org_token, procs[0].pid),
                Target("devices.sync", app_port, sync, device_token, procs[0].pid, pg.pid),
            ]
            for target in targets:
                answer = post(target.port, target.body, target.token)
                if "result" not in answer:
                    sys.exit(f"rpc_overhead: {target.name} failed before the load: {answer}")
                run_wrk(wrk, target, args, 1, scratch)  # warm-up: connections, caches, the pool
            before = calls_by_outcome(app_port)
            runs: dict[str, list[dict]] = {t.name: [] for t in targets}
            for r in range(args.rounds):
                for target in targets[r % 3 :] + targets[: r % 3]:
                    runs[target.name].append(run_wrk(wrk, target, args, args.seconds, scratch))
            time.sleep(0.5)  # wrk stops with requests in flight; let the server finish them
            after = calls_by_outcome(app_port)
        finally:
            stop(procs)  # the server flushes its last log lines as it exits
    failed = {
        k: v - before.get(k, 0) for k, v in after.items() if k != "ok" and v != before.get(k, 0)
    }
    if failed:
        sys.exit(f"rpc_overhead: calls failed under load: {failed}")
    with open(log_path, "rb") as log:
        logged = sum(1 for line in log if b'"msg":"rpc.call"' in line)
    return runs, int(sum(after.values())), logged


def report(
    runs: dict[str, list[dict]],
    args: argparse.Namespace,
    calls: int,
    logged: int,
    wrk_version: str,
    elapsed: float,
) -> bool:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import table, write_section

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    rows, met = [], True
    for name in runs:
        goal = GOALS.get(name)
        # Each run against the echo run of the same round, then the median of those ratios.
        ratios = [a["rps"] / b["rps"] for a, b in zip(runs[name], runs["echo"], strict=True)]
        ratio = statistics.median(ratios)
        met &= goal is None or ratio >= goal
        rows.append([
            f"`{name}`" if goal else "raw aiohttp+msgspec echo (ceiling)",
            f"{median(name, 'rps'):,.0f}",
            f"{median(name, 'p50_us') / 1000:.2f}",
            f"{median(name, 'p99_us') / 1000:.2f}",
            f"{median(name, 'server_us'):.0f}" + (f" + {median(name, 'db_us'):.0f}" if name == "devices.sync" else ""),
            "1.00" if goal is None else f"**{ratio:.2f}** ({min(ratios):.2f}-{max(ratios):.2f})",
            "" if goal is None else f">= {goal}: {'met' if ratio >= goal else 'NOT met'}",
        ])  # fmt: skip
    body = table(
        [
            "target",
            "req/s",
            "p50 ms",
            "p99 ms",
            "CPU µs/call (server + Postgres)",
            "x echo req/s (min-max)",
            "goal",
        ],
        rows,
    )
    body += (
        f"\n\nLoad: {wrk_version}, `-t1 -c{args.connections}`, keep-alive, POST /rpc; {args.rounds} rounds of "
        f"{args.seconds} s per target in rotating order; medians over rounds. The ratio pairs each run with the "
        "echo run of the same round. fedrpc is `python -m fedrpc.cli serve` with its defaults (pool, auth cache, "
        "asyncio loop) except a rate limit raised out of the way, its one JSON line per call on "
        f"({logged:,} call lines written for {calls:,} calls), PostgreSQL from pgserver; server, Postgres and "
        "wrk share the machine's cores. Every call under load succeeded (checked in /metrics). CPU time per "
        f"call is read from /proc around each run. Whole bench: {elapsed:.0f} s."
    )
    write_section("rpc_overhead", "RPC overhead: fedrpc against a raw aiohttp+msgspec echo", body)
    print(body)
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=6, help="rounds over the three targets (default 6)"
    )
    parser.add_argument("--seconds", type=int, default=4, help="seconds per wrk run (default 4)")
    parser.add_argument(
        "--connections", type=int, default=16, help="keep-alive connections (default 16)"
    )
    parser.add_argument("--echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        return echo_server(args.echo)
    started = time.monotonic()
    wrk = ensure_wrk()
    wrk_version = (
        subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split(" [")[0].strip()
    )
    with tempfile.TemporaryDirectory(prefix="fedrpc-bench-") as tmp:
        runs, calls, logged = measure(args, wrk, Path(tmp))
    if logged != calls:
        sys.exit(f"rpc_overhead: the server logged {logged} call lines for {calls} calls")
    if not report(runs, args, calls, logged, wrk_version, time.monotonic() - started):
        print("\nrpc_overhead: a goal was not met", file=sys.stderr)


if __name__ == "__main__":
    main()
