"""federations.*: creation, membership, invitations and shared models."""

from __future__ import annotations

import pytest

from tests.conftest import register_device


@pytest.fixture
async def federation(client, org) -> dict:
    return await client.ok(
        "federations.create",
        {"name": "hospitals", "org_id": org.id, "description": "radiology"},
        org.token,
    )


async def test_create_makes_the_owner_its_first_active_member(client, org, federation):
    assert federation["owner_org_id"] == org.id and federation["id"].startswith("fed_")
    members = await client.ok("federations.members", {"federation_id": federation["id"]}, org.token)
    assert [(m["org_id"], m["status"]) for m in members["members"]] == [(org.id, "active")]
    assert (
        members["members"][0]["rounds_contributed"] == 0
        and members["members"][0]["avg_loss"] is None
    )


async def test_create_for_another_org_is_forbidden(client, org, other_org):
    error = await client.error(
        "federations.create", {"name": "x", "org_id": other_org.id}, org.token
    )
    assert error["data"]["type"] == "forbidden"


def assert_invalid_params(error: dict, path: str) -> None:
    assert error["code"] == -32602 and error["data"]["type"] == "bad_request", error
    assert error["data"]["path"] == path, error


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"org_id": "org_" + "0" * 32}, "$"),
        ({"name": "", "org_id": "org_" + "0" * 32}, "$.name"),
        ({"name": "n" * 129, "org_id": "org_" + "0" * 32}, "$.name"),
        ({"name": "x", "org_id": "org_" + "0" * 32, "description": "d" * 513}, "$.description"),
        (
            {
                "name": "x",
                "org_id": "org_" + "0" * 32,
                "privacy_policy": {"total_epsilon_budget": -1},
            },
            "$.privacy_policy.total_epsilon_budget",
        ),
    ],
)
async def test_create_validates_params(client, org, params, path):
    assert_invalid_params(await client.error("federations.create", params, org.token), path)


async def test_invite_join_lifecycle(client, org, other_org, make_org, federation):
    fed_id = federation["id"]
    invited = await client.ok(
        "federations.invite", {"federation_id": fed_id, "org_ids": [other_org.id]}, org.token
    )
    row = invited["invitations"][0]
    assert (
        row["org_id"] == other_org.id
        and row["status"] == "invited"
        and row["federation_id"] == fed_id
    )
    again = await client.ok(
        "federations.invite", {"federation_id": fed_id, "org_ids": [other_org.id]}, org.token
    )
    assert again["invitations"][0]["id"] == row["id"]

    # Invited is not yet a member.
    assert (await client.error("federations.get", {"federation_id": fed_id}, other_org.token))[
        "data"
    ]["type"] == "forbidden"
    joined = await client.ok(
        "federations.join", {"federation_id": fed_id, "org_id": other_org.id}, other_org.token
    )
    assert joined["status"] == "active" and joined["joined_at"] is not None
    twice = await client.ok(
        "federations.join", {"federation_id": fed_id, "org_id": other_org.id}, other_org.token
    )
    assert twice == joined
    assert (await client.ok("federations.get", {"federation_id": fed_id}, other_org.token))[
        "id"
    ] == fed_id
    listed = await client.ok("federations.list", {}, other_org.token)
    assert [f["id"] for f in listed["items"]] == [fed_id] and listed["total"] == 1

    stranger = await make_org("stranger")
    error = await client.error(
        "federations.join", {"federation_id": fed_id, "org_id": stranger.id}, stranger.token
    )
    assert error["data"]["type"] == "forbidden"
    members = await client.ok("federations.members", {"federation_id": fed_id}, org.token)
    assert sorted(m["org_id"] for m in members["members"]) == sorted([org.id, other_org.id])


async def test_only_the_owner_invites(client, org, other_org, federation):
    await client.ok(
        "federations.invite",
        {"federation_id": federation["id"], "org_ids": [other_org.id]},
        org.token,
    )
    await client.ok(
        "federations.join",
        {"federation_id": federation["id"], "org_id": other_org.id},
        other_org.token,
    )
    error = await client.error(
        "federations.invite",
        {"federation_id": federation["id"], "org_ids": [org.id]},
        other_org.token,
    )
    assert error["data"]["type"] == "forbidden"


async def test_joining_for_another_org_is_forbidden(client, org, other_org, federation):
    await client.ok(
        "federations.invite",
        {"federation_id": federation["id"], "org_ids": [other_org.id]},
        org.token,
    )
    error = await client.error(
        "federations.join", {"federation_id": federation["id"], "org_id": other_org.id}, org.token
    )
    assert error["data"]["type"] == "forbidden"


