"""training.updates.* and federations.members statistics, from real uploads.

Expected numbers are recomputed here from the uploads the test made (plain
Python and numpy.average), never read back from the server's own tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pytest

from tests.conftest import register_device
from tests.methods.test_member_visibility import federation_of, started_round
from tests.methods.test_weights_upload import update_bytes, upload_params


@dataclass
class Sent:
    round_id: str
    device_id: str
    org_id: str
    samples: int
    metrics: dict
    result: dict

    @property
    def received_at(self) -> datetime:
        return datetime.fromisoformat(self.result["received_at"])


def when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@pytest.fixture
async def world(client, org, other_org, make_org, mlp_model):
    """org owns the model and a federation with other_org; one private and two federated rounds with uploads."""
    fed = await federation_of(client, org, other_org, mlp_model, "f")
    a1, a2 = [await register_device(client, org.token) for _ in range(2)]
    b1, b2 = [await register_device(client, other_org.token) for _ in range(2)]
    owner = {
        a1["device_id"]: org.id,
        a2["device_id"]: org.id,
        b1["device_id"]: other_org.id,
        b2["device_id"]: other_org.id,
    }
    private = await started_round(client, org, mlp_model, 2)
    shared = await started_round(client, org, mlp_model, 4, federation_id=fed["id"])
    third = await started_round(client, org, mlp_model, 4, federation_id=fed["id"])
    plan = [
        (private, a1, 10, {"loss": 0.5, "accuracy": 0.6}),
        (private, a2, 30, {"loss": 0.3}),
        (shared, a1, 5, {"loss": 0.2, "accuracy": 0.9}),
        (shared, b1, 20, {"loss": 0.4, "accuracy": 0.7}),
        (shared, b2, 7, {"accuracy": 0.8}),
        (third, b1, 11, {"loss": 1.0, "accuracy": 0.5, "f1": 0.1}),
    ]
    sent = []
    for i, (rnd, device, samples, metrics) in enumerate(plan):
        params = upload_params(rnd, update_bytes(i), sample_count=samples, metrics=metrics)
        result = await client.ok("training.weights.upload", params, device["token"])
        sent.append(
            Sent(
                rnd["id"], device["device_id"], owner[device["device_id"]], samples, metrics, result
            )
        )
    outsider = await make_org("outsider")
    return {
        "fed": fed,
        "sent": sent,
        "outsider": outsider,
        "rounds": (private, shared, third),
        "a2": a2,  # the owner's device selected in the shared round that did not upload to it
    }


def visible_rounds(world, org_id: str, org) -> set[str]:
    private, shared, third = world["rounds"]
    return (
        {private["id"], shared["id"], third["id"]}
        if org_id == org.id
        else {shared["id"], third["id"]}
    )


def counted(world, caller, org) -> list[Sent]:
    """The updates `caller` is told about: its own in the rounds it may read, another
    organization's only in completed rounds (every round of the world is still running)."""
    rounds = visible_rounds(world, caller.id, org)
    return [s for s in world["sent"] if s.round_id in rounds and s.org_id == caller.id]


def participation(world, caller, org) -> list[dict]:
    """Every organization's devices and updates `caller` is told about, recomputed."""
    per_org: dict[str, list[Sent]] = {}
    for s in counted(world, caller, org):
        per_org.setdefault(s.org_id, []).append(s)
    rows = [
        {"org_id": o, "devices": len({s.device_id for s in sent}), "updates": len(sent)}
        for o, sent in per_org.items()
    ]
    return sorted(rows, key=lambda r: r["org_id"])


