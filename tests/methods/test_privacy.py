"""federations.privacy.*: budgets, estimates and the ledger, checked against Opacus."""

from __future__ import annotations

import asyncio

import pytest

from fedrpc.app import SERVICES
from fedrpc.errors import PrivacyBudgetExhausted
from fedrpc.fl.privacy import RoundCharge
from fedrpc.services.privacy_budget import charge_round
from tests.kernels.privacy_references import opacus_epsilon as reference_epsilon

FED_ID_UNKNOWN = "fed_" + "3" * 32


def opacus_epsilon(rounds: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus's RDP of (noise, rate, steps) rounds on our order grid, converted once."""
    return reference_epsilon([RoundCharge(s, q, n) for s, q, n in rounds], delta)


@pytest.fixture
async def federation(client, org) -> dict:
    return await client.ok(
        "federations.create",
        {"name": "dp", "org_id": org.id, "privacy_policy": {"total_epsilon_budget": 8.0}},
        org.token,
    )


async def test_budget_from_the_policy_and_nothing_spent(client, org, federation):
    state = await client.ok(
        "federations.privacy.get", {"federation_id": federation["id"]}, org.token
    )
    assert state["budget"] == {"total_epsilon_budget": 8.0, "total_delta_budget": 1e-5}
    assert state["current_epsilon_spent"] == 0.0 and state["epsilon_remaining"] == 8.0
    assert state["rounds_tracked"] == 0 and state["is_exhausted"] is False


async def test_no_budget_is_reported_as_null(client, org):
    fed = await client.ok("federations.create", {"name": "open", "org_id": org.id}, org.token)
    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert (
        state["budget"] is None
        and state["total_epsilon_budget"] is None
        and state["epsilon_remaining"] is None
    )
    estimate = await client.ok(
        "federations.privacy.estimate",
        {
            "federation_id": fed["id"],
            "noise_multiplier": 1.0,
            "sample_rate": 0.01,
            "num_steps": 100,
        },
        org.token,
    )
    assert estimate["budget_epsilon"] is None and estimate["would_exceed_budget"] is False


@pytest.mark.parametrize(
    ("noise", "rate", "steps"), [(1.1, 0.01, 1000), (0.8, 0.1, 10), (2.0, 1.0, 3)]
)
async def test_estimate_matches_opacus_and_records_nothing(
    client, org, federation, noise, rate, steps
):
    params = {
        "federation_id": federation["id"],
        "noise_multiplier": noise,
        "sample_rate": rate,
        "num_steps": steps,
    }
    estimate = await client.ok("federations.privacy.estimate", params, org.token)
    reference = opacus_epsilon([(noise, rate, steps)], 1e-5)
    assert estimate["round_epsilon_cost"] == pytest.approx(reference, rel=1e-6)
    assert estimate["projected_epsilon"] == pytest.approx(reference, rel=1e-6)
    assert estimate["accountant"] == "rdp" and estimate["target_delta"] == 1e-5
    assert estimate["would_exceed_budget"] is (reference > 8.0)
    state = await client.ok(
        "federations.privacy.get", {"federation_id": federation["id"]}, org.token
    )
    assert state["rounds_tracked"] == 0


async def test_pld_estimate_is_tighter_than_rdp(client, org, federation):
    params = {
        "federation_id": federation["id"],
        "noise_multiplier": 1.0,
        "sample_rate": 0.05,
        "num_steps": 50,
    }
    rdp = await client.ok("federations.privacy.estimate", params, org.token)
    pld = await client.ok(
        "federations.privacy.estimate", {**params, "accountant": "pld"}, org.token
    )
    assert pld["accountant"] == "pld" and 0 < pld["projected_epsilon"] < rdp["projected_epsilon"]


async def test_charges_compose_over_the_history(client, org, federation):
    db = client.app[SERVICES].db
    rounds = [(1.0, 0.02, 100), (1.5, 0.05, 50), (1.0, 0.02, 100)]
    for i, (s, q, n) in enumerate(rounds):
        await charge_round(db, federation["id"], f"rnd_{i:032x}", RoundCharge(s, q, n))
    history = await client.ok(
        "federations.privacy.history", {"federation_id": federation["id"]}, org.token
    )
    assert history["total"] == 3
    for i, row in enumerate(history["items"]):
        assert row["cumulative_epsilon"] == pytest.approx(
            opacus_epsilon(rounds[: i + 1], 1e-5), rel=1e-6
        )
        assert row["round_epsilon_cost"] == pytest.approx(
            opacus_epsilon([rounds[i]], 1e-5), rel=1e-6
        )
    summed = sum(r["round_epsilon_cost"] for r in history["items"])
    state = await client.ok(
        "federations.privacy.get", {"federation_id": federation["id"]}, org.token
    )
    assert state["current_epsilon_spent"] == pytest.approx(opacus_epsilon(rounds, 1e-5), rel=1e-6)
    assert state["current_epsilon_spent"] < summed
    page = await client.ok(
        "federations.privacy.history",
        {"federation_id": federation["id"], "limit": 1, "offset": 2},
        org.token,
    )
    assert page["items"] == history["items"][2:]


async def test_a_charge_past_the_budget_is_refused(client, org, federation):
    db = client.app[SERVICES].db
    with pytest.raises(PrivacyBudgetExhausted):
        await charge_round(db, federation["id"], "rnd_" + "a" * 32, RoundCharge(0.5, 1.0, 100))
    state = await client.ok(
        "federations.privacy.get", {"federation_id": federation["id"]}, org.token
    )
    assert state["rounds_tracked"] == 0


async def test_concurrent_charges_cannot_both_slip_under_the_budget(client, org):
    one, two = opacus_epsilon([(1.0, 0.1, 20)], 1e-5), opacus_epsilon([(1.0, 0.1, 20)] * 2, 1e-5)
    budget = (one + two) / 2
    fed = await client.ok(
        "federations.create",
        {"name": "tight", "org_id": org.id, "privacy_policy": {"total_epsilon_budget": budget}},
        org.token,
    )
    db = client.app[SERVICES].db
    results = await asyncio.gather(
        *(
            charge_round(db, fed["id"], f"rnd_{i:032x}", RoundCharge(1.0, 0.1, 20))
            for i in range(2)
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(r, PrivacyBudgetExhausted) for r in results) == 1
    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert state["rounds_tracked"] == 1 and state["current_epsilon_spent"] <= budget


async def test_lowering_the_budget_below_spent_exhausts_without_losing_history(
    client, org, federation
):
    db = client.app[SERVICES].db
    await charge_round(db, federation["id"], "rnd_" + "b" * 32, RoundCharge(1.0, 0.1, 100))
    spent = (
        await client.ok("federations.privacy.get", {"federation_id": federation["id"]}, org.token)
    )["current_epsilon_spent"]
    state = await client.ok(
        "federations.privacy.set_budget",
        {"federation_id": federation["id"], "total_epsilon_budget": spent / 2},
        org.token,
    )
    assert (
        state["is_exhausted"] is True
        and state["epsilon_remaining"] == 0.0
        and state["rounds_tracked"] == 1
    )
    estimate = await client.ok(
        "federations.privacy.estimate",
        {"federation_id": federation["id"], "noise_multiplier": 5.0, "sample_rate": 0.001},
        org.token,
    )
    assert estimate["would_exceed_budget"] is True


async def test_only_the_owner_sets_the_budget(client, org, other_org, federation):
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
    await client.ok("federations.privacy.get", {"federation_id": federation["id"]}, other_org.token)
    error = await client.error(
        "federations.privacy.set_budget",
        {"federation_id": federation["id"], "total_epsilon_budget": 100.0},
        other_org.token,
    )
    assert error["data"]["type"] == "forbidden"


@pytest.mark.parametrize(
    "bad",
    [
        {"noise_multiplier": 0},
        {"noise_multiplier": -1},
        {"noise_multiplier": 1e999},
        {"noise_multiplier": 1e-170},  # was a ZeroDivisionError (-32603) in the RDP kernel
        {"noise_multiplier": 9.99e-4},  # below the floor: one step would cost ~5e5 epsilon
        {"sample_rate": 0},
        {"sample_rate": 1.5},
        {"num_steps": 0},
        {"target_delta": 0},
        {"target_delta": 1},
        {"noise_multiplier": "1"},
        {"accountant": "moments"},
    ],
)
async def test_estimate_refuses_bad_parameters(client, org, federation, bad):
    params = {
        "federation_id": federation["id"],
        "noise_multiplier": 1.0,
        "sample_rate": 0.01,
        **bad,
    }
    error = await client.error("federations.privacy.estimate", params, org.token)
    assert error["code"] == -32602 and error["data"]["path"] == "$." + next(iter(bad))


async def test_nan_is_not_json(client, org, federation):
    template = (
        '{"jsonrpc": "2.0", "method": "federations.privacy.estimate", "id": 1, "params": {"federation_id": "FED",'
        ' "noise_multiplier": NaN, "sample_rate": 0.1}}'
    )
    body = template.replace("FED", federation["id"]).encode()
    _, answer = await client.post(body, org.token, raw=True)
    assert answer["error"]["code"] == -32700


async def test_unknown_federation_and_non_members(client, org, other_org, federation):
    params = {"noise_multiplier": 1.0, "sample_rate": 0.01}
    error = await client.error(
        "federations.privacy.estimate", {"federation_id": FED_ID_UNKNOWN, **params}, org.token
    )
    assert error["data"]["type"] == "not_found"
    for method, extra in [
        ("federations.privacy.estimate", params),
        ("federations.privacy.get", {}),
        ("federations.privacy.history", {}),
    ]:
        error = await client.error(
            method, {"federation_id": federation["id"], **extra}, other_org.token
        )
        assert error["data"]["type"] == "forbidden", method


async def test_set_budget_without_delta_keeps_the_current_delta(client, org, federation):
    fed = {"federation_id": federation["id"]}
    await client.ok(
        "federations.privacy.set_budget",
        {**fed, "total_epsilon_budget": 6.0, "total_delta_budget": 1e-7},
        org.token,
    )

    state = await client.ok(
        "federations.privacy.set_budget", {**fed, "total_epsilon_budget": 4.0}, org.token
    )

    assert state["budget"] == {"total_epsilon_budget": 4.0, "total_delta_budget": 1e-7}
    assert state["delta"] == 1e-7


async def test_a_first_budget_without_delta_gets_the_default_delta(client, org):
    fed = await client.ok("federations.create", {"name": "open", "org_id": org.id}, org.token)

    state = await client.ok(
        "federations.privacy.set_budget",
        {"federation_id": fed["id"], "total_epsilon_budget": 3.0},
        org.token,
    )

    assert state["budget"] == {"total_epsilon_budget": 3.0, "total_delta_budget": 1e-5}


async def test_a_new_delta_after_spending_reprices_the_whole_history(client, org, federation):
    db = client.app[SERVICES].db
    rounds = [(1.0, 0.1, 30), (1.4, 0.05, 60)]
    for i, (s, q, n) in enumerate(rounds):
        await charge_round(db, federation["id"], f"rnd_{i:032x}", RoundCharge(s, q, n))

    state = await client.ok(
        "federations.privacy.set_budget",
        {
            "federation_id": federation["id"],
            "total_epsilon_budget": 8.0,
            "total_delta_budget": 1e-8,
        },
        org.token,
    )

    assert state["delta"] == 1e-8 and state["rounds_tracked"] == 2
    assert state["current_epsilon_spent"] == pytest.approx(opacus_epsilon(rounds, 1e-8), rel=1e-6)
    assert state["current_epsilon_spent"] > opacus_epsilon(rounds, 1e-5)
    history = await client.ok(
        "federations.privacy.history", {"federation_id": federation["id"]}, org.token
    )
    assert [row["delta"] for row in history["items"]] == [1e-5, 1e-5]  # as charged


async def test_the_smallest_noise_multiplier_accepted_is_priced_as_opacus_prices_it(
    client, org, federation
):
    params = {"federation_id": federation["id"], "noise_multiplier": 1e-3, "sample_rate": 0.5}

    estimate = await client.ok("federations.privacy.estimate", params, org.token)

    reference = opacus_epsilon([(1e-3, 0.5, 1)], 1e-5)
    assert estimate["round_epsilon_cost"] == pytest.approx(reference, rel=1e-6)
    assert estimate["round_epsilon_cost"] > 5e5 and estimate["would_exceed_budget"] is True


async def test_a_dp_round_with_a_vanishing_noise_multiplier_is_refused(
    client, org, federation, mlp_model
):
    params = {
        "model_id": mlp_model["id"],
        "base_version": 1,
        "federation_id": federation["id"],
        "target_device_count": 4,
        "differential_privacy": {"noise_multiplier": 1e-170, "clipping_norm": 1.0},
    }

    error = await client.error("training.create_round", params, org.token)

    assert error["data"]["type"] == "bad_request" and error["code"] == -32602
    assert error["data"]["path"] == "$.differential_privacy.noise_multiplier"


@pytest.mark.parametrize("target_delta", [1e-50, 1e-300])
async def test_a_pld_estimate_it_cannot_bound_is_refused_naming_target_delta(
    client, org, federation, target_delta
):
    params = {
        "federation_id": federation["id"],
        "noise_multiplier": 1.0,
        "sample_rate": 0.01,
        "target_delta": target_delta,
    }

    error = await client.error(
        "federations.privacy.estimate", {**params, "accountant": "pld"}, org.token
    )
    rdp = await client.ok("federations.privacy.estimate", params, org.token)

    assert error["data"]["type"] == "bad_request" and error["code"] == 4400
    assert error["data"]["path"] == "$.target_delta"
    assert error["data"]["reason"] == "unbounded_epsilon"
    reference = opacus_epsilon([(1.0, 0.01, 1)], target_delta)
    assert rdp["round_epsilon_cost"] == pytest.approx(reference, rel=1e-6)


async def test_a_pld_estimate_at_the_budgets_tiny_delta_is_refused_not_null(
    client, org, federation
):
    fed = {"federation_id": federation["id"]}
    await client.ok(
        "federations.privacy.set_budget",
        {**fed, "total_epsilon_budget": 8.0, "total_delta_budget": 1e-60},
        org.token,
    )
    params = {**fed, "noise_multiplier": 1.0, "sample_rate": 0.01, "accountant": "pld"}

    error = await client.error("federations.privacy.estimate", params, org.token)

    assert error["data"]["type"] == "bad_request" and error["data"]["path"] == "$.target_delta"
