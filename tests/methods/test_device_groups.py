"""devices.groups.*: create, list and add_devices, over real HTTP against a real Postgres."""

from __future__ import annotations

import re
import secrets

import pytest

GROUP_ID = re.compile(r"^grp_[0-9a-f]{32}$")
UNKNOWN_DEVICE = "dev_" + "0" * 32
UNKNOWN_GROUP = "grp_" + "0" * 32


def registration() -> dict:
    return {
        "platform": "linux",
        "os_version": "6.8",
        "model": "rpi5",
        "app_version": "0.3.1",
        "capabilities": {
            "battery_pct": 100,
            "charging": True,
            "network_type": "ethernet",
            "available_storage_mb": 32_000,
        },
    }


async def register(client, org) -> dict:
    return await client.ok("devices.register", registration(), org.token)


async def new_devices(client, org, n: int) -> list[str]:
    return [(await register(client, org))["device_id"] for _ in range(n)]


async def create_group(client, org, name: str | None = None, **extra) -> dict:
    params = {"name": name or "g-" + secrets.token_hex(3), **extra}
    return await client.ok("devices.groups.create", params, org.token)


async def members(client, org, group_id: str) -> set[str]:
    page = await client.ok("devices.list", {"device_group_id": group_id, "limit": 500}, org.token)
    return {d["id"] for d in page["items"]}


async def member_counts(client, org) -> dict[str, int]:
    page = await client.ok("devices.groups.list", {}, org.token)
    return {g["id"]: g["member_count"] for g in page["items"]}


def assert_error(error: dict, type_: str, code: int | None = None) -> None:
    assert error["data"]["type"] == type_, error
    if code is not None:
        assert error["code"] == code, error


def assert_invalid_params(error: dict, path: str) -> None:
    assert error["code"] == -32602 and error["data"]["type"] == "bad_request", error
    assert error["data"]["path"] == path, error