@pytest.mark.parametrize("who", ["owner", "member"])
async def test_list_shows_only_the_callers_own_devices_newest_first(
    client, org, other_org, mlp_model, world, who
):
    caller = org if who == "owner" else other_org
    mine = [s for s in world["sent"] if s.org_id == caller.id]
    listed = await client.ok(
        "training.updates.list", {"model_id": mlp_model["id"], "version": 1}, caller.token
    )
    assert listed["total"] == len(mine) == 3
    expected = sorted(mine, key=lambda s: (s.received_at, s.result["id"]), reverse=True)
    assert [i["id"] for i in listed["items"]] == [s.result["id"] for s in expected]
    assert all(
        i["device_id"] == s.device_id and i["sample_count"] == s.samples
        for i, s in zip(listed["items"], expected, strict=True)
    )
    assert "object_key" not in listed["items"][0]
    assert listed["participation"] == participation(world, caller, org)
    page = await client.ok(
        "training.updates.list",
        {"model_id": mlp_model["id"], "limit": 1, "offset": 1},
        caller.token,
    )
    assert page["total"] == 3 and [i["id"] for i in page["items"]] == [expected[1].result["id"]]


@pytest.mark.parametrize("who", ["owner", "member"])
async def test_stats_aggregate_every_round_the_caller_may_read(
    client, org, other_org, mlp_model, world, who
):
    caller = org if who == "owner" else other_org
    told = counted(world, caller, org)
    stats = await client.ok(
        "training.updates.stats", {"model_id": mlp_model["id"], "version": 1}, caller.token
    )
    assert stats["update_count"] == len(told)
    assert stats["total_samples"] == sum(s.samples for s in told)
    assert when(stats["last_received_at"]) == max(s.received_at for s in told)
    # Each sees its own three updates: the other's are in rounds still running.
    assert stats["update_count"] == 3
    assert stats["participation"] == participation(world, caller, org)
    assert sum(p["updates"] for p in stats["participation"]) == stats["update_count"]


async def test_stats_of_a_version_without_updates_are_zero(client, org, mlp_model, world):
    stats = await client.ok(
        "training.updates.stats", {"model_id": mlp_model["id"], "version": 2}, org.token
    )
    assert (stats["update_count"], stats["total_samples"], stats["last_received_at"]) == (
        0,
        0,
        None,
    )
    assert stats["participation"] == []


async def test_by_device_counts_the_callers_devices_most_recent_first(
    client, org, other_org, mlp_model, world
):
    for caller in (org, other_org):
        per_device: dict[str, list[Sent]] = {}
        for s in world["sent"]:
            if s.org_id == caller.id:
                per_device.setdefault(s.device_id, []).append(s)
        order = sorted(
            per_device, key=lambda d: max(s.received_at for s in per_device[d]), reverse=True
        )
        got = await client.ok(
            "training.updates.by_device", {"model_id": mlp_model["id"], "version": 1}, caller.token
        )
        assert got["total"] == len(per_device) == 2
        assert [i["device_id"] for i in got["items"]] == order
        for item in got["items"]:
            sent = per_device[item["device_id"]]
            assert item["update_count"] == len(sent)
            assert item["total_samples"] == sum(s.samples for s in sent)
            assert when(item["last_received_at"]) == max(s.received_at for s in sent)
        assert got["participation"] == participation(world, caller, org)
    limited = await client.ok(
        "training.updates.by_device", {"model_id": mlp_model["id"], "limit": 1}, org.token
    )
    assert len(limited["items"]) == 1 and limited["total"] == 2


@pytest.mark.parametrize(
    "method", ["training.updates.list", "training.updates.stats", "training.updates.by_device"]
)
async def test_organizations_that_cannot_read_the_model_are_forbidden(
    client, mlp_model, world, method
):
    error = await client.error(method, {"model_id": mlp_model["id"]}, world["outsider"].token)
    assert error["data"]["type"] == "forbidden"


@pytest.mark.parametrize(
    "method", ["training.updates.list", "training.updates.stats", "training.updates.by_device"]
)
async def test_devices_cannot_read_update_statistics(client, org, mlp_model, method):
    device = await register_device(client, org.token)
    error = await client.error(method, {"model_id": mlp_model["id"]}, device["token"])
    assert error["data"]["type"] == "forbidden"


