"""devices.*: register, get, list and sync, over real HTTP against a real Postgres."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from fedrpc.db import Database

DEVICE_ID = re.compile(r"^dev_[0-9a-f]{32}$")


def capabilities(**changes) -> dict:
    return {
        "battery_pct": 80,
        "charging": True,
        "network_type": "wifi",
        "available_storage_mb": 2048,
        **changes,
    }


def registration(**changes) -> dict:
    return {
        "platform": "android",
        "os_version": "14",
        "model": "Pixel 8",
        "app_version": "1.0.0",
        "capabilities": capabilities(),
        **changes,
    }


async def register(client, org, **changes) -> dict:
    return await client.ok("devices.register", registration(**changes), org.token)


async def create_group(client, org, name: str = "beta") -> str:
    return (await client.ok("devices.groups.create", {"name": name}, org.token))["id"]


async def device_total(client, org) -> int:
    return (await client.ok("devices.list", {}, org.token))["total"]


def assert_error(error: dict, type_: str, code: int | None = None) -> None:
    assert error["data"]["type"] == type_, error
    if code is not None:
        assert error["code"] == code, error


def assert_invalid_params(error: dict, path: str) -> None:
    assert error["code"] == -32602 and error["data"]["type"] == "bad_request", error
    assert error["data"]["path"] == path, error


async def execute(database_url: str, sql: str, *args) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(sql, args)


# devices.register


async def test_register_returns_the_id_a_token_and_the_record(client, org):
    result = await register(client, org)
    device = result["device"]
    assert DEVICE_ID.match(result["device_id"]) and device["id"] == result["device_id"]
    assert result["token"].startswith("fd_") and len(result["token"]) > 40
    expected = {
        "org_id": org.id,
        "platform": "android",
        "os_version": "14",
        "model": "Pixel 8",
        "app_version": "1.0.0",
        "state": {},
        "group_ids": [],
        **capabilities(),
    }
    assert {k: device[k] for k in expected} == expected
    registered = datetime.fromisoformat(device["registered_at"])
    assert abs(datetime.now(UTC) - registered) < timedelta(minutes=1)
    assert device["last_seen_at"] == device["registered_at"] and "revoked_at" not in device


async def test_the_device_token_authenticates_as_that_device(client, org):
    result = await register(client, org)
    pong = await client.ok("system.ping", token=result["token"])
    assert pong["principal"] == f"device:{result['device_id']}"


async def test_the_token_is_stored_only_as_its_sha256(client, org, database_url):
    result = await register(client, org)
    digest = hashlib.sha256(result["token"].encode()).digest()
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        row = await (await conn.execute("SELECT id, token_hash FROM devices")).fetchone()
        dump = await (await conn.execute("SELECT d::text FROM devices AS d")).fetchone()
    assert row == (result["device_id"], digest)
    assert result["token"] not in dump[0]


async def test_register_joins_the_named_groups(client, org):
    first, second = await create_group(client, org, "a"), await create_group(client, org, "b")
    result = await register(client, org, device_group_ids=[second, first, second])
    assert result["device"]["group_ids"] == sorted([first, second])
    counts = {
        g["id"]: g["member_count"]
        for g in (await client.ok("devices.groups.list", {}, org.token))["items"]
    }
    assert counts == {first: 1, second: 1}


async def test_register_with_another_orgs_group_is_forbidden_and_writes_nothing(
    client, org, other_org
):
    own, foreign = (
        await create_group(client, org, "own"),
        await create_group(client, other_org, "theirs"),
    )
    error = await client.error(
        "devices.register", registration(device_group_ids=[own, foreign]), org.token
    )
    assert_error(error, "forbidden", 4403)
    assert error["data"]["ids"] == [foreign]
    assert await device_total(client, org) == 0
    groups = (await client.ok("devices.groups.list", {}, org.token))["items"]
    assert [g["member_count"] for g in groups] == [0]


async def test_register_with_an_unknown_group_is_not_found_and_writes_nothing(client, org):
    own = await create_group(client, org)
    unknown = "grp_" + "0" * 32
    error = await client.error(
        "devices.register", registration(device_group_ids=[own, unknown]), org.token
    )
    assert_error(error, "not_found", 4404)
    assert error["data"]["ids"] == [unknown]
    assert await device_total(client, org) == 0


async def test_register_replay_with_the_same_key_returns_the_same_device(client, org):
    params = registration(idempotency_key="boot-42")
    first = await client.ok("devices.register", params, org.token)
    again = await client.ok("devices.register", params, org.token)
    assert again == first
    assert await device_total(client, org) == 1


async def test_register_with_a_used_key_and_other_params_is_a_conflict(client, org):
    await client.ok("devices.register", registration(idempotency_key="k1"), org.token)
    error = await client.error(
        "devices.register", registration(idempotency_key="k1", model="Other"), org.token
    )
    assert_error(error, "conflict", 4409)
    assert await device_total(client, org) == 1


async def test_a_failed_register_releases_its_key_for_a_retry(client, org):
    unknown = "grp_" + "1" * 32
    bad = registration(idempotency_key="k2", device_group_ids=[unknown])
    assert_error(await client.error("devices.register", bad, org.token), "not_found")
    await client.ok("devices.register", registration(idempotency_key="k2"), org.token)
    assert await device_total(client, org) == 1


async def test_register_needs_a_token(client):
    resp, body = await client.post(
        {"jsonrpc": "2.0", "method": "devices.register", "params": registration(), "id": 1}
    )
    assert resp.status == 401
    assert_error(body["error"], "unauthorized", 4401)


async def test_a_device_may_not_register_devices(client, org):
    device = await register(client, org)
    assert_error(
        await client.error("devices.register", registration(), device["token"]), "forbidden", 4403
    )
    assert await device_total(client, org) == 1


async def test_a_revoked_org_key_cannot_register(client, org):
    key = await client.ok("orgs.api_keys.create", {"name": "ci"}, org.token)
    await client.ok("orgs.api_keys.revoke", {"key_id": key["id"]}, org.token)
    resp, body = await client.post(
        {"jsonrpc": "2.0", "method": "devices.register", "params": registration(), "id": 1},
        key["token"],
    )
    assert resp.status == 401
    assert_error(body["error"], "unauthorized")


def _without(key: str) -> dict:
    params = registration()
    del params[key]
    return params


BAD_REGISTRATIONS = [
    pytest.param(_without("platform"), "$", id="missing-platform"),
    pytest.param(registration(capabilities=None), "$.capabilities", id="null-capabilities"),
    pytest.param(registration(platform="symbian"), "$.platform", id="unknown-platform"),
    pytest.param(registration(platform=3), "$.platform", id="platform-not-a-string"),
    pytest.param(registration(os_version=""), "$.os_version", id="empty-os-version"),
    pytest.param(registration(model="m" * 129), "$.model", id="model-too-long"),
    pytest.param(
        registration(capabilities=capabilities(battery_pct=101)),
        "$.capabilities.battery_pct",
        id="battery-over-100",
    ),
    pytest.param(
        registration(capabilities=capabilities(battery_pct=-1)),
        "$.capabilities.battery_pct",
        id="battery-negative",
    ),
    pytest.param(
        registration(capabilities=capabilities(battery_pct=50.5)),
        "$.capabilities.battery_pct",
        id="battery-fractional",
    ),
    pytest.param(
        registration(capabilities=capabilities(charging="yes")),
        "$.capabilities.charging",
        id="charging-not-bool",
    ),
    pytest.param(
        registration(capabilities=capabilities(network_type="5g")),
        "$.capabilities.network_type",
        id="unknown-network",
    ),
    pytest.param(
        registration(capabilities=capabilities(available_storage_mb=-1)),
        "$.capabilities.available_storage_mb",
        id="storage-negative",
    ),
    pytest.param(
        registration(capabilities=capabilities(available_storage_mb=10**30)),
        "$.capabilities.available_storage_mb",
        id="storage-huge",
    ),
    pytest.param(
        registration(capabilities=capabilities(gpu=True)), "$.capabilities", id="unknown-capability"
    ),
    pytest.param(registration(serial="X1"), "$", id="unknown-field"),
    pytest.param(
        registration(device_group_ids=["not-an-id"]), "$.device_group_ids[0]", id="bad-group-id"
    ),
    pytest.param(
        registration(device_group_ids="grp_" + "0" * 32),
        "$.device_group_ids",
        id="group-ids-not-a-list",
    ),
    pytest.param(registration(idempotency_key=""), "$.idempotency_key", id="empty-idempotency-key"),
]


@pytest.mark.parametrize(("params", "path"), BAD_REGISTRATIONS)
async def test_register_refuses_bad_params_and_names_the_field(client, org, params, path):
    assert_invalid_params(await client.error("devices.register", params, org.token), path)
    assert await device_total(client, org) == 0


# Capabilities are optional field by field: a device reports what it knows.

UNKNOWN_CAPABILITIES = {
    "battery_pct": None,
    "charging": None,
    "network_type": None,
    "available_storage_mb": None,
}


@pytest.mark.parametrize(
    "reported",
    [
        {},
        {"battery_pct": 40},
        {"battery_pct": 40, "charging": True, "network_type": "cellular"},
        {"available_storage_mb": 512, "network_type": None},
    ],
)
async def test_register_takes_any_subset_of_capabilities(client, org, reported):
    device = await register(client, org, capabilities=reported)
    stored = {k: device["device"][k] for k in UNKNOWN_CAPABILITIES}
    assert stored == {**UNKNOWN_CAPABILITIES, **reported}


async def test_register_without_capabilities_registers_them_as_unknown(client, org):
    params = registration()
    del params["capabilities"]
    device = await client.ok("devices.register", params, org.token)
    assert {k: device["device"][k] for k in UNKNOWN_CAPABILITIES} == UNKNOWN_CAPABILITIES


def _readme_example(method: str) -> dict:
    """The JSON-RPC body of the README's curl example for ``method``."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    bodies = [json.loads(b) for b in re.findall(r"-d '(\{.*\})'", readme)]
    return next(b for b in bodies if b["method"] == method)


