"""Set-up shared by the benchmarks: ports, readiness, the bench's organization, envelopes."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.request

import msgspec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(
    port: int, proc: subprocess.Popen, what: str = "the server", timeout: float = 60
) -> None:
    """Poll /healthz until it answers; exit loudly if the process dies or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with status {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not answer within {timeout:.0f} s")


def create_org(database_url: str) -> str:
    """Migrate the fresh database and create the bench's organization; returns its API key."""
    from fedrpc.admin import create_org as create
    from fedrpc.db import Database, load_queries, migrate, open_pool

    async def run() -> str:
        await migrate(database_url)
        async with open_pool(database_url, min_size=1, max_size=1) as pool:
            return (await create(Database(pool, load_queries()), "bench"))[1]

    return asyncio.run(run())


def envelope(method: str, params: dict | None = None) -> bytes:
    """A JSON-RPC request body."""
    body = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params is not None:
        body["params"] = params
    return msgspec.json.encode(body)
