"""training rounds: create, select devices, start, cancel, read, progress."""

from __future__ import annotations

import hashlib

import aiohttp
import pytest
import safetensors.numpy

from tests.conftest import register_device
from tests.methods.conftest import inline, shared_federation

ROUND_UNKNOWN = "rnd_" + "4" * 32


async def make_round(client, org, model, **extra) -> dict:
    params = {
        "model_id": model["id"],
        "base_version": 1,
        "target_device_count": 3,
        "min_updates": 1,
        **extra,
    }
    return await client.ok("training.create_round", params, org.token)


async def test_create_round_is_pending_with_its_config(client, org, mlp_model):
    rnd = await make_round(
        client,
        org,
        mlp_model,
        strategy={"name": "fedprox", "params": {}},
        client_config={"epochs": 2, "learning_rate": 0.1, "proximal_mu": 0.01},
    )
    assert (
        rnd["state"] == "pending" and rnd["id"].startswith("rnd_") and rnd["selected_devices"] == []
    )
    assert rnd["strategy"] == "fedprox" and rnd["client_config"]["proximal_mu"] == 0.01
    assert rnd["client_config"]["batch_size"] == 32 and rnd["update_format"] == "delta"


@pytest.mark.parametrize(
    ("extra", "kind"),
    [
        ({"base_version": 7}, "not_found"),
        ({"min_updates": 5}, "bad_request"),
        ({"differential_privacy": {"noise_multiplier": 1.0, "clipping_norm": 1.0}}, "bad_request"),
    ],
)
async def test_create_round_refuses_impossible_configs(client, org, mlp_model, extra, kind):
    params = {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 3, **extra}
    assert (await client.error("training.create_round", params, org.token))["data"]["type"] == kind


@pytest.mark.parametrize(
    "bad",
    [
        {"target_device_count": 0},
        {"deadline_seconds": 1},
        {"strategy": {"name": "magic"}},
        {"client_config": {"learning_rate": -1}},
        {"base_version": "1"},
    ],
)
async def test_create_round_validates_params(client, org, mlp_model, bad):
    params = {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 3, **bad}
    assert (await client.error("training.create_round", params, org.token))["code"] == -32602


async def test_other_orgs_cannot_use_or_see_the_round(client, org, other_org, mlp_model):
    params = {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 1}
    assert (await client.error("training.create_round", params, other_org.token))["data"][
        "type"
    ] == "forbidden"
    rnd = await make_round(client, org, mlp_model)
    for method in (
        "training.get_round",
        "training.get_round_progress",
        "training.start_round",
        "training.cancel_round",
        "training.select_devices",
    ):
        error = await client.error(method, {"round_id": rnd["id"]}, other_org.token)
        assert error["data"]["type"] == "forbidden", method
    assert (await client.ok("training.list_rounds", {}, other_org.token))["total"] == 0
    error = await client.error("training.get_round", {"round_id": ROUND_UNKNOWN}, org.token)
    assert error["data"]["type"] == "not_found"


async def test_devices_cannot_manage_rounds(client, org, mlp_model):
    device = await register_device(client, org.token)
    rnd = await make_round(client, org, mlp_model)
    error = await client.error("training.start_round", {"round_id": rnd["id"]}, device["token"])
    assert error["data"]["type"] == "forbidden"


async def test_select_picks_among_eligible_devices_and_records_the_population(
    client, org, other_org, mlp_model
):
    wifi = [await register_device(client, org.token) for _ in range(5)]
    for _ in range(3):
        await register_device(
            client, org.token, capabilities={"battery_pct": 90, "network_type": "cellular"}
        )
    await register_device(client, other_org.token)
    rnd = await make_round(client, org, mlp_model)
    selected = await client.ok(
        "training.select_devices",
        {"round_id": rnd["id"], "criteria": {"network_type": "wifi"}},
        org.token,
    )
    assert selected["eligible_count"] == 5 and len(selected["selected"]) == 3
    assert set(selected["selected"]) <= {d["device_id"] for d in wifi}
    detail = await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert detail["state"] == "selected" and sorted(detail["selected_devices"]) == sorted(
        selected["selected"]
    )
    assert detail["eligible_count"] == 5 and detail["selection_seed"] == selected["selection_seed"]
    again = await client.error("training.select_devices", {"round_id": rnd["id"]}, org.token)
    assert again["data"]["type"] == "precondition_failed" and again["data"]["state"] == "selected"