async def test_the_readme_register_example_works(client, org):
    body = _readme_example("devices.register")
    _, answer = await client.post(body, org.token)
    assert "result" in answer, answer
    assert answer["result"]["device"]["available_storage_mb"] is None


async def test_sync_fills_in_a_capability_unknown_at_registration(client, org):
    device = await register(client, org, capabilities={"battery_pct": 40})
    await client.ok("devices.sync", {"available_storage_mb": 900}, device["token"])
    record = await client.ok("devices.get", {"device_id": device["device_id"]}, org.token)
    assert record["available_storage_mb"] == 900 and record["battery_pct"] == 40
    assert record["charging"] is None


async def test_a_device_of_unknown_battery_fails_min_battery_but_no_criterion(
    client, org, mlp_model
):
    known = await register(client, org, capabilities={"battery_pct": 90})
    unknown = await register(client, org, capabilities={"charging": True})
    params = {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 10}
    picky = await client.ok("training.create_round", params, org.token)
    chosen = await client.ok(
        "training.select_devices",
        {"round_id": picky["id"], "criteria": {"min_battery": 10}},
        org.token,
    )
    assert chosen["selected"] == [known["device_id"]]
    open_round = await client.ok("training.create_round", params, org.token)
    chosen = await client.ok("training.select_devices", {"round_id": open_round["id"]}, org.token)
    assert sorted(chosen["selected"]) == sorted([known["device_id"], unknown["device_id"]])


