"""Central DP checked on what the server stores and charges, not on what it reports.

A DP round over HTTP with known deltas (some above the clipping norm): the published weights
minus the clipped mean computed here are the residual noise, whose scale must be z C / (q N)
(the fixed-denominator estimator of McMahan et al. 2018) and which must hold no trace of the
devices' deltas. Each check is shown, in the same test, to reject the nearest wrong answer (a
noise scale off by 1.2, the realised cohort as denominator, deltas not clipped or weighted by
sample count). The ledger's and the estimate's epsilons are compared with Opacus' RDP
formulas and dp-accounting's RDP and PLD accountants for the same (z, q, steps, delta).
"""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest
import safetensors.numpy
from scipy import stats

from fedrpc.fl.privacy import RoundCharge
from tests.conftest import register_device
from tests.kernels.nets import numpy_state
from tests.kernels.privacy_references import (
    dp_accounting_epsilon,
    dp_accounting_pld,
    dp_accounting_pld_running,
    opacus_epsilon,
)
from tests.methods.conftest import upload_delta

# Two-sided significance of each statistical check: a correct server fails the chi-square
# test and the up to nine projections with probability about 1e-5 in all. The wrong answers
# are far beyond it: worked out
# for every cohort size m the draw can give, the nearest lies 21 sigma from the truth, and a
# noise scale off by 1.2 puts the chi-square statistic ~100 sigma out.
P_FLOOR = 1e-6
Z_LIMIT = float(stats.norm.isf(P_FLOOR / 2))  # 4.9


async def private_federation(client, org, model, *, budget: float, delta: float) -> dict:
    """A federation of `org` alone, with a budget, `model` shared into it."""
    fed = await client.ok(
        "federations.create",
        {
            "name": "dp",
            "org_id": org.id,
            "min_round_updates": 2,
            "privacy_policy": {"total_epsilon_budget": budget, "total_delta_budget": delta},
        },
        org.token,
    )
    await client.ok(
        "federations.models.share", {"federation_id": fed["id"], "model_id": model["id"]}, org.token
    )
    return fed


def dp_round(model, fed, z: float, clip: float, target: int) -> dict:
    return {
        "model_id": model["id"],
        "base_version": 1,
        "federation_id": fed["id"],
        "target_device_count": target,
        "min_updates": 2,
        "update_format": "delta",
        "differential_privacy": {"noise_multiplier": z, "clipping_norm": clip},
    }


async def draw(client, org, params) -> tuple[dict, list[str] | None]:
    """Create a DP round and draw its devices (charged either way); None for an empty draw."""
    rnd = await client.ok("training.create_round", params, org.token)
    body = await client.call("training.select_devices", {"round_id": rnd["id"]}, org.token)
    if "error" in body:
        assert body["error"]["data"]["type"] == "precondition_failed"
        assert body["error"]["data"]["state"] == "failed"
        return rnd, None
    return rnd, body["result"]["selected"]


async def download_weights(client, token, model_id, version) -> dict[str, np.ndarray]:
    links = await client.ok(
        "models.versions.download",
        {"model_id": model_id, "version": version, "kinds": ["safetensors"]},
        token,
    )
    async with aiohttp.ClientSession() as http, http.get(links["artifacts"][0]["url"]) as resp:
        return safetensors.numpy.load(await resp.read())


def chi_square_p(residual: np.ndarray, sigma: float) -> float:
    """Two-sided p-value of sum((r / sigma)^2) against chi-square with r.size degrees."""
    statistic = float(np.sum((residual / sigma) ** 2))
    return 2 * min(
        stats.chi2.sf(statistic, residual.size), stats.chi2.cdf(statistic, residual.size)
    )


def largest_projection(residual: np.ndarray, directions: list[np.ndarray], sigma: float) -> float:
    """max |<r, u>| / sigma over unit vectors u: each is N(0, 1) when r is N(0, sigma^2 I)."""
    return max(abs(float(residual @ (u / np.linalg.norm(u)))) / sigma for u in directions)


# ---------------------------------------------------------------- noise and clipping

Z, CLIP = 0.03, 1.0
DEVICES, TARGET = 8, 4  # q = 1/2, expected cohort q N = 4


