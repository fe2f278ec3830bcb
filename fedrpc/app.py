"""The aiohttp application: routes and one cleanup context per resource."""

from __future__ import annotations

import asyncio
import contextlib
import hmac

from aiohttp import web

from fedrpc.auth import Authenticator, RateLimiter, parse_networks
from fedrpc.context import Services
from fedrpc.db import Database, load_queries, open_pool, set_json_codec
from fedrpc.math_pool import MathPool
from fedrpc.metrics import Metrics
from fedrpc.openrpc import OpenRpcDocument, document_for, server_url
from fedrpc.registry import Registry
from fedrpc.rpc import RpcEndpoint
from fedrpc.services import artifact_sandbox
from fedrpc.settings import Settings, SettingsError
from fedrpc.storage import Storage
from fedrpc.tasks import run_periodically

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
DATABASE = web.AppKey("db", Database)
STORAGE = web.AppKey("storage", Storage)
OPENRPC = web.AppKey("openrpc", OpenRpcDocument)
METRICS = web.AppKey("metrics", Metrics)
SERVICES = web.AppKey("services", Services)
ENDPOINT = web.AppKey("endpoint", RpcEndpoint)


def create_app(settings: Settings, registry: Registry | None = None) -> web.Application:
    if not settings.database_url or not settings.s3_endpoint:
        raise ValueError("DATABASE_URL and FEDRPC_S3_ENDPOINT must be set")
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[REGISTRY] = registry or Registry.from_package()
    app[METRICS] = Metrics()
    app[ENDPOINT] = endpoint = RpcEndpoint()
    try:
        endpoint.proxies = parse_networks(settings.trusted_proxies)
    except ValueError:
        reason = "expected comma-separated IP addresses or networks"
        raise SettingsError("trusted_proxies", settings.trusted_proxies, reason) from None
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(_services)
    app.cleanup_ctx.append(_math_pool)
    app.cleanup_ctx.append(_artifact_sandbox)
    app.cleanup_ctx.append(_background)
    app.router.add_post("/rpc", endpoint.handle, expect_handler=endpoint.expect)
    app.router.add_get("/openrpc.json", _openrpc)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


async def _database(app: web.Application):
    settings: Settings = app[SETTINGS]
    set_json_codec()
    pool = open_pool(
        settings.database_url, min_size=settings.db_pool_min, max_size=settings.db_pool_max
    )
    await pool.open(wait=True, timeout=30)
    app[DATABASE] = Database(pool, load_queries())
    yield
    await pool.close()


async def _storage(app: web.Application):
    s: Settings = app[SETTINGS]
    storage = Storage(
        s.s3_endpoint,
        s.s3_access_key,
        s.s3_secret_key,
        s.s3_bucket,
        secure=s.s3_secure,
        region=s.s3_region,
    )
    await storage.ensure_bucket()
    app[STORAGE] = storage
    yield


async def _services(app: web.Application):
    s: Settings = app[SETTINGS]
    app[SERVICES] = app[ENDPOINT].services = Services(
        s,
        app[DATABASE],
        app[STORAGE],
        Authenticator(
            app[DATABASE],
            s.auth_cache_seconds,
            unknown_ttl=s.unknown_token_cache_seconds,
            unknown_max=s.unknown_token_cache_size,
            lookup_rate=s.token_lookups_per_second,
            lookup_burst=s.token_lookup_burst,
            max_clients=s.rate_limit_max_clients,
        ),
        app[REGISTRY],
        RateLimiter(s.rate_limit_per_second, s.rate_limit_burst, s.rate_limit_max_clients),
        app[METRICS],
    )
    app[OPENRPC] = document_for(app[REGISTRY])
    yield


async def _math_pool(app: web.Application):
    # No process starts until the first heavy call (fedrpc/math_pool.py).
    app[SERVICES].math_pool = pool = MathPool.from_settings(app[SETTINGS])
    yield
    await pool.close()


async def _artifact_sandbox(app: web.Application):
    # Org-supplied models are checked in a child process under these settings' limits; its
    # warm parent starts now, in the background (fedrpc/services/artifact_sandbox.py). It
    # serves every app of this process and exits with it.
    artifact_sandbox.configure(artifact_sandbox.SandboxLimits.from_settings(app[SETTINGS]))
    yield


async def _background(app: web.Application):
    settings: Settings = app[SETTINGS]
    task = asyncio.create_task(
        run_periodically(app[SERVICES], settings.background_interval_seconds)
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _openrpc(request: web.Request) -> web.Response:
    # The server URL is the address the server listens on, never the Host header; no-store
    # keeps a shared cache from serving one connection's document to another.
    url = server_url(request.app[SETTINGS], request.transport)
    body = request.app[OPENRPC].encoded(url)
    return web.Response(
        body=body, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    services: Services = request.app[SERVICES]
    db_ok = await services.db.ping()
    s3_ok = await services.storage.ping()
    status = 200 if db_ok and s3_ok else 503
    return web.json_response({"database": db_ok, "storage": s3_ok}, status=status)


async def _metrics(request: web.Request) -> web.Response:
    # FEDRPC_METRICS_TOKEN, when set, guards the scrape (compared in constant time).
    expected = request.app[SETTINGS].metrics_token
    if expected and not _bearer_is(request.headers.get("Authorization"), expected):
        return web.Response(
            status=401,
            text="GET /metrics needs 'Authorization: Bearer <FEDRPC_METRICS_TOKEN>'\n",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    return web.Response(
        body=request.app[METRICS].render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


def _bearer_is(header: str | None, expected: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    # surrogateescape: aiohttp decodes header bytes that are not UTF-8 that way, and such a
    # header is a wrong token (401), not a server fault.
    same = hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), expected.encode())
    return same and scheme.lower() == "bearer"
