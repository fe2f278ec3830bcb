"""Latency of a cheap call while 20 clients ask for distinct privacy estimates, same run.

The server runs in this process (``create_app`` on a loopback port, a throwaway
PostgreSQL and S3). A probe calls ``system.ping`` every 20 ms and records its
latency: first on the idle server, then while 20 clients each ask, one after
another, for estimates no other client asks for (so no cache helps):

* ``pld``: ``federations.privacy.estimate`` with the PLD accountant (0.05 to
  0.5 s of FFTs each), on a federation with 3 recorded rounds;
* ``rdp-new-pair``: the RDP accountant on a (noise, rate) pair never priced
  before (a new one-step curve: 1 to 50 ms of numpy each).

Each load runs twice: with the math pool (the server as it is: worker
processes, ``FEDRPC_MATH_WORKERS=2``) and the way it was before (the bench sets
``services.math_pool = None``, so PLD runs in the default thread pool, the one
S3 I/O shares, and a new RDP pair on the event loop).

    .venv/bin/python bench/privacy_pool.py [--clients 20] [--per-client 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import msgspec
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # _common, _report, and fedrpc without an install

from _common import envelope, free_port  # noqa: E402
from _report import table, write_section  # noqa: E402

PROBE_EVERY = 0.02


class Server:
    def __init__(self, session: aiohttp.ClientSession, port: int, token: str) -> None:
        self.session, self.url, self.token = session, f"http://127.0.0.1:{port}/rpc", token

    async def call(self, method: str, params: dict) -> dict:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}
        async with self.session.post(
            self.url, data=envelope(method, params), headers=headers
        ) as resp:
            return msgspec.json.decode(await resp.read())


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def probe_until(server: Server, stop: asyncio.Event) -> list[float]:
    """system.ping latencies (ms), one call every PROBE_EVERY s, until ``stop``."""
    samples = []
    while not stop.is_set():
        started = time.perf_counter()
        answer = await server.call("system.ping", {})
        samples.append((time.perf_counter() - started) * 1e3)
        assert "result" in answer, answer
        await asyncio.sleep(PROBE_EVERY)
    return samples


def workload(kind: str, clients: int, per_client: int, seed: int) -> list[list[dict]]:
    """Each client's estimates: distinct parameters everywhere (no cache can help)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(clients):
        calls = []
        for _ in range(per_client):
            if kind == "pld":
                params = {
                    "noise_multiplier": round(float(rng.uniform(0.9, 2.0)), 6),
                    "sample_rate": round(float(rng.uniform(0.005, 0.2)), 6),
                    "num_steps": int(rng.integers(10, 400)),
                    "accountant": "pld",
                }
            else:
                params = {
                    "noise_multiplier": round(float(rng.uniform(2.0, 50.0)), 6),
                    "sample_rate": round(float(rng.uniform(0.3, 0.6)), 6),
                }
            calls.append(params)
        out.append(calls)
    return out


async def run_load(server: Server, federation_id: str, plan: list[list[dict]]) -> dict:
    """The probe's latencies while every client works through its plan, and the outcomes."""
    stop = asyncio.Event()
    probe = asyncio.ensure_future(probe_until(server, stop))
    await asyncio.sleep(0.1)
    outcomes: dict[str, int] = {}
    latencies: list[float] = []

    async def client(calls: list[dict]) -> None:
        for params in calls:
            started = time.perf_counter()
            answer = await server.call(
                "federations.privacy.estimate", {"federation_id": federation_id, **params}
            )
            latencies.append(time.perf_counter() - started)
            kind = "ok" if "result" in answer else answer["error"]["data"]["type"]
            outcomes[kind] = outcomes.get(kind, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in plan))
    wall = time.perf_counter() - started
    stop.set()
    return {"probe": await probe, "wall": wall, "latencies": latencies, "outcomes": outcomes}