async def test_unknown_model_is_not_found(client, org):
    error = await client.error("training.updates.stats", {"model_id": "mdl_" + "7" * 32}, org.token)
    assert error["data"]["type"] == "not_found"


def weighted(sent: list[Sent], metric: str) -> float | None:
    pairs = [(s.metrics[metric], s.samples) for s in sent if metric in s.metrics]
    if not pairs:
        return None
    values, weights = zip(*pairs, strict=True)
    return float(np.average(np.array(values), weights=np.array(weights, dtype=float)))


async def test_members_statistics_come_from_updates_in_the_federations_rounds(
    client, org, other_org, world
):
    private, shared, third = world["rounds"]
    # The shared round gets the owner's second device too, so each organization sends two
    # updates (the federation's min_round_updates) and the round can be aggregated.
    a2 = world["a2"]
    params = upload_params(
        shared, update_bytes(9), sample_count=9, metrics={"loss": 0.6, "accuracy": 0.4}
    )
    result = await client.ok("training.weights.upload", params, a2["token"])
    sent_all = [
        *world["sent"],
        Sent(shared["id"], a2["device_id"], org.id, 9, params["metrics"], result),
    ]
    for rnd in (private, shared):
        await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    finished_at = (await client.ok("training.get_round", {"round_id": shared["id"]}, org.token))[
        "finished_at"
    ]
    await client.ok(
        "federations.invite",
        {"federation_id": world["fed"]["id"], "org_ids": [world["outsider"].id]},
        org.token,
    )
    members = await client.ok(
        "federations.members", {"federation_id": world["fed"]["id"]}, other_org.token
    )
    by_org = {m["org_id"]: m for m in members["members"]}
    for member in (org, other_org):
        # Only the completed federation round counts: not the owner's private round, not the
        # third round, still running.
        sent = [s for s in sent_all if s.org_id == member.id and s.round_id == shared["id"]]
        row = by_org[member.id]
        assert row["rounds_contributed"] == 1
        assert row["total_samples"] == sum(s.samples for s in sent)
        assert row["avg_accuracy"] == pytest.approx(weighted(sent, "accuracy"), rel=1e-12)
        assert row["avg_loss"] == pytest.approx(weighted(sent, "loss"), rel=1e-12)
        assert when(row["last_contribution_at"]) == when(finished_at)
    assert by_org[org.id]["total_samples"] == 5 + 9
    assert by_org[other_org.id]["total_samples"] == 20 + 7
    invited = by_org[world["outsider"].id]
    assert invited["status"] == "invited" and invited["rounds_contributed"] == 0
    assert (
        invited["total_samples"] is None
        and invited["avg_accuracy"] is None
        and invited["avg_loss"] is None
        and invited["last_contribution_at"] is None
    )


async def test_member_without_reported_metrics_has_null_averages(client, org, other_org, mlp_model):
    fed = await client.ok(
        "federations.create", {"name": "g", "org_id": org.id, "min_round_updates": 2}, org.token
    )
    await client.ok(
        "federations.models.share",
        {"federation_id": fed["id"], "model_id": mlp_model["id"]},
        org.token,
    )
    devices = [await register_device(client, org.token) for _ in range(2)]
    rnd = await started_round(client, org, mlp_model, 2, federation_id=fed["id"])
    for seed, (device, samples) in enumerate(zip(devices, (4, 6), strict=True)):
        params = upload_params(rnd, update_bytes(seed), sample_count=samples)
        await client.ok("training.weights.upload", params, device["token"])
    await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    [row] = (await client.ok("federations.members", {"federation_id": fed["id"]}, org.token))[
        "members"
    ]
    assert (
        row["rounds_contributed"],
        row["total_samples"],
        row["avg_loss"],
        row["avg_accuracy"],
    ) == (1, 4 + 6, None, None)