# devices.get


async def test_an_org_gets_its_device(client, org):
    created = await register(client, org, model="Galaxy S24", platform="android")
    device = await client.ok("devices.get", {"device_id": created["device_id"]}, org.token)
    assert device == created["device"]


async def test_a_device_gets_itself(client, org):
    created = await register(client, org)
    device = await client.ok("devices.get", {"device_id": created["device_id"]}, created["token"])
    assert device["id"] == created["device_id"] and device["org_id"] == org.id


async def test_an_org_may_not_get_another_orgs_device(client, org, other_org):
    theirs = await register(client, other_org)
    assert_error(
        await client.error("devices.get", {"device_id": theirs["device_id"]}, org.token),
        "forbidden",
        4403,
    )


async def test_a_device_may_not_get_another_device(client, org, other_org):
    me, sibling, stranger = (
        await register(client, org),
        await register(client, org),
        await register(client, other_org),
    )
    for other in (sibling, stranger):
        error = await client.error("devices.get", {"device_id": other["device_id"]}, me["token"])
        assert_error(error, "forbidden", 4403)


async def test_getting_an_unknown_device_is_not_found(client, org):
    error = await client.error("devices.get", {"device_id": "dev_" + "a" * 32}, org.token)
    assert_error(error, "not_found", 4404)


