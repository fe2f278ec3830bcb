"""Who may run, aggregate and publish a model's rounds, and what a federation's rounds must mix.

Each test plays an attack through real HTTP with an owner organization (it owns
the model and the federation) and a member organization whose devices train it.
"""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy

from tests.conftest import register_device
from tests.methods.conftest import b64, inline, shared_federation


def _delta(net, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: (
            rng.normal(0, 0.1, v.shape).astype(np.float32)
            if v.dtype.is_floating_point
            else v.numpy()
        )
        for k, v in net.state_dict().items()
    }


async def _upload(client, rnd: dict, model: dict, token: str, net, seed: int) -> None:
    await client.ok(
        "training.weights.upload",
        {
            "round_id": rnd["id"],
            "model_id": model["id"],
            "version": 1,
            "sample_count": 10,
            "update_format": "delta",
            "weights": {"data": b64(safetensors.numpy.save(_delta(net, seed)))},
        },
        token,
    )


async def _federation_round(client, owner, member, model, *, owner_devices, member_devices, **fed):
    """A running federation round of the owner's model with every device of both selected."""
    federation = await shared_federation(client, owner, member, model, "f", **fed)
    mine = [await register_device(client, owner.token) for _ in range(owner_devices)]
    theirs = [await register_device(client, member.token) for _ in range(member_devices)]
    rnd = await client.ok(
        "training.create_round",
        {
            "model_id": model["id"],
            "base_version": 1,
            "federation_id": federation["id"],
            "target_device_count": owner_devices + member_devices,
            "update_format": "delta",
        },
        owner.token,
    )
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, owner.token)
    await client.ok("training.start_round", {"round_id": rnd["id"]}, owner.token)
    return rnd, [d["token"] for d in mine], [d["token"] for d in theirs]


async def test_a_member_cannot_publish_weights_as_the_owners_next_version(
    client, org, other_org, mlp_model, mlp_bundle
):
    # Before: the member created a round on the shared model, uploaded with its own devices
    # and aggregated it into the owner's version 2.
    net, bundle = mlp_bundle
    fed = await shared_federation(client, org, other_org, mlp_model)
    params = {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 2}
    error = await client.error(
        "training.create_round", {**params, "federation_id": fed["id"]}, other_org.token
    )
    assert error["data"]["type"] == "forbidden"
    for method, extra in (
        ("models.versions.create", inline(bundle)),
        ("models.versions.publish", {"version": 1}),
    ):
        error = await client.error(method, {"model_id": mlp_model["id"], **extra}, other_org.token)
        assert error["data"]["type"] == "forbidden", method
    # Nor aggregate the owner's round.
    rnd, mine, theirs = await _federation_round(
        client, org, other_org, mlp_model, owner_devices=1, member_devices=1
    )
    await _upload(client, rnd, mlp_model, mine[0], net, 1)
    await _upload(client, rnd, mlp_model, theirs[0], net, 2)
    error = await client.error("training.aggregate", {"round_id": rnd["id"]}, other_org.token)
    assert error["data"]["type"] == "forbidden"
    versions = await client.ok("models.versions.list", {"model_id": mlp_model["id"]}, org.token)
    assert versions["total"] == 1


async def test_the_owner_cannot_aggregate_fewer_updates_than_the_federation_demands(
    client, org, other_org, mlp_model, mlp_bundle
):
    net, _ = mlp_bundle
    rnd, mine, theirs = await _federation_round(
        client, org, other_org, mlp_model, owner_devices=2, member_devices=2, min_round_updates=3
    )
    await _upload(client, rnd, mlp_model, mine[0], net, 1)
    await _upload(client, rnd, mlp_model, theirs[0], net, 2)
    # Asking for fewer does not lower the federation's floor.
    error = await client.error(
        "training.aggregate", {"round_id": rnd["id"], "min_updates": 1}, org.token
    )
    assert error["data"]["type"] == "precondition_failed" and error["data"]["min_updates"] == 3
    await _upload(client, rnd, mlp_model, theirs[1], net, 3)
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    assert version["num_updates"] == 3


async def test_updates_of_one_organization_alone_are_not_aggregated_when_two_take_part(
    client, org, other_org, mlp_model, mlp_bundle
):
    net, _ = mlp_bundle
    rnd, mine, theirs = await _federation_round(
        client, org, other_org, mlp_model, owner_devices=2, member_devices=2
    )
    await _upload(client, rnd, mlp_model, theirs[0], net, 1)
    await _upload(client, rnd, mlp_model, theirs[1], net, 2)
    error = await client.error("training.aggregate", {"round_id": rnd["id"]}, org.token)
    assert error["data"]["type"] == "precondition_failed"
    assert error["data"]["organizations"] == 1
    progress = await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert progress["state"] == "running"
    await _upload(client, rnd, mlp_model, mine[0], net, 3)
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    assert version["num_updates"] == 3


@pytest.mark.parametrize("strategy", ["krum", "fedmedian", "fedtrimmedavg"])
async def test_a_strategy_that_can_return_one_update_is_refused_at_aggregation_too(
    client, org, other_org, mlp_model, mlp_bundle, strategy
):
    net, _ = mlp_bundle
    rnd, mine, theirs = await _federation_round(
        client, org, other_org, mlp_model, owner_devices=1, member_devices=2
    )
    for i, token in enumerate([*mine, *theirs]):
        await _upload(client, rnd, mlp_model, token, net, i)
    error = await client.error(
        "training.aggregate", {"round_id": rnd["id"], "strategy": {"name": strategy}}, org.token
    )
    assert error["data"]["type"] == "bad_request" and error["data"]["field"] == "strategy"
    assert (await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token))[
        "state"
    ] == "running"
