"""A NUL character (U+0000) in any string bound for Postgres is a bad_request, and nothing is stored.

JSON carries ``\\u0000`` happily; PostgreSQL's text and jsonb cannot hold it. ``fedrpc.db``
refuses such a value before any statement runs, whichever method sent it and however deep
in the params it sits.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from fedrpc.app import SERVICES
from fedrpc.db import Database
from fedrpc.errors import BadRequest
from methods.devices import Heartbeat
from tests.conftest import DEVICE_DEFAULTS, register_device

NUL = "\u0000"


def assert_nul_refused(error: dict) -> None:
    assert error["code"] == 4400, error
    assert error["data"]["type"] == "bad_request"
    assert error["data"]["reason"] == "nul_character"
    assert "psycopg" not in str(error) and "0x00" not in str(error)


def count(database_url: str, table: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608


@pytest.mark.parametrize(
    "params",
    [
        {"name": f"key{NUL}board"},
        {"name": "keyboard", "use_case": NUL},
        {"name": "keyboard", "description": f"a{NUL}"},
    ],
    ids=["name", "use_case", "description"],
)
async def test_models_create_with_a_nul_is_a_bad_request_and_stores_nothing(
    client, org, database_url, params
):
    assert_nul_refused(await client.error("models.create", params, org.token))
    assert count(database_url, "models") == 0
    assert (await client.ok("models.list", {}, org.token))["total"] == 0


async def test_federations_create_with_a_nul_name_is_a_bad_request(client, org, database_url):
    params = {"name": f"fed{NUL}", "org_id": org.id}
    assert_nul_refused(await client.error("federations.create", params, org.token))
    assert count(database_url, "federations") == 0


async def test_devices_register_with_a_nul_model_is_a_bad_request(client, org, database_url):
    params = {**DEVICE_DEFAULTS, "model": f"Pixel{NUL}8"}
    assert_nul_refused(await client.error("devices.register", params, org.token))
    assert count(database_url, "devices") == 0


async def test_a_nul_in_a_filter_is_a_bad_request_too(client, org):
    assert_nul_refused(await client.error("models.list", {"name": NUL}, org.token))


async def test_a_device_job_error_text_with_a_nul_is_a_bad_request(
    client, org, mlp_model, database_url
):
    device = await register_device(client, org.token)
    job = await client.ok(
        "training.device_jobs.create",
        {"job_type": "personalization", "model_id": mlp_model["id"], "base_version": 1},
        device["token"],
    )
    params = {"job_id": job["id"], "state": "failed", "last_error": f"oom{NUL}"}
    error = await client.error("training.device_jobs.update_status", params, device["token"])
    assert_nul_refused(error)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT state, last_error FROM device_jobs").fetchone()
    assert row == (job["state"], None)


@pytest.mark.parametrize(
    "state",
    [{"a": {"b": ["ok", f"x{NUL}"]}}, {"a": {f"k{NUL}": 1}}],
    ids=["nested value", "nested key"],
)
async def test_a_nul_deep_in_a_device_state_is_a_bad_request(client, org, state):
    device = await register_device(client, org.token)
    params = {"battery_pct": 10, "state": state}
    assert_nul_refused(await client.error("devices.sync", params, device["token"]))
    stored = await client.ok("devices.get", {"device_id": device["device_id"]}, org.token)
    assert stored["battery_pct"] == DEVICE_DEFAULTS["capabilities"]["battery_pct"]
    assert stored["state"] == {}


async def test_an_escaped_backslash_before_u0000_is_plain_text(client, org):
    # The JSON string "a\\u0000" is the six characters a \ u 0 0 0 0: no NUL, nothing to refuse.
    created = await client.ok("models.create", {"name": "a\\u0000"}, org.token)
    assert created["name"] == "a\\u0000"
    device = await register_device(client, org.token)
    synced = await client.ok("devices.sync", {"state": {"k": "b\\u0000"}}, device["token"])
    assert synced["device_id"] == device["device_id"]
    stored = await client.ok("devices.get", {"device_id": device["device_id"]}, org.token)
    assert stored["state"] == {"k": "b\\u0000"}


async def test_a_nul_never_joins_a_group_commit_batch(client, org, monkeypatch):
    """The heartbeat with a NUL is refused before the shared statement; the others share one."""
    fleet = [await register_device(client, org.token) for _ in range(4)]
    db = client.app[SERVICES].db
    seen: list[str] = []
    original = Database.all

    def counting(self, name, *args, **kwargs):
        seen.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(Database, "all", counting)
    fields = ("battery_pct", "charging", "network_type", "available_storage_mb")
    versions = ["2.0", f"2.{NUL}", "2.2", "2.3"]

    def beat(device_id: str, app_version: str):
        params = {"device_id": device_id, **dict.fromkeys(fields), "state": None}
        return db.coalesced(
            "devices.update_device_states",
            Heartbeat,
            key="device_id",
            app_version=app_version,
            **params,
        )

    outcomes = await asyncio.gather(
        *(beat(d["device_id"], v) for d, v in zip(fleet, versions, strict=True)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], BadRequest)
    assert [o.device_id for n, o in enumerate(outcomes) if n != 1] == [
        d["device_id"] for n, d in enumerate(fleet) if n != 1
    ]
    assert seen == ["devices.update_device_states"]  # one statement, no retries one by one