@pytest.mark.parametrize(
    ("criteria", "eligible"),
    [
        ({"min_battery": 50}, 2),
        ({"charging": True}, 1),
        ({"platform": "ios"}, 1),
        ({"min_app_version": "1.10.0"}, 1),
        ({"max_app_version": "1.9"}, 1),
        ({"max_app_version": "1.9.3"}, 2),
        ({"min_app_version": "1.2.0"}, 3),
        ({"heartbeat_max_age_seconds": 3600}, 3),
    ],
)
async def test_selection_criteria(client, org, mlp_model, criteria, eligible):
    await register_device(
        client,
        org.token,
        platform="ios",
        app_version="1.10.0",
        capabilities={"battery_pct": 80, "charging": True, "network_type": "wifi"},
    )
    await register_device(
        client,
        org.token,
        app_version="1.9.3",
        capabilities={"battery_pct": 60, "charging": False, "network_type": "wifi"},
    )
    await register_device(
        client,
        org.token,
        app_version="1.2",
        capabilities={"battery_pct": 10, "charging": False, "network_type": "wifi"},
    )
    rnd = await make_round(client, org, mlp_model, target_device_count=10)
    selected = await client.ok(
        "training.select_devices", {"round_id": rnd["id"], "criteria": criteria}, org.token
    )
    assert selected["eligible_count"] == eligible and len(selected["selected"]) == eligible


async def test_selection_by_group_and_fraction(client, org, mlp_model):
    devices = [await register_device(client, org.token) for _ in range(6)]
    group = await client.ok("devices.groups.create", {"name": "beta"}, org.token)
    await client.ok(
        "devices.groups.add_devices",
        {"group_id": group["id"], "device_ids": [d["device_id"] for d in devices[:4]]},
        org.token,
    )
    rnd = await make_round(client, org, mlp_model, target_device_count=10)
    selected = await client.ok(
        "training.select_devices",
        {"round_id": rnd["id"], "criteria": {"device_group_id": group["id"], "fraction": 0.5}},
        org.token,
    )
    assert selected["eligible_count"] == 4 and len(selected["selected"]) == 2


async def test_no_eligible_device_is_a_precondition_failure(client, org, mlp_model):
    rnd = await make_round(client, org, mlp_model)
    error = await client.error("training.select_devices", {"round_id": rnd["id"]}, org.token)
    assert error["data"]["type"] == "precondition_failed"
    assert (await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token))[
        "state"
    ] == "pending"


async def test_federation_rounds_select_devices_of_active_members(
    client, org, other_org, make_org, mlp_model
):
    fed = await shared_federation(client, org, other_org, mlp_model, "f")
    outsider = await make_org("outsider")
    mine = await register_device(client, org.token)
    theirs = await register_device(client, other_org.token)
    await register_device(client, outsider.token)
    rnd = await make_round(client, org, mlp_model, federation_id=fed["id"], target_device_count=10)
    selected = await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    # The owner sees its own devices by id and the member's only as a count.
    assert selected["selected"] == [mine["device_id"]] and selected["selected_count"] == 2
    assert sorted((p["org_id"], p["selected"]) for p in selected["participation"]) == sorted(
        [(org.id, 1), (other_org.id, 1)]
    )
    seen_by_member = await client.ok("training.get_round", {"round_id": rnd["id"]}, other_org.token)
    assert seen_by_member["selected_devices"] == [theirs["device_id"]]
    listed = await client.ok("training.list_rounds", {"federation_id": fed["id"]}, other_org.token)
    assert [r["id"] for r in listed["items"]] == [rnd["id"]]
    # A member may read the round but not run it.
    assert (await client.error("training.start_round", {"round_id": rnd["id"]}, other_org.token))[
        "data"
    ]["type"] == "forbidden"


async def test_members_cannot_create_rounds_on_the_owners_model(client, org, other_org, mlp_model):
    fed = await shared_federation(client, org, other_org, mlp_model, "f")
    params = {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 10}
    for extra in ({"federation_id": fed["id"]}, {}):
        error = await client.error("training.create_round", {**params, **extra}, other_org.token)
        assert error["data"]["type"] == "forbidden"
    rounds = await client.ok("training.list_rounds", {}, org.token)
    assert rounds["total"] == 0


async def test_a_member_cannot_run_its_own_unshared_model_in_the_federation(
    client, org, other_org, mlp_model, mlp_bundle
):
    fed = await shared_federation(client, org, other_org, mlp_model, "f")
    own = await client.ok("models.create", {"name": "mine"}, other_org.token)
    await client.ok(
        "models.versions.create", {"model_id": own["id"], **inline(mlp_bundle[1])}, other_org.token
    )
    params = {"model_id": own["id"], "base_version": 1, "target_device_count": 10}
    error = await client.error(
        "training.create_round", {**params, "federation_id": fed["id"]}, other_org.token
    )
    assert error["data"]["type"] == "forbidden"
    # Outside the federation, on its own devices, it may.
    await client.ok("training.create_round", params, other_org.token)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"strategy": {"name": "krum"}}, "strategy"),
        ({"strategy": {"name": "fedmedian"}}, "strategy"),
        ({"target_device_count": 5}, "target_device_count"),
    ],
)
async def test_federation_rounds_follow_the_federations_rules(
    client, org, other_org, mlp_model, change, field
):
    fed = await shared_federation(client, org, other_org, mlp_model, "f", min_round_updates=6)
    params = {
        "model_id": mlp_model["id"],
        "base_version": 1,
        "federation_id": fed["id"],
        "target_device_count": 10,
    }
    error = await client.error("training.create_round", {**params, **change}, org.token)
    assert error["data"]["type"] == "bad_request" and error["data"]["field"] == field
    # min_updates below the federation's is raised to it.
    created = await client.ok("training.create_round", {**params, "min_updates": 1}, org.token)
    assert created["min_updates"] == 6