async def test_published_weights_are_the_clipped_mean_plus_noise_of_z_c_over_q_n(
    client, org, wide_model, wide_bundle
):
    # A small z keeps the signal well above the noise, so a wrong mean shows; the noise's
    # scale is tested on 100,806 coordinates, where a factor 1.2 is ~100 sigma.
    fed = await private_federation(client, org, wide_model, budget=1e6, delta=1e-6)
    tokens = {}
    for _ in range(DEVICES):
        device = await register_device(client, org.token)
        tokens[device["device_id"]] = device["token"]
    # Drawn again (each draw charged) until the realised cohort m differs from q N = 4, so the
    # estimator's fixed denominator and the realised one give different answers.
    params = dp_round(wide_model, fed, Z, CLIP, TARGET)
    draws = 0
    while True:
        draws += 1
        assert draws <= 40, "40 draws of Binomial(8, 1/2) all gave m in {0, 1, 4}"
        rnd, selected = await draw(client, org, params)
        if selected is not None and len(selected) not in (0, 1, TARGET):
            break
        if selected is not None:
            await client.ok("training.cancel_round", {"round_id": rnd["id"]}, org.token)
    m, expected_cohort = len(selected), TARGET
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)

    base = numpy_state(wide_bundle[0])
    names = list(base)
    size = sum(v.size for v in base.values())
    rng = np.random.default_rng(5)
    common = rng.standard_normal(size)
    # Directions sharing a common part; norms below and well above C; sample counts far apart.
    norms = [0.4, 7.0, 0.9, 25.0, 2.0, 0.6, 3.0, 12.0][:m]
    counts = [1, 9000, 3, 40, 700, 2, 10_000, 15][:m]
    deltas = []
    for norm, count, device_id in zip(norms, counts, selected, strict=True):
        direction = common + rng.standard_normal(size)
        vector = (norm * direction / np.linalg.norm(direction)).astype(np.float32)
        deltas.append(vector.astype(np.float64))
        at, delta = 0, {}
        for n in names:
            delta[n] = vector[at : at + base[n].size].reshape(base[n].shape)
            at += base[n].size
        await upload_delta(client, rnd, tokens[device_id], delta, count)
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)

    sigma = Z * CLIP / expected_cohort
    assert version["metrics"] == {
        "dp_noise_std": pytest.approx(sigma, rel=1e-12),
        "dp_expected_updates": pytest.approx(expected_cohort, rel=1e-12),
    }
    stored = await download_weights(client, org.token, wide_model["id"], version["version"])
    published = np.concatenate([stored[n].astype(np.float64).ravel() for n in names])
    x0 = np.concatenate([base[n].astype(np.float64).ravel() for n in names])

    def clip(d: np.ndarray) -> np.ndarray:
        return d * min(1.0, CLIP / np.linalg.norm(d))

    clipped = [clip(d) for d in deltas]
    residual = published - x0 - sum(clipped) / expected_cohort
    directions = [*clipped, sum(clipped)]

    # The residual is N(0, sigma^2) in every coordinate...
    assert chi_square_p(residual, sigma) > P_FLOOR
    # ...and in the directions of the devices' deltas: no trace of them is left.
    assert largest_projection(residual, directions, sigma) < Z_LIMIT
    # The same checks reject the nearest wrong answers: a scale off by 1.2 either way, or
    # the realised cohort as the noise's denominator (m != 4)...
    for wrong_sigma in (1.2 * sigma, sigma / 1.2, Z * CLIP / m):
        assert chi_square_p(residual, wrong_sigma) < P_FLOOR
    # ...and means that divide by m, do not clip, or weigh by sample count.
    for wrong_mean in (
        sum(clipped) / m,
        sum(deltas) / expected_cohort,
        sum(n * c for n, c in zip(counts, clipped, strict=True)) / sum(counts),
    ):
        wrong_residual = published - x0 - wrong_mean
        assert largest_projection(wrong_residual, directions, sigma) > 2 * Z_LIMIT

    # Every draw was charged at (z, q = 1/2, 1 step); the ledger's epsilon at the
    # federation's delta is Opacus' and dp-accounting's for that history.
    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    history = [RoundCharge(Z, TARGET / DEVICES, draws)]
    assert state["rounds_tracked"] == draws and state["delta"] == 1e-6
    assert state["current_epsilon_spent"] == pytest.approx(opacus_epsilon(history, 1e-6), rel=1e-9)
    assert state["current_epsilon_spent"] == pytest.approx(
        dp_accounting_epsilon(history, 1e-6), rel=1e-9
    )


# ---------------------------------------------------------------- the ledger and the estimate


