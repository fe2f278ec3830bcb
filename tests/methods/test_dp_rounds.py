"""Differential privacy that means what it says, through real HTTP.

A federation DP round is selected by Poisson sampling at the rate it is charged
with; the ledger's epsilon is dp-accounting's for that sampling; the noise is
calibrated to the fixed-denominator estimator (McMahan et al. 2018); a DP
version publishes no un-noised statistic of single devices. The references
(dp-accounting, float64 reimplementations, scipy) are independent of the code.
"""

from __future__ import annotations

import aiohttp
import dp_accounting
import numpy as np
import pytest
import safetensors.numpy
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

from tests.conftest import register_device
from tests.kernels.nets import numpy_state
from tests.methods.conftest import shared_federation, upload_delta

DELTA = 1e-5
Z, CLIP = 1.1, 0.5
PER_ORG = 4
TARGET = 6


def dp_accounting_epsilon(noise_multiplier: float, q: float, delta: float) -> float:
    """One Poisson-subsampled Gaussian step, by dp-accounting's RDP accountant."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier))
    )
    return float(accountant.get_epsilon(delta))


async def dp_federation(client, owner, member, model, *, budget: float | None = 10.0) -> dict:
    """A federation of `owner` (budget, min_round_updates 2) with `model` shared and `member` in."""
    policy = {} if budget is None else {"privacy_policy": {"total_epsilon_budget": budget}}
    return await shared_federation(client, owner, member, model, "dp", **policy)


async def devices_of(client, orgs) -> dict[str, str]:
    """PER_ORG registered devices per org: device id -> token."""
    tokens = {}
    for o in orgs:
        for _ in range(PER_ORG):
            device = await register_device(client, o.token)
            tokens[device["device_id"]] = device["token"]
    return tokens


def dp_round_params(model, fed, **extra) -> dict:
    return {
        "model_id": model["id"],
        "base_version": 1,
        "federation_id": fed["id"],
        "target_device_count": TARGET,
        "min_updates": 2,
        "update_format": "delta",
        "differential_privacy": {"noise_multiplier": Z, "clipping_norm": CLIP},
        **extra,
    }


async def poisson_round(client, owner, member, model, fed) -> tuple[dict, list[str], int]:
    """A DP round whose Poisson draw selected at least two devices of each organization (so its
    result can mix the federation's min_round_updates = 2 updates that neither organization sent
    alone; else drawn again, in a new round: every draw is charged). Its selected devices (each
    organization reads its own) and how many draws it took."""
    for draws in range(1, 21):
        rnd = await client.ok("training.create_round", dp_round_params(model, fed), owner.token)
        body = await client.call("training.select_devices", {"round_id": rnd["id"]}, owner.token)
        if "result" in body:
            theirs = await client.ok("training.get_round", {"round_id": rnd["id"]}, member.token)
            mine = body["result"]["selected"]
            if min(len(mine), len(theirs["selected_devices"])) >= 2:
                return rnd, mine + theirs["selected_devices"], draws
            await client.ok("training.cancel_round", {"round_id": rnd["id"]}, owner.token)
    raise AssertionError("twenty Poisson draws at q = 0.75 all left an organization with < 2")


def composed_epsilon(noise_multiplier: float, q: float, rounds: int, delta: float) -> float:
    """``rounds`` Poisson-subsampled Gaussian steps composed, by dp-accounting's RDP accountant."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def clipped(delta: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    """A delta scaled to L2 norm at most `clip` over all its tensors, in float64."""
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
    scale = min(1.0, clip / norm)
    return {k: v.astype(np.float64) * scale for k, v in delta.items()}


async def download_weights(client, token, model_id, version) -> dict[str, np.ndarray]:
    links = await client.ok(
        "models.versions.download", {"model_id": model_id, "version": version}, token
    )
    url = next(a["url"] for a in links["artifacts"] if a["kind"] == "safetensors")
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return safetensors.numpy.load(await resp.read())


