"""Set-up for the end-to-end aggregation bench: throwaway services and rounds ready to aggregate.

The server runs in this process (``create_app`` behind an aiohttp runner on
a loopback port) so that the bench can time the pieces of one
``training.aggregate`` call around the same functions (:class:`Probe`). The
services are a throwaway PostgreSQL (pgserver) and S3 (weed mini). Nothing
here is timed except what :class:`Probe` records.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import numpy as np
from _common import envelope, free_port  # bench/ is on sys.path (aggregate.py puts it there)

#: MLP width: Linear(WIDTH, WIDTH) + Linear(WIDTH, OUT) = 1,011,010 float32 parameters.
WIDTH, OUT = 1000, 10
UPLOAD_CONCURRENCY = 4
DEVICE = {
    "platform": "android", "os_version": "14", "model": "bench", "app_version": "1.0",
    "capabilities": {"battery_pct": 90, "charging": True, "network_type": "wifi",
                     "available_storage_mb": 4096},
}  # fmt: skip


def _net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, OUT)).eval()


def bundle(net=None) -> tuple[dict[str, bytes], dict[str, tuple[int, ...]]]:
    """Version 1 as an org admin makes it (weights, ONNX, torch.export program) and its float shapes.

    ``net``: a module taking ``(batch, features)`` whose first parameter is a Linear weight;
    the bench's MLP (1,011,010 parameters) if omitted.
    """
    import torch

    from fedrpc.client.artifacts import module_artifacts

    net = _net() if net is None else net.eval()
    width = next(net.parameters()).shape[1]
    files = module_artifacts(net, torch.zeros((2, width)))
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    return files, shapes


def update_bytes(shapes: dict[str, tuple[int, ...]], seed: int) -> bytes:
    """One device's delta as safetensors: small seeded noise on every tensor."""
    import safetensors.numpy

    rng = np.random.default_rng(seed)
    return safetensors.numpy.save(
        {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()}
    )


class Api:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session, self.url = session, f"http://127.0.0.1:{port}/rpc"

    async def ok(self, method: str, params: dict, token: str) -> Any:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        async with self.session.post(
            self.url, data=envelope(method, params), headers=headers
        ) as resp:
            answer = msgspec.json.decode(await resp.read())
        if "result" not in answer:
            sys.exit(f"{method} failed: {answer['error']}")
        return answer["result"]


@dataclass
class Stack:
    """A running server in this process, its services, one org and its devices."""

    api: Api
    services: Any  # fedrpc.context.Services: .db and .storage are the server's own
    token: str
    devices: dict[str, str] = field(default_factory=dict)  # device id -> token
    model_id: str = ""
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    async def register_model(self, net=None, name: str = "mlp-1m") -> None:
        """A new model whose version 1 is ``net`` (see :func:`bundle`); it becomes ``model_id``."""
        files, self.shapes = await asyncio.to_thread(bundle, net)
        model = await self.api.ok("models.create", {"name": name}, self.token)
        params = {
            "model_id": model["id"],
            **{k: {"data": base64.b64encode(v).decode()} for k, v in files.items()},
        }
        await self.api.ok("models.versions.create", params, self.token)
        self.model_id = model["id"]

    async def register_devices(self, n: int) -> None:
        while len(self.devices) < n:
            d = await self.api.ok("devices.register", DEVICE, self.token)
            self.devices[d["device_id"]] = d["token"]

    async def ready_round(self, n: int, seed: int) -> tuple[str, list[str]]:
        """A running round of n selected devices that have all uploaded; its id and object keys."""
        await self.register_devices(n)
        params = {
            "model_id": self.model_id,
            "base_version": 1,
            "target_device_count": n,
            "min_updates": n,
            "update_format": "delta",
        }
        rnd = await self.api.ok("training.create_round", params, self.token)
        selected = (await self.api.ok("training.select_devices", {"round_id": rnd["id"]}, self.token))["selected"]  # fmt: skip
        await self.api.ok("training.start_round", {"round_id": rnd["id"]}, self.token)
        gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)

        async def upload(i: int, device_id: str) -> None:
            async with gate:
                data = await asyncio.to_thread(update_bytes, self.shapes, seed * 100_000 + i)
                params = {
                    "round_id": rnd["id"], "model_id": self.model_id, "version": 1,
                    "sample_count": 10 + (i * 37) % 500, "update_format": "delta",
                    "encoding": "safetensors", "weights": {"data": base64.b64encode(data).decode()},
                    "metrics": {"loss": 0.5, "accuracy": 0.75},
                }  # fmt: skip
                await self.api.ok("training.weights.upload", params, self.devices[device_id])

        await asyncio.gather(*(upload(i, d) for i, d in enumerate(selected)))
        rows = await self.services.db.all(
            "training.aggregate.list_round_updates", _KeyRow, round_id=rnd["id"]
        )
        assert len(rows) == n, (len(rows), n)
        return rnd["id"], [r.object_key for r in rows]

    async def drop_objects(self, keys: list[str]) -> None:
        """Free the tmpfs behind S3 between measurements (not timed)."""
        await self.services.storage.delete(*keys)


