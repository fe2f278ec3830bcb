"""federations.members shows no single device's upload, played as the attack through real HTTP.

A member polls `federations.members` around another organization's uploads. It must
learn nothing from a running round, nothing un-noised from a DP round, and from a
completed round without DP only per-organization totals that mix at least the
federation's `min_round_updates` of that organization's updates in each round
(docs/privacy.md, "What round views still reveal"). Expected numbers are recomputed
here from what the test sent.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest

from tests.conftest import register_device
from tests.kernels.nets import numpy_state
from tests.methods.conftest import shared_federation, upload_delta
from tests.methods.test_dp_rounds import dp_federation, dp_round_params
from tests.methods.test_member_visibility import started_round
from tests.methods.test_weights_upload import update_bytes, upload_params

HIDDEN = {
    "rounds_contributed": 0,
    "total_samples": None,
    "avg_accuracy": None,
    "avg_loss": None,
    "last_contribution_at": None,
}


async def members(client, fed: dict, caller) -> dict[str, dict]:
    result = await client.ok("federations.members", {"federation_id": fed["id"]}, caller.token)
    return {m["org_id"]: m for m in result["members"]}


def statistics(row: dict) -> dict:
    return {k: row[k] for k in HIDDEN}


async def upload(client, rnd: dict, device: dict, seed: int, samples: int, **metrics) -> dict:
    """Upload one update; what it claimed (its samples and metrics)."""
    params = upload_params(rnd, update_bytes(seed), sample_count=samples, metrics=metrics)
    await client.ok("training.weights.upload", params, device["token"])
    return {"samples": samples, **metrics}


def weighted(sent: list[dict], metric: str) -> float | None:
    pairs = [(s[metric], s["samples"]) for s in sent if metric in s]
    if not pairs:
        return None
    values, weights = zip(*pairs, strict=True)
    return float(np.average(np.array(values), weights=np.array(weights, dtype=float)))


def assert_shows(row: dict, sent: list[dict], rounds: int, finished_at: str) -> None:
    assert row["rounds_contributed"] == rounds
    assert row["total_samples"] == sum(s["samples"] for s in sent)
    for metric in ("accuracy", "loss"):
        expected = weighted(sent, metric)
        got = row[f"avg_{metric}"]
        assert got is None if expected is None else got == pytest.approx(expected, rel=1e-12)
    assert datetime.fromisoformat(row["last_contribution_at"]) == datetime.fromisoformat(
        finished_at
    )


async def finished(client, owner, rnd: dict) -> str:
    """Aggregate the round (as its owner) and return when it finished."""
    await client.ok("training.aggregate", {"round_id": rnd["id"]}, owner.token)
    done = await client.ok("training.get_round", {"round_id": rnd["id"]}, owner.token)
    assert done["state"] == "completed"
    return done["finished_at"]


@pytest.fixture
async def three_orgs(client, org, other_org, make_org, mlp_model):
    """org owns the model and a federation (min_round_updates 2) with other_org and a third."""
    third = await make_org("initech")
    fed = await shared_federation(client, org, other_org, mlp_model)
    await client.ok(
        "federations.invite", {"federation_id": fed["id"], "org_ids": [third.id]}, org.token
    )
    await client.ok(
        "federations.join", {"federation_id": fed["id"], "org_id": third.id}, third.token
    )
    return fed, third


async def test_an_upload_to_a_running_round_does_not_change_the_members_rows(
    client, org, other_org, mlp_model
):
    fed = await shared_federation(client, org, other_org, mlp_model)
    mine = [await register_device(client, org.token) for _ in range(2)]
    theirs = [await register_device(client, other_org.token) for _ in range(2)]
    rnd = await started_round(client, org, mlp_model, 4, federation_id=fed["id"])
    before = await members(client, fed, other_org)

    # The attack: the member polls around one device of the owner uploading.
    await upload(client, rnd, mine[0], 0, 37, loss=0.25, accuracy=0.75)
    assert await members(client, fed, other_org) == before
    for i, device in enumerate([mine[1], *theirs], start=1):
        await upload(client, rnd, device, i, 10 + i, loss=0.1 * i)
    # Every selected device has uploaded; the round still runs, so nothing shows.
    after = await members(client, fed, other_org)
    assert after == before
    assert statistics(after[org.id]) == statistics(after[other_org.id]) == HIDDEN


async def test_a_dp_rounds_updates_never_show(client, org, other_org, mlp_model, mlp_bundle):
    fed = await dp_federation(client, org, other_org, mlp_model)
    tokens = {}
    for o in (org, other_org):
        for _ in range(4):
            device = await register_device(client, o.token)
            tokens[device["device_id"]] = device["token"]
    # A Poisson draw that selected at least two devices of each organization (so that the
    # round can be aggregated under any mixing rule); otherwise a new round, a new draw. Each
    # organization learns its own selected devices.
    for _ in range(30):
        rnd = await client.ok("training.create_round", dp_round_params(mlp_model, fed), org.token)
        body = await client.call("training.select_devices", {"round_id": rnd["id"]}, org.token)
        if "result" in body:
            mine = body["result"]["selected"]
            theirs = (
                await client.ok("training.get_round", {"round_id": rnd["id"]}, other_org.token)
            )["selected_devices"]
            if len(mine) >= 2 and len(theirs) >= 2:
                break
        await client.ok("training.cancel_round", {"round_id": rnd["id"]}, org.token)
    else:
        raise AssertionError("thirty Poisson draws at q = 0.75 never selected two per org")
    selected = [*mine, *theirs]
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    before = await members(client, fed, other_org)

    base = numpy_state(mlp_bundle[0])
    for i, device_id in enumerate(selected):
        delta = {k: np.full(v.shape, 0.001 * (i + 1), np.float32) for k, v in base.items()}
        await upload_delta(
            client,
            rnd,
            tokens[device_id],
            delta,
            10 * (i + 1),
            {"loss": 1.0 + i, "accuracy": 0.5 + 0.01 * i},
        )
        assert await members(client, fed, other_org) == before
    await finished(client, org, rnd)

    # Completed, the DP round still adds nothing un-noised to anyone's row.
    for caller in (org, other_org):
        rows = await members(client, fed, caller)
        assert statistics(rows[org.id]) == statistics(rows[other_org.id]) == HIDDEN


async def test_a_completed_round_without_dp_shows_each_organizations_mixed_totals(
    client, org, other_org, mlp_model, three_orgs
):
    fed, third = three_orgs
    devices = {
        o.id: [await register_device(client, o.token) for _ in range(n)]
        for o, n in ((org, 2), (other_org, 2), (third, 1))
    }
    rnd = await started_round(client, org, mlp_model, 5, federation_id=fed["id"])
    plan = [
        (org, 0, 12, {"loss": 0.5, "accuracy": 0.6}),
        (org, 1, 30, {"loss": 0.3}),
        (other_org, 0, 20, {"loss": 0.4, "accuracy": 0.7}),
        (other_org, 1, 7, {"accuracy": 0.8}),
        # The third organization's single device: its values must never show.
        (third, 0, 41, {"loss": 0.9, "accuracy": 0.1}),
    ]
    sent: dict[str, list[dict]] = {}
    for seed, (o, index, samples, metrics) in enumerate(plan):
        claimed = await upload(client, rnd, devices[o.id][index], seed, samples, **metrics)
        sent.setdefault(o.id, []).append(claimed)
    finished_at = await finished(client, org, rnd)

    for caller in (org, other_org, third):
        rows = await members(client, fed, caller)
        # One update in the round: the round is counted, its values are not.
        lone = rows[third.id]
        assert (lone["total_samples"], lone["avg_accuracy"], lone["avg_loss"]) == (None,) * 3
        assert lone["rounds_contributed"] == 1
        assert datetime.fromisoformat(lone["last_contribution_at"]) == datetime.fromisoformat(
            finished_at
        )
        assert_shows(rows[org.id], sent[org.id], 1, finished_at)
        assert_shows(rows[other_org.id], sent[other_org.id], 1, finished_at)


async def test_a_later_round_with_one_update_of_an_organization_leaves_its_totals_alone(
    client, org, other_org, mlp_model, three_orgs
):
    fed, third = three_orgs
    devices = {
        o.id: [await register_device(client, o.token) for _ in range(2)]
        for o in (org, other_org, third)
    }
    first = await started_round(client, org, mlp_model, 6, federation_id=fed["id"])
    shown = []
    for seed, device in enumerate([d for o in (org, other_org, third) for d in devices[o.id]]):
        claimed = await upload(client, first, device, seed, 10 + seed, loss=0.1 * seed)
        if device in devices[third.id]:
            shown.append(claimed)
    first_at = await finished(client, org, first)
    rows = await members(client, fed, other_org)
    assert_shows(rows[third.id], shown, 1, first_at)

    # Differencing: a second round with one device of the third organization. A threshold on
    # the running total (now 2) would let this one update show as the change in its totals.
    second = await started_round(client, org, mlp_model, 6, federation_id=fed["id"])
    for seed, device in enumerate([*devices[org.id], *devices[other_org.id], devices[third.id][0]]):
        await upload(client, second, device, 10 + seed, 50 + seed, loss=2.0 + seed)
    second_at = await finished(client, org, second)
    rows = await members(client, fed, other_org)
    assert_shows(rows[third.id], shown, 2, second_at)
