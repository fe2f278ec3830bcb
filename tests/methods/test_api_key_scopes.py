"""Scoped API keys: an enrollment key registers devices and does nothing else.

A device app ships an enrollment key, so these tests play a hostile app holder:
it tries every other method, tries to exceed the key's bounds, and tries to
register devices faster than the per-address limit allows.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from fedrpc.auth import ENROLL_BURST
from tests.conftest import DEVICE_DEFAULTS, register_device


async def enroll_key(client, org, **bounds) -> dict:
    return await client.ok(
        "orgs.api_keys.create", {"name": "app", "scope": "enroll", **bounds}, org.token
    )


async def device_total(client, org) -> int:
    return (await client.ok("devices.list", {}, org.token))["total"]


async def listed_key(client, org, key_id: str) -> dict:
    keys = await client.ok("orgs.api_keys.list", {"include_revoked": True}, org.token)
    return next(k for k in keys["items"] if k["id"] == key_id)


def registration(n: int = 0) -> dict:
    return {**DEVICE_DEFAULTS, "model": f"Pixel {n}"}


def assert_error(error: dict, type_: str) -> None:
    assert error["data"]["type"] == type_, error


# orgs.api_keys.create with a scope


async def test_a_key_without_a_scope_is_an_admin_key(client, org):
    key = await client.ok("orgs.api_keys.create", {"name": "ci"}, org.token)
    assert key["scope"] == "admin" and key["max_devices"] is None and key["expires_at"] is None
    assert await client.ok("models.list", {}, key["token"])  # still does everything
    listed = await listed_key(client, org, key["id"])
    assert listed["scope"] == "admin" and listed["devices_registered"] == 0


async def test_an_enrollment_key_shows_its_scope_and_bounds(client, org):
    group = await client.ok("devices.groups.create", {"name": "beta"}, org.token)
    before = datetime.now(UTC)
    key = await enroll_key(
        client, org, device_group_ids=[group["id"]], expires_in_seconds=3600, max_devices=5
    )
    assert key["token"].startswith("fk_") and key["scope"] == "enroll"
    assert key["device_group_ids"] == [group["id"]] and key["max_devices"] == 5
    expires = datetime.fromisoformat(key["expires_at"])
    assert before + timedelta(minutes=59) < expires < before + timedelta(minutes=61)
    await client.ok("devices.register", registration(), key["token"])
    listed = await listed_key(client, org, key["id"])
    assert {k: listed[k] for k in ("scope", "max_devices", "devices_registered")} == {
        "scope": "enroll",
        "max_devices": 5,
        "devices_registered": 1,
    }
    assert listed["expires_at"] == key["expires_at"] and "token" not in listed


async def test_an_enrollment_key_registers_devices_into_its_groups(client, org):
    group = await client.ok("devices.groups.create", {"name": "beta"}, org.token)
    key = await enroll_key(client, org, device_group_ids=[group["id"]])
    device = await client.ok("devices.register", registration(), key["token"])
    assert device["device"]["org_id"] == org.id
    assert device["device"]["group_ids"] == [group["id"]]
    synced = await client.ok("devices.sync", {"battery_pct": 50}, device["token"])
    assert synced["device_id"] == device["device_id"]


# An enrollment key is refused everything else, decided in dispatch.


def _methods_an_enrollment_key_may_not_call() -> list[str]:
    from fedrpc.registry import Registry

    registry = Registry.from_package()
    return [s.name for s in registry if not s.public and s.name != "devices.register"]


@pytest.mark.parametrize("method", _methods_an_enrollment_key_may_not_call())
async def test_an_enrollment_key_may_call_nothing_but_register(client, org, method):
    key = await enroll_key(client, org)
    error = await client.error(method, {}, key["token"])
    assert_error(error, "forbidden")
    assert error["data"]["message"].startswith("an enrollment key may only register devices")


async def test_an_enrollment_key_cannot_mint_an_admin_key(client, org):
    key = await enroll_key(client, org)
    error = await client.error("orgs.api_keys.create", {"name": "escalate"}, key["token"])
    assert_error(error, "forbidden")
    assert (await client.ok("orgs.api_keys.list", {}, org.token))["total"] == 2


async def test_an_enrollment_key_cannot_read_its_orgs_devices(client, org):
    await register_device(client, org.token)
    key = await enroll_key(client, org)
    for method in ("devices.list", "orgs.get", "orgs.api_keys.list", "system.ping"):
        assert_error(await client.error(method, {}, key["token"]), "forbidden")


async def test_an_enrollment_key_cannot_join_groups_it_is_not_bound_to(client, org):
    bound = await client.ok("devices.groups.create", {"name": "beta"}, org.token)
    other = await client.ok("devices.groups.create", {"name": "staff"}, org.token)
    key = await enroll_key(client, org, device_group_ids=[bound["id"]])
    params = {**registration(), "device_group_ids": [other["id"]]}
    error = await client.error("devices.register", params, key["token"])
    assert_error(error, "forbidden")
    assert error["data"]["ids"] == [other["id"]]
    assert await device_total(client, org) == 0
    assert (await listed_key(client, org, key["id"]))["devices_registered"] == 0
    again = {**registration(), "device_group_ids": [bound["id"]]}
    assert (await client.ok("devices.register", again, key["token"]))["device"]["group_ids"] == [
        bound["id"]
    ]


async def test_binding_an_enrollment_key_to_another_orgs_group_is_forbidden(client, org, other_org):
    theirs = await client.ok("devices.groups.create", {"name": "beta"}, other_org.token)
    error = await client.error(
        "orgs.api_keys.create",
        {"name": "app", "scope": "enroll", "device_group_ids": [theirs["id"]]},
        org.token,
    )
    assert_error(error, "forbidden")
    assert (await client.ok("orgs.api_keys.list", {}, org.token))["total"] == 1


async def test_binding_an_enrollment_key_to_an_unknown_group_is_not_found(client, org):
    params = {"name": "app", "scope": "enroll", "device_group_ids": ["grp_" + "0" * 32]}
    assert_error(await client.error("orgs.api_keys.create", params, org.token), "not_found")


# Bounds: expiry, revocation, max_devices


async def test_an_expired_enrollment_key_stops_working(client, org, database_url):
    key = await enroll_key(client, org, expires_in_seconds=3600)
    await client.ok("devices.register", registration(), key["token"])
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        sql = "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = %s"
        await conn.execute(sql, (key["id"],))
    resp, body = await client.post(
        {"jsonrpc": "2.0", "method": "devices.register", "params": registration(1), "id": 1},
        key["token"],
    )
    assert resp.status == 401 and body["error"]["data"]["type"] == "unauthorized"
    assert await device_total(client, org) == 1


async def test_a_revoked_enrollment_key_stops_working(client, org):
    key = await enroll_key(client, org)
    await client.ok("orgs.api_keys.revoke", {"key_id": key["id"]}, org.token)
    resp, body = await client.post(
        {"jsonrpc": "2.0", "method": "devices.register", "params": registration(), "id": 1},
        key["token"],
    )
    assert resp.status == 401 and body["error"]["data"]["type"] == "unauthorized"
    assert await device_total(client, org) == 0


async def test_max_devices_holds_under_concurrent_registrations(client, org):
    key = await enroll_key(client, org, max_devices=3)
    answers = await asyncio.gather(
        *(client.call("devices.register", registration(n), key["token"]) for n in range(10))
    )
    assert sum("result" in a for a in answers) == 3
    refused = [a["error"] for a in answers if "error" in a]
    assert all(e["data"]["type"] == "forbidden" for e in refused), refused
    assert "maximum number of devices" in refused[0]["data"]["message"]
    assert await device_total(client, org) == 3
    assert (await listed_key(client, org, key["id"]))["devices_registered"] == 3


async def test_enrollment_is_rate_limited_per_client_address(client, org, other_org):
    key = await enroll_key(client, org)
    batch = [
        {"jsonrpc": "2.0", "method": "devices.register", "params": registration(n), "id": n}
        for n in range(ENROLL_BURST)
    ]
    resp, body = await client.post(batch, key["token"])
    assert resp.status == 200 and all("result" in b for b in body)
    resp, body = await client.post(
        {"jsonrpc": "2.0", "method": "devices.register", "params": registration(), "id": 1},
        key["token"],
    )
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert body["error"]["data"]["type"] == "rate_limited"
    # The org's admin key and another organization's enrollment key are not held back.
    await register_device(client, org.token)
    theirs = await enroll_key(client, other_org)
    await client.ok("devices.register", registration(), theirs["token"])
    assert await device_total(client, org) == ENROLL_BURST + 1


async def test_refused_calls_do_not_spend_the_enrollment_allowance(client, org):
    key = await enroll_key(client, org)
    for _ in range(ENROLL_BURST + 1):
        assert_error(await client.error("devices.list", {}, key["token"]), "forbidden")
    await client.ok("devices.register", registration(), key["token"])


async def test_discover_names_enrollment_keys_as_callers_of_register_only(client):
    doc = await client.ok("rpc.discover")
    callers = {m["name"]: m["x-callers"] for m in doc["methods"]}
    assert callers["devices.register"] == ["org", "enroll"]
    assert [name for name, who in callers.items() if "enroll" in who] == ["devices.register"]


# Bad input


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({"scope": "root"}, "$.scope"),
        ({"scope": "enroll", "max_devices": 0}, "$.max_devices"),
        ({"scope": "enroll", "expires_in_seconds": 0}, "$.expires_in_seconds"),
        ({"scope": "enroll", "expires_in_seconds": 10**9}, "$.expires_in_seconds"),
        ({"scope": "enroll", "device_group_ids": ["nope"]}, "$.device_group_ids[0]"),
        ({"max_devices": 5}, "$"),
        ({"scope": "admin", "expires_in_seconds": 60}, "$"),
        ({"device_group_ids": ["grp_" + "0" * 32]}, "$"),
    ],
)
async def test_create_refuses_bad_scopes_and_bounds(client, org, extra, path):
    error = await client.error("orgs.api_keys.create", {"name": "k", **extra}, org.token)
    assert error["code"] == -32602 and error["data"]["type"] == "bad_request", error
    assert error["data"]["path"] == path, error
    assert (await client.ok("orgs.api_keys.list", {}, org.token))["total"] == 1


async def test_a_device_may_not_create_keys(client, org):
    device = await register_device(client, org.token)
    params = {"name": "k", "scope": "enroll"}
    assert_error(await client.error("orgs.api_keys.create", params, device["token"]), "forbidden")
