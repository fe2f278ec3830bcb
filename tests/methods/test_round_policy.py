"""Who may run, aggregate and publish a model's rounds, and what a federation's rounds must mix.

Each test plays an attack through real HTTP with an owner organization (it owns
the model and the federation) and a member organization whose devices train it.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import register_device
from tests.methods.conftest import inline, shared_federation, upload_delta


def _delta(net, seed: int | None) -> dict[str, np.ndarray]:
    """A seeded random delta, or zeros (seed None)."""
    rng = np.random.default_rng(seed)
    return {
        k: (
            (rng.normal(0, 0.1, v.shape) if seed is not None else np.zeros(v.shape)).astype(
                np.float32
            )
            if v.dtype.is_floating_point
            else v.numpy()
        )
        for k, v in net.state_dict().items()
    }


async def _upload(client, rnd: dict, model: dict, token: str, net, seed: int | None) -> None:
    await upload_delta(client, rnd, token, _delta(net, seed))


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


async def test_the_owner_cannot_read_one_members_update_by_filling_the_round_itself(
    client, org, other_org, mlp_model, mlp_bundle
):
    # The owner's devices send zero deltas: the average would be the member device's update
    # divided by a number the owner knows. Only updates no single organization sent count.
    net, _ = mlp_bundle
    rnd, mine, theirs = await _federation_round(
        client, org, other_org, mlp_model, owner_devices=4, member_devices=4, min_round_updates=3
    )
    for token in mine:
        await _upload(client, rnd, mlp_model, token, net, None)
    await _upload(client, rnd, mlp_model, theirs[0], net, 1)
    for extra in ({}, {"min_updates": 1}):
        error = await client.error(
            "training.aggregate", {"round_id": rnd["id"], **extra}, org.token
        )
        assert error["data"]["type"] == "precondition_failed"
        assert error["data"]["min_updates"] == 3 and error["data"]["mixed"] == 1
    assert (await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token))[
        "state"
    ] == "running"
    for i, token in enumerate(theirs[1:3]):
        await _upload(client, rnd, mlp_model, token, net, 2 + i)
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    assert version["num_updates"] == 7


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
    assert error["data"]["type"] == "precondition_failed" and error["data"]["mixed"] == 0
    await _upload(client, rnd, mlp_model, mine[0], net, 3)
    error = await client.error("training.aggregate", {"round_id": rnd["id"]}, org.token)
    assert error["data"]["mixed"] == 1
    await _upload(client, rnd, mlp_model, mine[1], net, 4)
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    assert version["num_updates"] == 4


async def test_a_round_only_one_organizations_devices_take_part_in_counts_them_all(
    client, org, other_org, mlp_model, mlp_bundle
):
    net, _ = mlp_bundle
    rnd, _, theirs = await _federation_round(
        client, org, other_org, mlp_model, owner_devices=0, member_devices=2
    )
    for i, token in enumerate(theirs):
        await _upload(client, rnd, mlp_model, token, net, i)
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    assert version["num_updates"] == 2


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


async def test_live_totals_do_not_reveal_one_member_devices_sample_count(
    client, org, other_org, mlp_model, mlp_bundle
):
    # Polled around one upload, a live total is that device's claim.
    net, _ = mlp_bundle
    rnd, _, theirs = await _federation_round(
        client, org, other_org, mlp_model, owner_devices=1, member_devices=1
    )
    stats = {"model_id": mlp_model["id"]}
    before = await client.ok("training.updates.stats", stats, org.token)
    await _upload(client, rnd, mlp_model, theirs[0], net, 1)
    after = await client.ok("training.updates.stats", stats, org.token)
    assert after == before
    progress = await client.ok("training.get_round_progress", {"round_id": rnd["id"]}, org.token)
    assert "total_samples" not in progress and progress["received_count"] == 1