async def unauthenticated(client, method: str, params: dict):
    resp, body = await client.post({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
    assert resp.status == 401
    assert_error(body["error"], "unauthorized", 4401)


# devices.groups.create


async def test_create_returns_an_empty_group(client, org):
    group = await create_group(client, org, "canary", description="first 5% of the fleet")
    assert GROUP_ID.match(group["id"])
    assert {k: group[k] for k in ("name", "description", "member_count")} == {
        "name": "canary",
        "description": "first 5% of the fleet",
        "member_count": 0,
    }
    assert "created_at" in group


async def test_create_defaults_the_description_to_empty(client, org):
    assert (await create_group(client, org, "plain"))["description"] == ""


async def test_a_name_used_in_the_org_is_a_conflict(client, org):
    await create_group(client, org, "canary")
    error = await client.error("devices.groups.create", {"name": "canary"}, org.token)
    assert_error(error, "conflict", 4409)
    assert "name" in error["data"]["message"]
    assert (await client.ok("devices.groups.list", {}, org.token))["total"] == 1


async def test_another_org_may_use_the_same_name(client, org, other_org):
    mine, theirs = (
        await create_group(client, org, "canary"),
        await create_group(client, other_org, "canary"),
    )
    assert mine["id"] != theirs["id"]


async def test_create_replay_returns_the_same_group(client, org):
    params = {"name": "canary", "idempotency_key": "setup-1"}
    first = await client.ok("devices.groups.create", params, org.token)
    assert await client.ok("devices.groups.create", params, org.token) == first
    assert (await client.ok("devices.groups.list", {}, org.token))["total"] == 1


async def test_create_with_a_used_key_and_other_params_is_a_conflict(client, org):
    await client.ok("devices.groups.create", {"name": "a", "idempotency_key": "k"}, org.token)
    error = await client.error(
        "devices.groups.create", {"name": "b", "idempotency_key": "k"}, org.token
    )
    assert_error(error, "conflict", 4409)
    assert [
        g["name"] for g in (await client.ok("devices.groups.list", {}, org.token))["items"]
    ] == ["a"]


async def test_a_device_may_not_create_groups(client, org):
    device = await register(client, org)
    assert_error(
        await client.error("devices.groups.create", {"name": "x"}, device["token"]),
        "forbidden",
        4403,
    )


async def test_create_needs_a_token(client):
    await unauthenticated(client, "devices.groups.create", {"name": "x"})


@pytest.mark.parametrize(
    ("params", "path"),
    [
        pytest.param({}, "$", id="missing-name"),
        pytest.param({"name": ""}, "$.name", id="empty-name"),
        pytest.param({"name": "n" * 129}, "$.name", id="name-too-long"),
        pytest.param({"name": 5}, "$.name", id="name-not-a-string"),
        pytest.param(
            {"name": "ok", "description": "d" * 513}, "$.description", id="description-too-long"
        ),
        pytest.param({"name": "ok", "owner": "me"}, "$", id="unknown-field"),
    ],
)
async def test_create_refuses_bad_params(client, org, params, path):
    assert_invalid_params(await client.error("devices.groups.create", params, org.token), path)
    assert (await client.ok("devices.groups.list", {}, org.token))["total"] == 0


# devices.groups.list


async def test_list_counts_members_and_puts_the_newest_first(client, org):
    groups = [(await create_group(client, org, name))["id"] for name in ("a", "b", "c")]
    devices = await new_devices(client, org, 3)
    await client.ok(
        "devices.groups.add_devices", {"group_id": groups[0], "device_ids": devices}, org.token
    )
    await client.ok(
        "devices.groups.add_devices", {"group_id": groups[1], "device_ids": devices[:1]}, org.token
    )
    page = await client.ok("devices.groups.list", {}, org.token)
    assert [g["id"] for g in page["items"]] == groups[::-1]
    assert {g["id"]: g["member_count"] for g in page["items"]} == {
        groups[0]: 3,
        groups[1]: 1,
        groups[2]: 0,
    }
    assert page["total"] == 3


async def test_list_shows_only_the_callers_groups(client, org, other_org):
    await create_group(client, other_org)
    mine = await create_group(client, org)
    page = await client.ok("devices.groups.list", {}, org.token)
    assert [g["id"] for g in page["items"]] == [mine["id"]] and page["total"] == 1


@pytest.mark.parametrize(("limit", "offset"), [(1, 0), (2, 1), (5, 0), (2, 4)])
async def test_list_pages_through_the_groups(client, org, limit, offset):
    groups = [(await create_group(client, org))["id"] for _ in range(4)]
    page = await client.ok("devices.groups.list", {"limit": limit, "offset": offset}, org.token)
    assert [g["id"] for g in page["items"]] == groups[::-1][offset : offset + limit]
    assert page["total"] == 4


async def test_a_device_may_not_list_groups(client, org):
    device = await register(client, org)
    assert_error(await client.error("devices.groups.list", {}, device["token"]), "forbidden", 4403)


async def test_list_needs_a_token(client):
    await unauthenticated(client, "devices.groups.list", {})


@pytest.mark.parametrize(
    ("params", "path"),
    [
        pytest.param({"limit": 0}, "$.limit", id="limit-zero"),
        pytest.param({"limit": 501}, "$.limit", id="limit-over-500"),
        pytest.param({"offset": -1}, "$.offset", id="negative-offset"),
        pytest.param({"limit": "10"}, "$.limit", id="limit-a-string"),
        pytest.param({"name": "a"}, "$", id="unknown-field"),
    ],
)
async def test_list_refuses_bad_params(client, org, params, path):
    assert_invalid_params(await client.error("devices.groups.list", params, org.token), path)


# devices.groups.add_devices


async def test_add_devices_counts_only_new_members(client, org):
    group = (await create_group(client, org))["id"]
    a, b, c = await new_devices(client, org, 3)
    first = await client.ok(
        "devices.groups.add_devices", {"group_id": group, "device_ids": [a, b]}, org.token
    )
    assert first == {"group_id": group, "added": 2, "member_count": 2}
    second = await client.ok(
        "devices.groups.add_devices", {"group_id": group, "device_ids": [b, c, c]}, org.token
    )
    assert second == {"group_id": group, "added": 1, "member_count": 3}
    again = await client.ok(
        "devices.groups.add_devices", {"group_id": group, "device_ids": [a, b, c]}, org.token
    )
    assert again == {"group_id": group, "added": 0, "member_count": 3}
    assert await members(client, org, group) == {a, b, c}


async def test_added_devices_show_their_groups(client, org):
    first, second = (await create_group(client, org))["id"], (await create_group(client, org))["id"]
    (device,) = await new_devices(client, org, 1)
    for group in (second, first):
        await client.ok(
            "devices.groups.add_devices", {"group_id": group, "device_ids": [device]}, org.token
        )
    record = await client.ok("devices.get", {"device_id": device}, org.token)
    assert record["group_ids"] == sorted([first, second])


async def test_add_devices_replay_returns_the_first_result(client, org):
    group = (await create_group(client, org))["id"]
    devices = await new_devices(client, org, 2)
    params = {"group_id": group, "device_ids": devices, "idempotency_key": "batch-7"}
    first = await client.ok("devices.groups.add_devices", params, org.token)
    assert (
        await client.ok("devices.groups.add_devices", params, org.token)
        == first
        == {"group_id": group, "added": 2, "member_count": 2}
    )


async def test_adding_to_another_orgs_group_is_forbidden(client, org, other_org):
    theirs = (await create_group(client, other_org))["id"]
    devices = await new_devices(client, org, 1)
    error = await client.error(
        "devices.groups.add_devices", {"group_id": theirs, "device_ids": devices}, org.token
    )
    assert_error(error, "forbidden", 4403)
    assert await member_counts(client, other_org) == {theirs: 0}


async def test_adding_another_orgs_device_is_forbidden_and_adds_nothing(client, org, other_org):
    group = (await create_group(client, org))["id"]
    mine = await new_devices(client, org, 2)
    (theirs,) = await new_devices(client, other_org, 1)
    params = {"group_id": group, "device_ids": [mine[0], theirs, mine[1]]}
    error = await client.error("devices.groups.add_devices", params, org.token)
    assert_error(error, "forbidden", 4403)
    assert error["data"]["ids"] == [theirs]
    assert await member_counts(client, org) == {group: 0}


async def test_adding_an_unknown_device_is_not_found_and_adds_nothing(client, org):
    group = (await create_group(client, org))["id"]
    mine = await new_devices(client, org, 1)
    params = {"group_id": group, "device_ids": [*mine, UNKNOWN_DEVICE]}
    error = await client.error("devices.groups.add_devices", params, org.token)
    assert_error(error, "not_found", 4404)
    assert error["data"]["ids"] == [UNKNOWN_DEVICE]
    assert await member_counts(client, org) == {group: 0}


async def test_adding_to_an_unknown_group_is_not_found(client, org):
    devices = await new_devices(client, org, 1)
    error = await client.error(
        "devices.groups.add_devices", {"group_id": UNKNOWN_GROUP, "device_ids": devices}, org.token
    )
    assert_error(error, "not_found", 4404)


async def test_a_thousand_ids_pass_validation(client, org):
    group = (await create_group(client, org))["id"]
    ids = [f"dev_{i:032x}" for i in range(1000)]
    error = await client.error(
        "devices.groups.add_devices", {"group_id": group, "device_ids": ids}, org.token
    )
    assert_error(error, "not_found", 4404)
    assert len(error["data"]["ids"]) == 20  # the first few unknown ids are named, not all of them


async def test_a_device_may_not_add_devices_to_groups(client, org):
    group = (await create_group(client, org))["id"]
    device = await register(client, org)
    params = {"group_id": group, "device_ids": [device["device_id"]]}
    assert_error(
        await client.error("devices.groups.add_devices", params, device["token"]), "forbidden", 4403
    )
    assert await member_counts(client, org) == {group: 0}


async def test_add_devices_needs_a_token(client):
    await unauthenticated(
        client,
        "devices.groups.add_devices",
        {"group_id": UNKNOWN_GROUP, "device_ids": [UNKNOWN_DEVICE]},
    )


@pytest.mark.parametrize(
    ("params", "path"),
    [
        pytest.param({"device_ids": [UNKNOWN_DEVICE]}, "$", id="missing-group"),
        pytest.param({"group_id": UNKNOWN_GROUP}, "$", id="missing-devices"),
        pytest.param(
            {"group_id": UNKNOWN_GROUP, "device_ids": []}, "$.device_ids", id="no-devices"
        ),
        pytest.param(
            {"group_id": UNKNOWN_GROUP, "device_ids": [UNKNOWN_DEVICE] * 1001},
            "$.device_ids",
            id="over-1000",
        ),
        pytest.param(
            {"group_id": UNKNOWN_GROUP, "device_ids": UNKNOWN_DEVICE},
            "$.device_ids",
            id="not-a-list",
        ),
        pytest.param(
            {"group_id": UNKNOWN_GROUP, "device_ids": ["dev_x"]},
            "$.device_ids[0]",
            id="bad-device-id",
        ),
        pytest.param(
            {"group_id": UNKNOWN_DEVICE, "device_ids": [UNKNOWN_DEVICE]},
            "$.group_id",
            id="device-id-as-group",
        ),
        pytest.param(
            {"group_id": UNKNOWN_GROUP, "device_ids": [UNKNOWN_DEVICE], "x": 1},
            "$",
            id="unknown-field",
        ),
    ],
)
async def test_add_devices_refuses_bad_params(client, org, params, path):
    assert_invalid_params(await client.error("devices.groups.add_devices", params, org.token), path)