async def test_invite_validates_org_ids(client, org, federation):
    fed = federation["id"]
    for org_ids in ([], "x"):
        assert_invalid_params(
            await client.error(
                "federations.invite", {"federation_id": fed, "org_ids": org_ids}, org.token
            ),
            "$.org_ids",
        )
    unknown = await client.error(
        "federations.invite", {"federation_id": fed, "org_ids": ["org_" + "1" * 32]}, org.token
    )
    assert unknown["data"]["type"] == "not_found"
    members = await client.ok("federations.members", {"federation_id": fed}, org.token)
    assert len(members["members"]) == 1


async def test_unknown_federation_is_not_found(client, org):
    error = await client.error("federations.get", {"federation_id": "fed_" + "2" * 32}, org.token)
    assert error["data"]["type"] == "not_found"


async def test_devices_cannot_call_federation_methods(client, org, federation):
    device = await register_device(client, org.token)
    error = await client.error(
        "federations.get", {"federation_id": federation["id"]}, device["token"]
    )
    assert error["data"]["type"] == "forbidden"


async def test_list_filters_by_name(client, org):
    for name in ("alpha hospitals", "beta banks"):
        await client.ok("federations.create", {"name": name, "org_id": org.id}, org.token)
    listed = await client.ok("federations.list", {"name": "hosp"}, org.token)
    assert [f["name"] for f in listed["items"]] == ["alpha hospitals"] and listed["total"] == 1


async def test_shared_models_are_readable_by_members_only(
    client, org, other_org, make_org, federation
):
    model = await client.ok("models.create", {"name": "ct"}, org.token)
    fed = federation["id"]
    assert (await client.error("models.get", {"model_id": model["id"]}, other_org.token))["data"][
        "type"
    ] == "forbidden"
    shared = await client.ok(
        "federations.models.share", {"federation_id": fed, "model_id": model["id"]}, org.token
    )
    assert [m["id"] for m in shared["items"]] == [model["id"]]
    await client.ok(
        "federations.invite", {"federation_id": fed, "org_ids": [other_org.id]}, org.token
    )
    assert (await client.error("models.get", {"model_id": model["id"]}, other_org.token))["data"][
        "type"
    ] == "forbidden"
    await client.ok(
        "federations.join", {"federation_id": fed, "org_id": other_org.id}, other_org.token
    )
    assert (await client.ok("models.get", {"model_id": model["id"]}, other_org.token))[
        "id"
    ] == model["id"]
    assert (await client.ok("models.versions.list", {"model_id": model["id"]}, other_org.token))[
        "total"
    ] == 0
    listed = await client.ok("federations.models.list", {"federation_id": fed}, other_org.token)
    assert listed["items"][0]["name"] == "ct" and listed["items"][0]["org_id"] == org.id
    stranger = await make_org("stranger")
    error = await client.error("federations.models.list", {"federation_id": fed}, stranger.token)
    assert error["data"]["type"] == "forbidden"


async def test_members_cannot_change_shared_models(client, org, other_org, federation):
    model = await client.ok("models.create", {"name": "ct"}, org.token)
    fed = federation["id"]
    await client.ok(
        "federations.models.share", {"federation_id": fed, "model_id": model["id"]}, org.token
    )
    await client.ok(
        "federations.invite", {"federation_id": fed, "org_ids": [other_org.id]}, org.token
    )
    await client.ok(
        "federations.join", {"federation_id": fed, "org_id": other_org.id}, other_org.token
    )
    error = await client.error(
        "models.versions.create",
        {
            "model_id": model["id"],
            "weights": {"data": "AA=="},
            "onnx": {"data": "AA=="},
            "program": {"data": "AA=="},
        },
        other_org.token,
    )
    assert error["data"]["type"] == "forbidden"


async def test_only_the_owner_shares_and_only_its_own_models(client, org, other_org, federation):
    theirs = await client.ok("models.create", {"name": "theirs"}, other_org.token)
    error = await client.error(
        "federations.models.share",
        {"federation_id": federation["id"], "model_id": theirs["id"]},
        org.token,
    )
    assert error["data"]["type"] == "forbidden"
    mine = await client.ok("models.create", {"name": "mine"}, org.token)
    error = await client.error(
        "federations.models.share",
        {"federation_id": federation["id"], "model_id": mine["id"]},
        other_org.token,
    )
    assert error["data"]["type"] == "forbidden"