async def test_get_needs_a_token(client, org):
    created = await register(client, org)
    resp, body = await client.post(
        {
            "jsonrpc": "2.0",
            "method": "devices.get",
            "params": {"device_id": created["device_id"]},
            "id": 1,
        }
    )
    assert resp.status == 401
    assert_error(body["error"], "unauthorized")


@pytest.mark.parametrize(
    ("params", "path"),
    [
        pytest.param({}, "$", id="missing"),
        pytest.param({"device_id": 7}, "$.device_id", id="not-a-string"),
        pytest.param({"device_id": "grp_" + "0" * 32}, "$.device_id", id="wrong-prefix"),
        pytest.param({"device_id": "dev_" + "0" * 32, "extra": 1}, "$", id="unknown-field"),
    ],
)
async def test_get_refuses_bad_params(client, org, params, path):
    assert_invalid_params(await client.error("devices.get", params, org.token), path)


# devices.list

FLEET = [
    {
        "platform": "android",
        "capabilities": capabilities(battery_pct=90, charging=True, network_type="wifi"),
    },
    {
        "platform": "ios",
        "capabilities": capabilities(battery_pct=30, charging=False, network_type="cellular"),
    },
    {
        "platform": "linux",
        "capabilities": capabilities(battery_pct=50, charging=True, network_type="ethernet"),
    },
    {
        "platform": "android",
        "capabilities": capabilities(battery_pct=10, charging=False, network_type="wifi"),
    },
]


def matches(spec: dict, filters: dict) -> bool:
    caps = spec["capabilities"]
    return all(
        [
            filters.get("platform") in (None, spec["platform"]),
            filters.get("network_type") in (None, caps["network_type"]),
            filters.get("charging") in (None, caps["charging"]),
            caps["battery_pct"] >= filters.get("min_battery", 0),
        ]
    )


@pytest.fixture
async def fleet(client, org) -> list[str]:
    """The FLEET's device ids, in registration order."""
    return [(await register(client, org, **spec))["device_id"] for spec in FLEET]


async def test_list_returns_newest_first_with_the_total(client, org, fleet, other_org):
    await register(client, other_org)
    page = await client.ok("devices.list", {}, org.token)
    assert [d["id"] for d in page["items"]] == fleet[::-1]
    assert page["total"] == len(FLEET)


@pytest.mark.parametrize(("limit", "offset"), [(2, 0), (2, 2), (3, 3), (1, 10)])
async def test_list_pages_through_the_devices(client, org, fleet, limit, offset):
    page = await client.ok("devices.list", {"limit": limit, "offset": offset}, org.token)
    assert [d["id"] for d in page["items"]] == fleet[::-1][offset : offset + limit]
    assert page["total"] == len(FLEET)


@pytest.mark.parametrize(
    "filters",
    [
        {"platform": "android"},
        {"platform": "ios"},
        {"platform": "windows"},
        {"network_type": "wifi"},
        {"charging": False},
        {"charging": True},
        {"min_battery": 50},
        {"min_battery": 100},
        {"platform": "android", "charging": True, "min_battery": 20},
    ],
)
async def test_list_filters_on_what_devices_reported(client, org, fleet, filters):
    page = await client.ok("devices.list", filters, org.token)
    expected = [i for spec, i in zip(FLEET, fleet, strict=True) if matches(spec, filters)]
    assert [d["id"] for d in page["items"]] == expected[::-1]
    assert page["total"] == len(expected)