class _KeyRow(msgspec.Struct):
    object_key: str


def bench_settings(pg_url: str, s3) -> Any:
    """A server's settings for a bench: fresh services, no rate limit, no background
    aggregation behind the bench's back, quiet logs."""
    from fedrpc.settings import Settings

    return Settings(
        database_url=pg_url,
        s3_endpoint=s3.endpoint,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        rate_limit_per_second=1e9,
        rate_limit_burst=1_000_000_000,
        background_interval_seconds=3600.0,
        log_level="WARNING",
    )


@contextlib.asynccontextmanager
async def stack(pg_url: str, s3) -> AsyncIterator[Stack]:
    """The server (in this process) on fresh services, with an org."""
    from aiohttp import web

    from fedrpc.admin import create_org
    from fedrpc.app import SERVICES, create_app
    from fedrpc.db import migrate

    await migrate(pg_url)
    app = create_app(bench_settings(pg_url, s3))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        services = app[SERVICES]
        _, token = await create_org(services.db, "bench")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            yield Stack(Api(session, port), services, token)
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def services() -> Iterator[tuple[str, Any]]:
    """A throwaway PostgreSQL URL and S3 server."""
    from fedrpc.embedded import EmbeddedPostgres, EmbeddedS3

    with EmbeddedPostgres.temporary() as pg, EmbeddedS3.temporary() as s3:
        yield pg.url, s3


# -- timing the pieces of one aggregation -----------------------------------------------------------


class Probe:
    """Wall time spent in named functions, patched in place for the duration of a ``with``.

    Sync functions may run on worker threads (their times add up across
    threads); async ones are awaited on the event loop.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._undo: list[tuple[Any, str, Any]] = []

    def _add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        probe = self
        if asyncio.iscoroutinefunction(original):

            async def timed(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    probe._add(name, time.perf_counter() - started)
        else:

            def timed(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    probe._add(name, time.perf_counter() - started)

        self._undo.append((owner, attr, owner.__dict__.get(attr, _MISSING)))
        setattr(owner, attr, timed)

    def wrap_class(self, module: Any, attr: str, methods: dict[str, str]) -> None:
        """Replace ``module.attr`` (a class) by a subclass whose ``methods`` are timed."""
        base = getattr(module, attr)
        sub = type(base.__name__, (base,), {})
        for method, name in methods.items():
            setattr(sub, method, getattr(base, method))
            self._undo.append((sub, method, _MISSING))
            self.wrap(sub, method, name)
        self._undo.append((module, attr, base))
        setattr(module, attr, sub)

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, before in reversed(self._undo):
            if before is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(owner, attr)
            else:
                setattr(owner, attr, before)
        self._undo.clear()


_MISSING = object()
