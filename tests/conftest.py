"""Real services for the suite: one throwaway Postgres and one S3 server per session.

Each test gets its own database, cloned from a migrated template (fast), and
its own bucket, so tests never see each other's rows or objects.
"""

from __future__ import annotations

import asyncio
import io
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from fedrpc.app import create_app
from fedrpc.db import migrate
from fedrpc.embedded import EmbeddedPostgres, EmbeddedS3
from fedrpc.settings import Settings

TEMPLATE_DB = "fedrpc_template"


@dataclass
class Services:
    admin_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    with EmbeddedPostgres.temporary() as pg, EmbeddedS3.temporary() as s3:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
        asyncio.run(migrate(make_conninfo(pg.url, dbname=TEMPLATE_DB)))
        yield Services(pg.url, s3.endpoint, s3.access_key, s3.secret_key)


@pytest.fixture
def database_url(services: Services) -> Iterator[str]:
    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(services.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    yield make_conninfo(services.admin_url, dbname=name)
    with psycopg.connect(services.admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def settings(services: Services, database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        s3_endpoint=services.s3_endpoint,
        s3_access_key=services.s3_access_key,
        s3_secret_key=services.s3_secret_key,
        s3_bucket="b-" + secrets.token_hex(6),
        db_pool_min=1,
        db_pool_max=4,
        auth_cache_seconds=0.0,
    )


class RpcClient:
    """Posts JSON-RPC calls through real HTTP and decodes the answers."""

    def __init__(self, http) -> None:
        self.http = http
        self.app = http.server.app

    async def post(self, body: Any, token: str | None = None, raw: bool = False):
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = body if raw else msgspec.json.encode(body)
        if isinstance(data, bytes) and len(data) > 1 << 20:
            data = io.BytesIO(data)  # aiohttp warns that large raw bytes block the loop
        resp = await self.http.post("/rpc", data=data, headers=headers)
        text = await resp.read()
        return resp, (msgspec.json.decode(text) if text else None)

    async def call(
        self, method: str, params: Any = None, token: str | None = None, id_: Any = 1
    ) -> dict:
        """The whole response object of one call."""
        envelope = {"jsonrpc": "2.0", "method": method, "id": id_}
        if params is not None:
            envelope["params"] = params
        _, body = await self.post(envelope, token)
        return body

    async def ok(self, method: str, params: Any = None, token: str | None = None) -> Any:
        """The result of a call that must succeed."""
        body = await self.call(method, params, token)
        assert "error" not in body, body
        return body["result"]

    async def error(self, method: str, params: Any = None, token: str | None = None) -> dict:
        """The error object of a call that must fail."""
        body = await self.call(method, params, token)
        assert "error" in body, body
        return body["error"]


@pytest.fixture
async def client(aiohttp_client, settings: Settings) -> RpcClient:
    return RpcClient(await aiohttp_client(create_app(settings)))


@dataclass
class OrgHandle:
    id: str
    token: str


@pytest.fixture
def make_org(client: RpcClient):
    from fedrpc.admin import create_org
    from fedrpc.app import SERVICES

    async def make(name: str | None = None) -> OrgHandle:
        org, token = await create_org(
            client.app[SERVICES].db, name or "org-" + secrets.token_hex(4)
        )
        return OrgHandle(org.id, token)

    return make


@pytest.fixture
async def org(make_org) -> OrgHandle:
    return await make_org("acme")


@pytest.fixture
async def other_org(make_org) -> OrgHandle:
    return await make_org("globex")


DEVICE_DEFAULTS = {
    "platform": "android",
    "os_version": "14",
    "model": "Pixel 8",
    "app_version": "1.0.0",
    "capabilities": {
        "battery_pct": 80,
        "charging": True,
        "network_type": "wifi",
        "available_storage_mb": 2048,
    },
}


async def register_device(client: RpcClient, org_token: str, **overrides: Any) -> dict:
    """A registered device (its result, with `token`)."""
    capabilities = {**DEVICE_DEFAULTS["capabilities"], **overrides.pop("capabilities", {})}
    return await client.ok(
        "devices.register",
        {**DEVICE_DEFAULTS, **overrides, "capabilities": capabilities},
        org_token,
    )