async def test_a_dp_federation_round_is_poisson_selected_noised_and_charged_as_dp_accounting_says(
    client, org, other_org, mlp_model, mlp_bundle
):
    fed = await dp_federation(client, org, other_org, mlp_model)
    tokens = await devices_of(client, [org, other_org])
    rnd, selected, draws = await poisson_round(client, org, other_org, mlp_model, fed)

    # Recorded with the round: the method and q = target / eligible, as the accountant needs.
    q = TARGET / (2 * PER_ORG)
    shown = await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert shown["selection_method"] == "poisson"
    assert shown["sample_rate"] == pytest.approx(q, rel=1e-15)
    assert shown["eligible_count"] == 2 * PER_ORG

    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    base = numpy_state(mlp_bundle[0])
    rng = np.random.default_rng(11)
    deltas = []
    for i, device_id in enumerate(selected):
        # Norms around 0.1 * sqrt(#params) > CLIP: every delta gets clipped.
        delta = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in base.items()}
        deltas.append(delta)
        await upload_delta(
            client,
            rnd,
            tokens[device_id],
            delta,
            10 * (i + 1),
            {"loss": 1.0 + i, "accuracy": 0.5 + 0.01 * i},
        )
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)

    # The ledger: every draw charged at the recorded q (not selected / eligible) when it was
    # drawn, epsilon as dp-accounting's composition of that many Poisson-subsampled steps.
    history = await client.ok(
        "federations.privacy.history", {"federation_id": fed["id"]}, other_org.token
    )
    entries = sorted(history["items"], key=lambda e: e["cumulative_epsilon"])
    assert len(entries) == draws and entries[-1]["round_id"] == rnd["id"]
    for entry in entries:
        assert entry["num_steps"] == 1 and entry["noise_multiplier"] == Z
        assert entry["sample_rate"] == pytest.approx(q, rel=1e-15)
        assert entry["round_epsilon_cost"] == pytest.approx(
            dp_accounting_epsilon(Z, q, DELTA), rel=1e-6
        )
    reference = composed_epsilon(Z, q, draws, DELTA)
    assert entries[-1]["cumulative_epsilon"] == pytest.approx(reference, rel=1e-6)
    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert state["current_epsilon_spent"] == pytest.approx(reference, rel=1e-6)
    assert state["rounds_tracked"] == draws

    # The noise: new - base - (sum of clipped deltas) / (q N) is N(0, (z C / (q N))^2).
    expected_cohort = q * 2 * PER_ORG
    sigma = Z * CLIP / expected_cohort
    assert version["metrics"]["dp_noise_std"] == pytest.approx(sigma, rel=1e-12)
    new = await download_weights(client, org.token, mlp_model["id"], version["version"])
    summed = {k: sum(clipped(d, CLIP)[k] for d in deltas) for k in base}
    residual = np.concatenate(
        [(new[k].astype(np.float64) - base[k] - summed[k] / expected_cohort).ravel() for k in base]
    )
    statistic = float(np.sum((residual / sigma) ** 2))
    assert stats.chi2.sf(statistic, residual.size) > 1e-6
    assert stats.chi2.cdf(statistic, residual.size) > 1e-6


async def test_a_dp_version_publishes_no_unnoised_per_device_statistic(
    client, org, other_org, mlp_model, mlp_bundle
):
    fed = await dp_federation(client, org, other_org, mlp_model)
    tokens = await devices_of(client, [org, other_org])
    rnd, selected, _ = await poisson_round(client, org, other_org, mlp_model, fed)
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    base = numpy_state(mlp_bundle[0])
    for i, device_id in enumerate(selected):
        delta = {k: np.full(v.shape, 0.001 * (i + 1), np.float32) for k, v in base.items()}
        await upload_delta(
            client, rnd, tokens[device_id], delta, 100 + i, {"loss": 0.5 + i, "secret_metric": 42.0}
        )
    await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)

    for reader in (org, other_org):
        got = await client.ok("models.versions.get", {"model_id": mlp_model["id"]}, reader.token)
        listed = (
            await client.ok("models.versions.list", {"model_id": mlp_model["id"]}, reader.token)
        )["items"][0]
        for v in (got, listed):
            assert v["version"] == 2 and v["round_id"] == rnd["id"]
            assert "num_updates" not in v and "total_samples" not in v
            # Only what the round's settings determine: no client metric, no clipping count.
            assert set(v["metrics"]) == {"dp_noise_std", "dp_expected_updates"}
            assert v["metrics"]["dp_expected_updates"] == pytest.approx(TARGET, rel=1e-12)