async def test_a_budgeted_federation_accepts_only_private_rounds(client, org, other_org, mlp_model):
    fed = await client.ok(
        "federations.create",
        {
            "name": "private",
            "org_id": org.id,
            "min_round_updates": 2,
            "privacy_policy": {"total_epsilon_budget": 8.0},
        },
        org.token,
    )
    await client.ok(
        "federations.models.share",
        {"federation_id": fed["id"], "model_id": mlp_model["id"]},
        org.token,
    )
    params = {
        "model_id": mlp_model["id"],
        "base_version": 1,
        "federation_id": fed["id"],
        "target_device_count": 10,
    }
    error = await client.error("training.create_round", params, org.token)
    assert error["data"]["type"] == "bad_request"
    assert error["data"]["field"] == "differential_privacy"
    dp = {"noise_multiplier": 1.0, "clipping_norm": 1.0}
    await client.ok("training.create_round", {**params, "differential_privacy": dp}, org.token)


async def test_state_machine(client, org, mlp_model):
    await register_device(client, org.token)
    rnd = await make_round(client, org, mlp_model)
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    running = await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    assert running["state"] == "running" and running["deadline_at"] is not None
    error = await client.error("training.start_round", {"round_id": rnd["id"]}, org.token)
    assert error["data"]["type"] == "precondition_failed" and error["data"]["state"] == "running"
    progress = await client.ok("training.get_round_progress", {"round_id": rnd["id"]}, org.token)
    assert (
        progress["selected_count"] == 1
        and progress["received_count"] == 0
        and progress["total_samples"] == 0
    )
    assert 3500 < progress["seconds_remaining"] <= 3600
    cancelled = await client.ok(
        "training.cancel_round", {"round_id": rnd["id"], "reason": "bad data"}, org.token
    )
    assert cancelled["state"] == "cancelled" and cancelled["cancel_reason"] == "bad data"
    error = await client.error("training.cancel_round", {"round_id": rnd["id"]}, org.token)
    assert error["data"]["state"] == "cancelled" and error["data"]["allowed"] == [
        "pending",
        "selected",
        "running",
        "aggregating",
    ]
    progress = await client.ok("training.get_round_progress", {"round_id": rnd["id"]}, org.token)
    assert progress["seconds_remaining"] is None


async def test_list_rounds_filters(client, org, mlp_model):
    first = await make_round(client, org, mlp_model)
    await make_round(client, org, mlp_model)
    await client.ok("training.cancel_round", {"round_id": first["id"]}, org.token)
    pending = await client.ok("training.list_rounds", {"state": "pending"}, org.token)
    assert pending["total"] == 1 and pending["items"][0]["id"] != first["id"]
    everything = await client.ok(
        "training.list_rounds", {"model_id": mlp_model["id"], "limit": 1}, org.token
    )
    assert everything["total"] == 2 and len(everything["items"]) == 1


async def test_devices_get_offers_for_running_rounds_and_stop_instructions(
    client, org, mlp_model, mlp_bundle
):
    device = await register_device(client, org.token)
    idle = await register_device(client, org.token, platform="ios")
    rnd = await make_round(
        client, org, mlp_model, client_config={"epochs": 3, "learning_rate": 0.05}
    )
    await client.ok(
        "training.select_devices",
        {"round_id": rnd["id"], "criteria": {"platform": "android"}},
        org.token,
    )
    sync = await client.ok("devices.sync", {}, device["token"])
    assert sync["desired_state"]["round_offers"] == []  # selected but not started
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)

    offers = (await client.ok("devices.sync", {"battery_pct": 70}, device["token"]))[
        "desired_state"
    ]["round_offers"]
    assert [o["round_id"] for o in offers] == [rnd["id"]]
    offer = offers[0]
    assert offer["model_id"] == mlp_model["id"] and offer["base_version"] == 1
    assert offer["client_config"]["epochs"] == 3 and offer["update_format"] == "delta"
    assert offer["differential_privacy"] is None and offer["secure_aggregation"] is None
    async with aiohttp.ClientSession() as http, http.get(offer["weights_url"]) as resp:
        weights = await resp.read()
    assert hashlib.sha256(weights).hexdigest() == offer["weights_sha256"]
    net, _ = mlp_bundle
    assert set(safetensors.numpy.load(weights)) == set(net.state_dict())
    assert (await client.ok("devices.sync", {}, idle["token"]))["desired_state"][
        "round_offers"
    ] == []

    await client.ok(
        "training.cancel_round", {"round_id": rnd["id"], "reason": "model changed"}, org.token
    )
    desired = (await client.ok("devices.sync", {}, device["token"]))["desired_state"]
    assert desired["round_offers"] == []
    assert desired["stop_rounds"] == [
        {"round_id": rnd["id"], "state": "cancelled", "reason": "model changed"}
    ]