async def test_the_ledger_and_the_estimates_are_opacus_and_dp_accountings(client, org, mlp_model):
    budget, delta = 1000.0, 1e-6
    fed = await private_federation(client, org, mlp_model, budget=budget, delta=delta)
    for _ in range(DEVICES):
        await register_device(client, org.token)
    # (z, target): q = target / 8 = 1/4, then 1/2, 1 and 1/4 again.
    plan = [(1.1, 2), (0.8, 4), (2.0, 8), (1.1, 2)]
    charges = [RoundCharge(z, target / DEVICES, 1) for z, target in plan]
    round_ids = []

    async def charge(z: float, target: int) -> None:
        rnd, selected = await draw(client, org, dp_round(mlp_model, fed, z, 1.0, target))
        round_ids.append(rnd["id"])
        if selected is not None:
            await client.ok("training.cancel_round", {"round_id": rnd["id"]}, org.token)

    await charge(*plan[0])
    # One more round of 4 steps, priced after the first draw by RDP and by PLD, at a delta
    # of its own (dp-accounting's PLD takes seconds for longer histories).
    new = RoundCharge(2.0, 0.5, 4)
    ask = {
        "federation_id": fed["id"],
        "noise_multiplier": new.noise_multiplier,
        "sample_rate": new.sample_rate,
        "num_steps": new.num_steps,
        "target_delta": 1e-5,
    }
    rdp = await client.ok("federations.privacy.estimate", ask, org.token)
    assert rdp["accountant"] == "rdp" and rdp["target_delta"] == 1e-5
    assert rdp["current_epsilon"] == pytest.approx(opacus_epsilon(charges[:1], 1e-5), rel=1e-9)
    assert rdp["round_epsilon_cost"] == pytest.approx(opacus_epsilon([new], 1e-5), rel=1e-9)
    assert rdp["projected_epsilon"] == pytest.approx(
        opacus_epsilon([charges[0], new], 1e-5), rel=1e-9
    )
    pld = await client.ok("federations.privacy.estimate", {**ask, "accountant": "pld"}, org.token)
    assert pld["accountant"] == "pld" and pld["would_exceed_budget"] is False
    # Both discretise at h = 1e-4 with pessimistic connect-the-dots: measured 1e-9 apart.
    current, projected = dp_accounting_pld_running([charges[0], new], 1e-5)
    assert pld["current_epsilon"] == pytest.approx(current, rel=1e-6)
    assert pld["projected_epsilon"] == pytest.approx(projected, rel=1e-6)
    assert pld["round_epsilon_cost"] == pytest.approx(dp_accounting_pld([new], 1e-5), rel=1e-6)
    assert pld["projected_epsilon"] < rdp["projected_epsilon"]

    for z, target in plan[1:]:
        await charge(z, target)
    # History: oldest first, each row at the recorded (z, q), its own cost and the
    # composition of everything up to it (never a sum of per-round epsilons).
    history = await client.ok(
        "federations.privacy.history", {"federation_id": fed["id"]}, org.token
    )
    assert [e["round_id"] for e in history["items"]] == round_ids and history["total"] == 4
    for i, (entry, c) in enumerate(zip(history["items"], charges, strict=True)):
        assert entry["noise_multiplier"] == c.noise_multiplier
        assert entry["sample_rate"] == pytest.approx(c.sample_rate, rel=1e-15)
        assert entry["num_steps"] == 1 and entry["delta"] == delta
        assert entry["round_epsilon_cost"] == pytest.approx(opacus_epsilon([c], delta), rel=1e-9)
        assert entry["cumulative_epsilon"] == pytest.approx(
            opacus_epsilon(charges[: i + 1], delta), rel=1e-9
        )
    spent = opacus_epsilon(charges, delta)
    assert spent < 0.75 * sum(opacus_epsilon([c], delta) for c in charges)
    # dp-accounting's RDP accountant is an upper bound here (its fractional orders
    # overestimate, docs/privacy.md), and close to it.
    reference = dp_accounting_epsilon(charges, delta)
    assert reference * (1 - 1e-3) <= spent <= reference * (1 + 1e-9)

    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert state["current_epsilon_spent"] == pytest.approx(spent, rel=1e-9)
    assert state["epsilon_remaining"] == pytest.approx(budget - spent, rel=1e-9)
    # The two estimates recorded nothing: four draws, four charges.
    assert state["rounds_tracked"] == 4 and state["is_exhausted"] is False