async def test_list_filters_on_group_membership(client, org, fleet):
    group = await create_group(client, org)
    await client.ok(
        "devices.groups.add_devices",
        {"group_id": group, "device_ids": [fleet[0], fleet[2]]},
        org.token,
    )
    page = await client.ok("devices.list", {"device_group_id": group}, org.token)
    assert [d["id"] for d in page["items"]] == [fleet[2], fleet[0]] and page["total"] == 2
    assert all(d["group_ids"] == [group] for d in page["items"])


async def test_list_filters_on_when_devices_were_last_seen(client, org, fleet, database_url):
    await execute(
        database_url,
        "UPDATE devices SET last_seen_at = now() - interval '1 hour' WHERE id = %s",
        fleet[1],
    )
    recent = await client.ok("devices.list", {"seen_within_seconds": 600}, org.token)
    assert {d["id"] for d in recent["items"]} == set(fleet) - {fleet[1]} and recent["total"] == 3
    wide = await client.ok("devices.list", {"seen_within_seconds": 7200}, org.token)
    assert wide["total"] == len(FLEET)


async def test_list_by_another_orgs_group_is_forbidden(client, org, other_org):
    theirs = await create_group(client, other_org)
    assert_error(
        await client.error("devices.list", {"device_group_id": theirs}, org.token),
        "forbidden",
        4403,
    )


async def test_list_by_an_unknown_group_is_not_found(client, org):
    error = await client.error("devices.list", {"device_group_id": "grp_" + "9" * 32}, org.token)
    assert_error(error, "not_found", 4404)


async def test_a_device_may_not_list_devices(client, org):
    device = await register(client, org)
    assert_error(await client.error("devices.list", {}, device["token"]), "forbidden", 4403)


async def test_list_needs_a_token(client):
    resp, body = await client.post({"jsonrpc": "2.0", "method": "devices.list", "id": 1})
    assert resp.status == 401
    assert_error(body["error"], "unauthorized")


@pytest.mark.parametrize(
    ("params", "path"),
    [
        pytest.param({"limit": 0}, "$.limit", id="limit-zero"),
        pytest.param({"limit": 501}, "$.limit", id="limit-over-500"),
        pytest.param({"offset": -1}, "$.offset", id="negative-offset"),
        pytest.param({"platform": "palm"}, "$.platform", id="unknown-platform"),
        pytest.param({"network_type": "5g"}, "$.network_type", id="unknown-network"),
        pytest.param({"charging": "yes"}, "$.charging", id="charging-not-bool"),
        pytest.param({"min_battery": 101}, "$.min_battery", id="min-battery-over-100"),
        pytest.param({"seen_within_seconds": 0}, "$.seen_within_seconds", id="seen-within-zero"),
        pytest.param({"device_group_id": "grp_x"}, "$.device_group_id", id="bad-group-id"),
        pytest.param({"sort": "name"}, "$", id="unknown-field"),
    ],
)
async def test_list_refuses_bad_params(client, org, params, path):
    assert_invalid_params(await client.error("devices.list", params, org.token), path)


# devices.sync


async def test_sync_answers_with_the_poll_interval_and_an_empty_desired_state(
    client, org, settings
):
    device = await register(client, org)
    result = await client.ok("devices.sync", {}, device["token"])
    assert result["device_id"] == device["device_id"]
    assert result["next_poll_interval_seconds"] == settings.sync_interval_seconds
    assert result["desired_state"] == {"round_offers": [], "stop_rounds": []}
    assert abs(datetime.now(UTC) - datetime.fromisoformat(result["server_time"])) < timedelta(
        minutes=1
    )


async def test_sync_stores_the_reported_state_and_the_time_seen(client, org):
    device = await register(client, org)
    report = {
        "battery_pct": 15,
        "charging": False,
        "network_type": "cellular",
        "available_storage_mb": 100,
        "app_version": "2.0.0",
        "state": {"temperature_c": 41.5, "tags": ["idle", "screen-off"], "nested": {"n": None}},
    }
    result = await client.ok("devices.sync", report, device["token"])
    stored = await client.ok("devices.get", {"device_id": device["device_id"]}, org.token)
    assert {k: stored[k] for k in report} == report
    assert stored["last_seen_at"] == result["server_time"]
    assert datetime.fromisoformat(stored["last_seen_at"]) > datetime.fromisoformat(
        device["device"]["last_seen_at"]
    )