async def measure(args: argparse.Namespace, pg_url: str, s3) -> list[list[str]]:
    from _e2e_setup import bench_settings
    from aiohttp import web

    from fedrpc.admin import create_org
    from fedrpc.app import SERVICES, create_app
    from fedrpc.db import migrate
    from fedrpc.fl.privacy import RoundCharge, clear_cache
    from fedrpc.services.privacy_budget import charge_round

    await migrate(pg_url)
    app = create_app(bench_settings(pg_url, s3))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    rows = []
    try:
        services = app[SERVICES]
        org, token = await create_org(services.db, "bench")
        limits = aiohttp.TCPConnector(limit=args.clients + 4)
        async with aiohttp.ClientSession(connector=limits) as session:
            server = Server(session, port, token)
            fed = (
                await server.call(
                    "federations.create",
                    {
                        "name": "dp",
                        "org_id": org.id,
                        "privacy_policy": {"total_epsilon_budget": 50},
                    },
                )
            )["result"]
            for i, (s, q, n) in enumerate([(1.1, 0.01, 100), (1.3, 0.02, 50), (1.1, 0.01, 80)]):
                await charge_round(services.db, fed["id"], f"rnd_{i:032x}", RoundCharge(s, q, n))
            # Start the workers (a production server has them running after its first estimate).
            await server.call("federations.privacy.estimate", {"federation_id": fed["id"], **{
                "noise_multiplier": 3.0, "sample_rate": 1.0, "accountant": "pld"}})  # fmt: skip

            stop = asyncio.Event()
            idle = asyncio.ensure_future(probe_until(server, stop))
            await asyncio.sleep(args.idle_seconds)
            stop.set()
            idle_ms = await idle
            rows.append(row("idle", "-", idle_ms, None))

            pool = services.math_pool
            seed = 0
            for kind in ("pld", "rdp-new-pair"):
                for mode in ("math pool", "before (thread pool / loop)"):
                    seed += 1
                    clear_cache()  # nothing from an earlier load helps this one
                    services.math_pool = pool if mode == "math pool" else None
                    per_client = args.per_client * (1 if kind == "pld" else 15)
                    plan = workload(kind, args.clients, per_client, seed)
                    result = await run_load(server, fed["id"], plan)
                    rows.append(row(kind, mode, result["probe"], result))
                    print(rows[-1], flush=True)
            services.math_pool = pool
    finally:
        await runner.cleanup()
    return rows


def row(kind: str, mode: str, probe_ms: list[float], load: dict | None) -> list[str]:
    out = [kind, mode, str(len(probe_ms)), f"{statistics.median(probe_ms):.1f}"]
    out += [f"{percentile(probe_ms, 0.99):.1f}", f"{max(probe_ms):.1f}"]
    if load is None:
        return out + ["", "", ""]
    done = sum(load["outcomes"].values())
    outcomes = ", ".join(f"{v} {k}" for k, v in sorted(load["outcomes"].items()))
    return out + [outcomes, f"{done / load['wall']:.1f}", f"{statistics.median(load['latencies']):.2f}"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--idle-seconds", type=float, default=4.0)
    args = parser.parse_args()
    from fedrpc.embedded import EmbeddedPostgres, EmbeddedS3

    with EmbeddedPostgres.temporary() as pg, EmbeddedS3.temporary() as s3:
        rows = asyncio.run(measure(args, pg.url, s3))
    headers = ["load", "math runs in", "probes", "ping p50 ms", "ping p99 ms", "ping max ms"]
    headers += ["estimates", "estimates/s", "estimate p50 s"]
    body = table(headers, rows) + (
        f"\n\n`python bench/privacy_pool.py`: {args.clients} clients each ask "
        f"{args.per_client} (PLD) or {args.per_client * 15} (RDP) "
        "`federations.privacy.estimate` calls no other client asks, one "
        "after another, while a probe calls `system.ping` every 20 ms; the server runs in the "
        "bench's process (so do the clients). *math pool*: the server as it is (2 worker "
        "processes; PLD on at most one of them, new RDP curves in the quick lane). *before*: "
        "the bench sets `services.math_pool = None`, which is the code path of the server "
        "before the pool: PLD in the default thread pool (the one S3 I/O shares), a new RDP "
        "pair on the event loop. The idle row is the probe alone, same run. PLD throughput "
        "with the pool is that of the workers PLD may use (all but one); before, the default "
        "thread pool's threads took every core, and the loop's latency with them."
    )
    print(body)
    write_section("privacy_pool", "Privacy estimates under load: the event loop's latency", body)


if __name__ == "__main__":
    main()
