"""What one organization of a federation sees of another's devices, played as the attack.

Org A (the owner) shares its model into a federation that org B is an active
member of; both organizations' devices upload to A's round and keep
personalized states in the federation. Each side then asks for the other's
device ids, update ids and per-device metrics through every read path of
training.updates.* and training.personalized.*: it gets its own rows and the
other organization only as counts (docs/design.md, "What another organization
sees").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import safetensors.numpy

from tests.conftest import register_device
from tests.methods.conftest import b64, shared_federation
from tests.methods.test_weights_upload import update_bytes, upload_params


async def federation_of(client, owner, member, model: dict, name: str = "f") -> dict:
    """A federation of `owner` (rounds mix at least 2 updates), `model` shared, `member` in."""
    return await shared_federation(client, owner, member, model, name)


async def started_round(client, owner, model: dict, count: int, **extra) -> dict:
    """A running round of `owner` on version 1 that selects `count` of the eligible devices
    (the callers make exactly `count` eligible, so all of them)."""
    criteria = extra.pop("criteria", {})
    rnd = await client.ok(
        "training.create_round",
        {"model_id": model["id"], "base_version": 1, "target_device_count": count, **extra},
        owner.token,
    )
    await client.ok(
        "training.select_devices", {"round_id": rnd["id"], "criteria": criteria}, owner.token
    )
    return await client.ok("training.start_round", {"round_id": rnd["id"]}, owner.token)


@dataclass
class Side:
    """One organization's part of the world: its devices, updates and personalized states."""

    org: object
    devices: list[dict] = field(default_factory=list)
    update_ids: list[str] = field(default_factory=list)
    metric: str = ""  # a metric name only this organization's devices report

    @property
    def device_ids(self) -> list[str]:
        return [d["device_id"] for d in self.devices]

    def secrets(self) -> list[str]:
        return [*self.device_ids, *self.update_ids, self.metric]


@pytest.fixture
async def two_orgs(client, org, other_org, mlp_model, mlp_bundle):
    """A (org) owns the model and the federation; B (other_org) is a member. Two devices each
    upload to A's federated round and keep a personalized state in the federation."""
    fed = await federation_of(client, org, other_org, mlp_model)
    a = Side(org, metric="owner_only_metric")
    b = Side(other_org, metric="member_only_metric")
    for side in (a, b):
        side.devices = [await register_device(client, side.org.token) for _ in range(2)]
    rnd = await started_round(client, org, mlp_model, 4, federation_id=fed["id"])
    weights = safetensors.numpy.load(mlp_bundle[1]["weights"])
    for i, (side, device) in enumerate([(s, d) for s in (a, b) for d in s.devices]):
        metrics = {"loss": 0.1 * (i + 1), side.metric: 0.5}
        sent = await client.ok(
            "training.weights.upload",
            upload_params(rnd, update_bytes(i), sample_count=5 + i, metrics=metrics),
            device["token"],
        )
        side.update_ids.append(sent["id"])
        await client.ok(
            "training.personalized.update",
            {
                "model_id": mlp_model["id"],
                "federation_id": fed["id"],
                "personalization_type": "ditto",
                "weights": {"data": b64(safetensors.numpy.save(weights))},
                "metrics": {side.metric: float(i)},
            },
            device["token"],
        )
    return {"fed": fed, "round": rnd, "A": a, "B": b}


def sides(two_orgs, who: str) -> tuple[Side, Side]:
    """(caller, other) for the owner or the member calling."""
    a, b = two_orgs["A"], two_orgs["B"]
    return (a, b) if who == "owner" else (b, a)


def leaked(result, other: Side) -> list[str]:
    text = json.dumps(result)
    return [s for s in other.secrets() if s in text]


def counts(*entries: tuple[Side, int, int]) -> list[dict]:
    rows = [{"org_id": s.org.id, "devices": d, "updates": u} for s, d, u in entries]
    return sorted(rows, key=lambda r: r["org_id"])