async def test_sync_keeps_what_is_not_reported(client, org):
    device = await register(client, org)
    await client.ok("devices.sync", {"state": {"mode": "a"}}, device["token"])
    await client.ok("devices.sync", {"battery_pct": 42}, device["token"])
    stored = await client.ok("devices.get", {"device_id": device["device_id"]}, device["token"])
    assert stored["battery_pct"] == 42 and stored["state"] == {"mode": "a"}
    unchanged = {
        "app_version": "1.0.0",
        **{k: v for k, v in capabilities().items() if k != "battery_pct"},
    }
    assert {k: stored[k] for k in unchanged} == unchanged


async def test_sync_changes_only_the_calling_device(client, org):
    me, sibling = await register(client, org), await register(client, org)
    await client.ok("devices.sync", {"battery_pct": 3, "state": {"x": 1}}, me["token"])
    other = await client.ok("devices.get", {"device_id": sibling["device_id"]}, org.token)
    assert other == sibling["device"]


async def test_sync_runs_a_single_query_and_no_transaction(client, org, monkeypatch):
    device = await register(client, org)
    seen: list[str] = []

    def in_background() -> bool:
        # The app's background jobs (storage collector, idempotency purge) share the
        # Database and may run meanwhile, in their own task: only the call's statements count.
        task = asyncio.current_task()
        return task is not None and task.get_coro().__qualname__ == "run_periodically"

    for helper in ("get", "maybe", "all", "value", "run"):
        original = getattr(Database, helper)

        def counting(self, name, *args, _original=original, **kwargs):
            if not in_background():
                seen.append(name)
            return _original(self, name, *args, **kwargs)

        monkeypatch.setattr(Database, helper, counting)
    transaction = Database.transaction

    def no_transaction(self):
        if not in_background():
            pytest.fail("sync opened a transaction")
        return transaction(self)

    monkeypatch.setattr(Database, "transaction", no_transaction)
    await client.ok("devices.sync", {"battery_pct": 20, "state": {"k": "v"}}, device["token"])
    assert len([name for name in seen if not name.startswith("auth.")]) == 1


def _state_of_size(size: int) -> dict:
    state = {"blob": "x" * (size - len('{"blob":""}'))}
    assert len(json.dumps(state, separators=(",", ":"))) == size
    return state


async def test_sync_accepts_a_state_of_16_kib(client, org):
    device = await register(client, org)
    state = _state_of_size(16 * 1024)
    await client.ok("devices.sync", {"state": state}, device["token"])
    stored = await client.ok("devices.get", {"device_id": device["device_id"]}, device["token"])
    assert stored["state"] == state


async def test_sync_refuses_a_state_over_16_kib(client, org):
    device = await register(client, org)
    await client.ok("devices.sync", {"state": {"before": True}}, device["token"])
    error = await client.error(
        "devices.sync", {"state": _state_of_size(16 * 1024 + 1)}, device["token"]
    )
    assert_error(error, "payload_too_large", 4413)
    assert error["data"]["max_bytes"] == 16 * 1024
    stored = await client.ok("devices.get", {"device_id": device["device_id"]}, device["token"])
    assert stored["state"] == {"before": True}


def _state_of_depth(depth: int) -> dict:
    inner: list = []
    for _ in range(depth - 2):
        inner = [inner]
    return {"d": inner}  # the state object, then depth - 1 nested lists


async def test_sync_accepts_a_state_nested_32_levels(client, org):
    device = await register(client, org)
    state = _state_of_depth(32)
    await client.ok("devices.sync", {"state": state}, device["token"])
    stored = await client.ok("devices.get", {"device_id": device["device_id"]}, device["token"])
    assert stored["state"] == state


async def test_sync_refuses_a_state_nested_deeper_than_32_levels(client, org):
    device = await register(client, org)
    error = await client.error("devices.sync", {"state": _state_of_depth(33)}, device["token"])
    assert_invalid_params(error, "$")
    assert "state" in error["data"]["message"]