async def test_dp_selection_refuses_stratification_and_charges_every_draw_even_an_empty_one(
    client, org, other_org, mlp_model
):
    fed = await dp_federation(client, org, other_org, mlp_model)
    await devices_of(client, [org, other_org])
    rnd = await client.ok("training.create_round", dp_round_params(mlp_model, fed), org.token)
    error = await client.error(
        "training.select_devices",
        {"round_id": rnd["id"], "criteria": {"stratify_by_platform": True}},
        org.token,
    )
    assert error["data"]["type"] == "bad_request"
    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert state["rounds_tracked"] == 0

    # Select, look, cancel, draw again: before, only the round finally aggregated was charged.
    # q = fraction = 0.001 over 8 devices: a draw is empty with probability 0.992.
    draws = 0
    for _ in range(20):
        draws += 1
        body = await client.call(
            "training.select_devices",
            {"round_id": rnd["id"], "criteria": {"fraction": 0.001}},
            org.token,
        )
        if "error" in body:
            break
        await client.ok("training.cancel_round", {"round_id": rnd["id"]}, org.token)
        rnd = await client.ok("training.create_round", dp_round_params(mlp_model, fed), org.token)
    data = body["error"]["data"]
    assert data["type"] == "precondition_failed" and data["state"] == "failed"
    assert data["sample_rate"] == pytest.approx(0.001, rel=1e-15)
    after = await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert after["state"] == "failed" and after["selected_devices"] == []
    assert after["selection_method"] == "poisson"
    # The empty round cannot be selected again: a new draw needs a new (charged) round.
    again = await client.error("training.select_devices", {"round_id": rnd["id"]}, org.token)
    assert again["data"]["type"] == "precondition_failed"
    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert state["rounds_tracked"] == draws
    assert state["current_epsilon_spent"] == pytest.approx(
        composed_epsilon(Z, 0.001, draws, DELTA), rel=1e-6
    )


async def test_a_private_round_does_not_show_whether_another_organizations_device_was_drawn(
    client, org, other_org, mlp_model
):
    # Seeing the draw would undo the amplification by sampling that the ledger charges for.
    fed = await dp_federation(client, org, other_org, mlp_model)
    await devices_of(client, [org, other_org])
    rnd = await client.ok("training.create_round", dp_round_params(mlp_model, fed), org.token)
    chosen = await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    assert "selected_count" not in chosen
    assert {p["org_id"] for p in chosen["participation"]} <= {org.id}
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    for reader in (org, other_org):
        shown = await client.ok("training.get_round", {"round_id": rnd["id"]}, reader.token)
        assert {p["org_id"] for p in shown["participation"]} <= {reader.id}
        progress = await client.ok(
            "training.get_round_progress", {"round_id": rnd["id"]}, reader.token
        )
        assert not {"selected_count", "received_count", "total_samples"} & set(progress)


async def test_without_dp_a_round_is_still_a_fixed_size_uniform_sample(
    client, org, other_org, mlp_model
):
    fed = await dp_federation(client, org, other_org, mlp_model, budget=None)
    await devices_of(client, [org, other_org])
    params = dp_round_params(mlp_model, fed)
    del params["differential_privacy"]
    rnd = await client.ok("training.create_round", params, org.token)
    chosen = await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    assert chosen["selected_count"] == TARGET
    shown = await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert shown["selection_method"] == "uniform"
    assert shown["sample_rate"] == pytest.approx(TARGET / (2 * PER_ORG), rel=1e-15)