@pytest.mark.parametrize("who", ["owner", "member"])
@pytest.mark.parametrize(
    "method", ["training.updates.list", "training.updates.by_device", "training.updates.stats"]
)
async def test_updates_show_the_other_organization_only_as_counts(
    client, mlp_model, two_orgs, who, method
):
    me, other = sides(two_orgs, who)
    # While the round runs, another organization's updates are not counted at all: polled
    # around one upload, a live count would time that device's update.
    result = await client.ok(method, {"model_id": mlp_model["id"]}, me.org.token)
    assert result["participation"] == counts((me, 2, 2))
    owner = two_orgs["A"]
    await client.ok("training.aggregate", {"round_id": two_orgs["round"]["id"]}, owner.org.token)
    result = await client.ok(method, {"model_id": mlp_model["id"]}, me.org.token)
    assert leaked(result, other) == []
    assert result["participation"] == counts((me, 2, 2), (other, 2, 2))
    if method == "training.updates.list":
        assert sorted(i["id"] for i in result["items"]) == sorted(me.update_ids)
    if method == "training.updates.by_device":
        assert sorted(i["device_id"] for i in result["items"]) == sorted(me.device_ids)


@pytest.mark.parametrize("who", ["owner", "member"])
async def test_personalized_list_shows_the_other_organization_only_as_counts(
    client, mlp_model, two_orgs, who
):
    me, other = sides(two_orgs, who)
    listed = await client.ok(
        "training.personalized.list",
        {"federation_id": two_orgs["fed"]["id"], "model_id": mlp_model["id"]},
        me.org.token,
    )
    assert leaked(listed, other) == []
    assert sorted(s["device_id"] for s in listed["items"]) == sorted(me.device_ids)
    assert listed["total"] == 2
    assert listed["participation"] == sorted(
        [{"org_id": me.org.id, "devices": 2}, {"org_id": other.org.id, "devices": 2}],
        key=lambda r: r["org_id"],
    )


@pytest.mark.parametrize("who", ["owner", "member"])
@pytest.mark.parametrize("method", ["training.personalized.get", "training.personalized.metrics"])
async def test_another_organizations_device_state_is_refused(
    client, mlp_model, two_orgs, who, method
):
    me, other = sides(two_orgs, who)
    query = {"model_id": mlp_model["id"], "federation_id": two_orgs["fed"]["id"]}
    for device_id in other.device_ids:
        error = await client.error(method, {**query, "device_id": device_id}, me.org.token)
        assert error["data"]["type"] == "forbidden"
        assert other.metric not in json.dumps(error)
    # Its own devices' states it still reads, metrics and all.
    mine = await client.ok(method, {**query, "device_id": me.device_ids[0]}, me.org.token)
    assert me.metric in json.dumps(mine)


@pytest.mark.parametrize("who", ["owner", "member"])
async def test_members_statistics_are_per_organization_aggregates(client, org, two_orgs, who):
    me, other = sides(two_orgs, who)
    # Statistics come from completed rounds only (docs/privacy.md).
    await client.ok("training.aggregate", {"round_id": two_orgs["round"]["id"]}, org.token)
    members = await client.ok(
        "federations.members", {"federation_id": two_orgs["fed"]["id"]}, me.org.token
    )
    assert leaked(members, other) == []
    by_org = {m["org_id"]: m for m in members["members"]}
    assert (
        by_org[other.org.id]["total_samples"] > 0
        and by_org[other.org.id]["rounds_contributed"] == 1
    )


async def test_a_device_never_touches_another_devices_job(client, mlp_model, two_orgs):
    a, b = two_orgs["A"], two_orgs["B"]
    rnd = two_orgs["round"]
    job = await client.ok(
        "training.device_jobs.create",
        {
            "job_type": "federated",
            "round_id": rnd["id"],
            "model_id": mlp_model["id"],
            "base_version": 1,
        },
        a.devices[0]["token"],
    )
    for intruder in (b.devices[0], a.devices[1]):
        for method, params in [
            ("training.device_jobs.update_status", {"job_id": job["id"], "state": "failed"}),
            ("training.device_jobs.complete", {"job_id": job["id"], "metrics": {"x": 1}}),
        ]:
            error = await client.error(method, params, intruder["token"])
            assert error["data"]["type"] == "forbidden"
            assert a.devices[0]["device_id"] not in json.dumps(error)
    # The job is untouched: its own device still moves it from queued.
    moved = await client.ok(
        "training.device_jobs.update_status",
        {"job_id": job["id"], "state": "downloading"},
        a.devices[0]["token"],
    )
    assert moved["state"] == "downloading"
