"""Throughput of training.weights.upload against a decode + check + store ceiling.

For float32 updates of about 100k and 1M parameters (a two-layer MLP), N
devices upload concurrently, each its own update into one running round:

- ``inline``: the update as base64 inside the JSON-RPC call (bodies built
  before the clock starts);
- ``inline+key``: the same with an ``idempotency_key`` (the core then hashes
  the encoded params and records the result);
- ``presigned``: the bytes were PUT to S3 beforehand through ``uploads.create``
  (not timed: the device talks to S3 directly); the call names the upload id,
  and the server reads the object back, checks its size and sha256, decodes,
  checks and stores it under its own key.

The ceiling, measured in the same run with the same concurrency and bytes, is
the least any server must do with an inline update: base64-decode it,
``np.isfinite`` over its values, and one S3 PUT of the bytes (raw minio SDK
into the same SeaweedFS). The server is ``python -m fedrpc.cli serve`` in its
own process with a throwaway PostgreSQL (pgserver) and S3 (weed mini); the
load generator (aiohttp, this process) shares the same 2 cores. Repetitions
run in rotating order; a ratio is the median of per-repetition ratios against
the ceiling of the same repetition. Goal: inline >= 0.5x the ceiling.

    .venv/bin/python bench/upload.py [--concurrency 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import create_org, envelope, free_port, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOAL = 0.5
# Hidden width d of Linear(d, d) + Linear(d, 2): about 100k and 1M parameters.
SIZES = {"100k": 316, "1M": 1000}
UPLOADS = {"100k": 160, "1M": 40}
MODES = ("ceiling", "inline", "inline+key", "presigned")


def make_net(width: int):
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(width, width)
            self.fc2 = nn.Linear(width, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(width)
    return Net().eval()


def artifacts(net, width: int) -> dict[str, bytes]:
    """weights, ONNX and torch.export program of the base version, as the SDK makes them."""
    import torch

    from fedrpc.client.artifacts import module_artifacts

    return module_artifacts(net, torch.zeros((2, width)))


def update_bytes(width: int, seed: int) -> bytes:
    import safetensors.numpy

    rng = np.random.default_rng(seed)
    shapes = {
        "fc1.weight": (width, width),
        "fc1.bias": (width,),
        "fc2.weight": (2, width),
        "fc2.bias": (2,),
    }
    return safetensors.numpy.save(
        {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()}
    )


class Api:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session, self.url = session, f"http://127.0.0.1:{port}/rpc"

    async def post(self, body: bytes, token: str) -> dict:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        async with self.session.post(self.url, data=body, headers=headers) as resp:
            return msgspec.json.decode(await resp.read())

    async def ok(self, method: str, params: dict, token: str):
        answer = await self.post(envelope(method, params), token)
        if "result" not in answer:
            sys.exit(f"{method} failed: {answer['error']}")
        return answer["result"]


async def concurrently(n: int, jobs: list, run) -> float:
    """Run ``run(job)`` for every job with ``n`` workers; the wall time in seconds."""
    queue = list(reversed(jobs))

    async def worker() -> None:
        while queue:
            await run(queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n)))
    return time.perf_counter() - started


class Bench:
    def __init__(
        self, api: Api, s3, bucket: str, org_token: str, devices: list[dict], args
    ) -> None:
        self.api, self.s3, self.bucket, self.org_token, self.devices, self.args = (
            api, s3, bucket, org_token, devices, args)  # fmt: skip
        self.models: dict[str, dict] = {}
        self.updates: dict[str, bytes] = {}

    async def setup(self) -> None:
        for size, width in SIZES.items():
            bundle = artifacts(make_net(width), width)
            model = await self.api.ok("models.create", {"name": f"mlp-{size}"}, self.org_token)
            params = {
                "model_id": model["id"],
                **{k: {"data": base64.b64encode(v).decode()} for k, v in bundle.items()},
            }
            await self.api.ok("models.versions.create", params, self.org_token)
            self.models[size] = model
            self.updates[size] = update_bytes(width, 1)

    async def round(self, size: str, count: int) -> dict:
        params = {
            "model_id": self.models[size]["id"],
            "base_version": 1,
            "target_device_count": len(self.devices),
            "update_format": "delta",
        }
        rnd = await self.api.ok("training.create_round", params, self.org_token)
        await self.api.ok("training.select_devices", {"round_id": rnd["id"]}, self.org_token)
        return await self.api.ok("training.start_round", {"round_id": rnd["id"]}, self.org_token)

    def params(self, rnd: dict, i: int, weights: dict, key: bool) -> dict:
        params = {
            "round_id": rnd["id"],
            "model_id": rnd["model_id"],
            "version": 1,
            "sample_count": 100 + i,
            "update_format": "delta",
            "encoding": "safetensors",
            "weights": weights,
            "metrics": {"loss": 0.5, "accuracy": 0.75},
        }
        return params | ({"idempotency_key": f"bench-{rnd['id']}-{i}"} if key else {})

    async def measure(self, size: str, mode: str) -> float:
        """Seconds for UPLOADS[size] updates in this mode (set-up outside the clock)."""
        data, count, n = self.updates[size], UPLOADS[size], self.args.concurrency
        if mode == "ceiling":
            return await self.ceiling(data, count, n)
        rnd = await self.round(size, count)
        devices = self.devices[:count]
        if mode == "presigned":
            ids = [await self.presign(d["token"], data) for d in devices]
            weights = [{"upload_id": u} for u in ids]
        else:
            weights = [{"data": base64.b64encode(data).decode()}] * count
        jobs = [
            (
                envelope("training.weights.upload", self.params(rnd, i, w, mode == "inline+key")),
                d["token"],
            )
            for i, (d, w) in enumerate(zip(devices, weights, strict=True))
        ]

        async def run(job) -> None:
            answer = await self.api.post(*job)
            if "result" not in answer:
                sys.exit(f"upload failed under load: {answer['error']}")

        elapsed = await concurrently(n, jobs, run)
        progress = await self.api.ok(
            "training.get_round_progress", {"round_id": rnd["id"]}, self.org_token
        )
        assert progress["received_count"] == count, progress
        await self.api.ok("training.cancel_round", {"round_id": rnd["id"]}, self.org_token)
        return elapsed

    async def presign(self, token: str, data: bytes) -> str:
        created = await self.api.ok(
            "uploads.create",
            {
                "purpose": "weights",
                "size_bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            },
            token,
        )
        async with self.api.session.put(created["url"], data=data) as resp:
            assert resp.status == 200, resp.status
        return created["upload_id"]

    async def ceiling(self, data: bytes, count: int, n: int) -> float:
        text = base64.b64encode(data)
        header = 8 + int.from_bytes(data[:8], "little")

        def check() -> bytes:
            raw = base64.b64decode(text)
            if not np.isfinite(np.frombuffer(raw, np.float32, offset=header)).all():
                raise ValueError("the bench update is not finite")
            return raw

        async def run(i: int) -> None:
            raw = await asyncio.to_thread(check)
            await asyncio.to_thread(
                self.s3.put_object, self.bucket, f"ceiling/{i}", io.BytesIO(raw), len(raw)
            )

        return await concurrently(n, list(range(count)), run)


async def drive(
    port: int, s3_endpoint: str, access: str, secret: str, org_token: str, args
) -> dict:
    from minio import Minio

    s3 = Minio(s3_endpoint, access, secret, secure=False)
    connector = aiohttp.TCPConnector(limit=args.concurrency + 4)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=300)
    ) as session:
        api = Api(session, port)
        reg = {"platform": "android", "os_version": "14", "model": "bench", "app_version": "1.0",
               "capabilities": {"battery_pct": 90, "charging": True, "network_type": "wifi",
                                "available_storage_mb": 4096}}  # fmt: skip
        devices = [
            await api.ok("devices.register", reg, org_token) for _ in range(max(UPLOADS.values()))
        ]
        bench = Bench(api, s3, "fedrpc", org_token, devices, args)
        await bench.setup()
        for size in SIZES:  # warm-up: imports, connections, pool, first S3 writes
            await bench.measure(size, "inline")
            await bench.measure(size, "ceiling")
        times: dict[tuple[str, str], list[float]] = {(s, m): [] for s in SIZES for m in MODES}
        for r in range(args.reps):
            for size in SIZES:
                for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                    times[size, mode].append(await bench.measure(size, mode))
                    clear(s3, "fedrpc")
        return times


def clear(s3, bucket: str) -> None:
    """Drop the objects of a finished measurement (keeps the tmpfs small; not timed)."""
    from minio.deleteobjects import DeleteObject

    for prefix in ("ceiling/", "updates/"):
        doomed = [
            DeleteObject(o.object_name)
            for o in s3.list_objects(bucket, prefix=prefix, recursive=True)
        ]
        for error in s3.remove_objects(bucket, doomed):
            sys.exit(f"could not clear the bucket: {error}")


def report(times: dict, update_sizes: dict[str, int], args, elapsed: float) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import table, write_section

    rows, met = [], True
    for size in SIZES:
        count, nbytes = UPLOADS[size], update_sizes[size]
        ceiling = times[size, "ceiling"]
        for mode in MODES:
            ts = times[size, mode]
            ratios = [c / t for c, t in zip(ceiling, ts, strict=True)]
            ratio = statistics.median(ratios)
            median_t = statistics.median(ts)
            goal = ""
            if mode == "inline":
                goal = f">= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'}"
                met = met and ratio >= GOAL
            rows.append([
                size, f"{nbytes / 1e6:.2f}", "ceiling: b64 decode + isfinite + S3 put" if mode == "ceiling" else f"`{mode}`",
                f"{count * nbytes / 1e6 / median_t:,.0f}", f"{count / median_t:,.0f}",
                "1.00" if mode == "ceiling" else f"**{ratio:.2f}** ({min(ratios):.2f}-{max(ratios):.2f})", goal,
            ])  # fmt: skip
    body = table(
        [
            "params",
            "update MB",
            "target",
            "MB/s (median)",
            "updates/s",
            "x ceiling (min-max)",
            "goal",
        ],
        rows,
    )
    body += (
        f"\n\n{args.concurrency} devices upload concurrently ({UPLOADS['100k']} updates of the 100k model and "
        f"{UPLOADS['1M']} of the 1M model per measurement, each a distinct device in a fresh running round), "
        f"{args.reps} repetitions in rotating order; MB are update bytes (before base64). The server is "
        "`python -m fedrpc.cli serve` in its own process with pgserver and weed mini; the aiohttp load generator "
        "runs on the same 2 cores. Every upload succeeded and every round received exactly its updates (checked "
        f"with training.get_round_progress). Whole bench: {elapsed:.0f} s."
    )
    write_section(
        "upload", "training.weights.upload throughput vs decode + check + store ceiling", body
    )
    print(body)
    if not met:
        print("\nupload: the goal was not met", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent devices (default 8)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    args = parser.parse_args()

    from fedrpc.embedded import EmbeddedPostgres, EmbeddedS3

    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="fedrpc-bench-") as tmp,
        EmbeddedPostgres.temporary() as pg,
        EmbeddedS3.temporary() as s3,
    ):
        org_token = create_org(pg.url)
        port = free_port()
        env = os.environ | {
            "DATABASE_URL": pg.url, "FEDRPC_S3_ENDPOINT": s3.endpoint, "FEDRPC_S3_ACCESS_KEY": s3.access_key,
            "FEDRPC_S3_SECRET_KEY": s3.secret_key, "FEDRPC_PORT": str(port),
            "FEDRPC_RATE_LIMIT_PER_SECOND": "1000000000", "FEDRPC_RATE_LIMIT_BURST": "1000000000",
        }  # fmt: skip
        with open(Path(tmp) / "server.log", "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "fedrpc.cli", "serve"],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            wait_ready(port, server)
            times = asyncio.run(
                drive(port, s3.endpoint, s3.access_key, s3.secret_key, org_token, args)
            )
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    report(
        times,
        {s: len(update_bytes(w, 1)) for s, w in SIZES.items()},
        args,
        time.monotonic() - started,
    )


if __name__ == "__main__":
    main()