async def test_a_body_nested_past_the_decoders_limit_gets_a_jsonrpc_error(client, org):
    device = await register(client, org)
    nested = b"[" * 2000 + b"]" * 2000
    body = (
        b'{"jsonrpc":"2.0","method":"devices.sync","id":1,"params":{"state":{"d":' + nested + b"}}}"
    )
    resp, answer = await client.post(body, device["token"], raw=True)
    assert resp.status == 200 and answer["error"]["code"] in (-32700, -32600, -32602)
    assert answer["error"]["data"]["type"] == "bad_request", answer


@pytest.mark.parametrize(
    ("params", "path"),
    [
        pytest.param('{"state":{"t":[1,1e999]}}', "$.state", id="state-1e999"),
        pytest.param('{"state":{"t":-1e999}}', "$.state", id="state-minus-1e999"),
        pytest.param('{"state":{"t":1.8e308}}', "$.state", id="state-past-max-double"),
        pytest.param('{"battery_pct":1e999}', "$.battery_pct", id="battery-1e999"),
    ],
)
async def test_sync_refuses_numbers_that_overflow_a_double(client, org, params, path):
    # Valid JSON that no double holds: a client can send it, so it must be refused cleanly.
    device = await register(client, org)
    body = f'{{"jsonrpc":"2.0","method":"devices.sync","id":1,"params":{params}}}'
    _, answer = await client.post(body.encode(), device["token"], raw=True)
    error = answer["error"]
    assert error["code"] == -32602 and error["data"]["type"] == "bad_request"
    assert error["data"]["path"].startswith(
        path
    )  # inside free-form state msgspec says "$.state[...]"
    stored = await client.ok("devices.get", {"device_id": device["device_id"]}, device["token"])
    assert stored["state"] == {} and stored["battery_pct"] == capabilities()["battery_pct"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_sync_with_a_non_json_number_is_a_parse_error(client, org, literal):
    # What Python's json.dumps writes for nan/inf; it is not JSON, so the whole body is refused.
    device = await register(client, org)
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "method": "devices.sync",
            "id": 1,
            "params": {"state": {"t": float(literal.lower().replace("infinity", "inf"))}},
        }
    )
    assert literal in body
    _, answer = await client.post(body.encode(), device["token"], raw=True)
    assert answer["error"]["code"] == -32700 and answer["error"]["data"]["type"] == "bad_request"
    stored = await client.ok("devices.get", {"device_id": device["device_id"]}, device["token"])
    assert stored["state"] == {}


async def test_an_org_key_may_not_sync(client, org):
    assert_error(await client.error("devices.sync", {}, org.token), "forbidden", 4403)


async def test_sync_needs_a_token(client):
    resp, body = await client.post(
        {"jsonrpc": "2.0", "method": "devices.sync", "params": {}, "id": 1}
    )
    assert resp.status == 401
    assert_error(body["error"], "unauthorized")


async def test_a_revoked_device_may_not_sync(client, org, database_url):
    device = await register(client, org)
    await execute(
        database_url, "UPDATE devices SET revoked_at = now() WHERE id = %s", device["device_id"]
    )
    resp, body = await client.post(
        {"jsonrpc": "2.0", "method": "devices.sync", "params": {}, "id": 1}, device["token"]
    )
    assert resp.status == 401
    assert_error(body["error"], "unauthorized")


@pytest.mark.parametrize(
    ("params", "path"),
    [
        pytest.param({"battery_pct": 101}, "$.battery_pct", id="battery-over-100"),
        pytest.param({"charging": 1}, "$.charging", id="charging-not-bool"),
        pytest.param({"network_type": "lte"}, "$.network_type", id="unknown-network"),
        pytest.param({"available_storage_mb": -5}, "$.available_storage_mb", id="storage-negative"),
        pytest.param({"app_version": ""}, "$.app_version", id="empty-app-version"),
        pytest.param({"state": [1, 2]}, "$.state", id="state-not-an-object"),
        pytest.param({"state": "on"}, "$.state", id="state-a-string"),
        pytest.param({"device_id": "dev_" + "0" * 32}, "$", id="no-device-id-param"),
    ],
)
async def test_sync_refuses_bad_params(client, org, params, path):
    device = await register(client, org)
    assert_invalid_params(await client.error("devices.sync", params, device["token"]), path)
