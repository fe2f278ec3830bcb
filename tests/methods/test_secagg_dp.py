"""Central DP on a SecAgg+ round, over real HTTP: devices clip, the server noises the unmasked sum.

The server never sees one device's delta, so each device clips its own to the
L2 bound the session states (the round's clipping norm C shrunk by the most
quantization can add, docs/secagg.md "Central DP") and weighs itself 1. The
published version must be base + (sum of the clipped deltas) / (q N) + Gaussian
noise of std z C / (q N), as for a plain DP round (test_dp_rounds), checked
with a chi-square test against the float64 reference; the draw is charged as
dp-accounting says; status shows no count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedrpc.client.secagg import SecAggDevice
from tests.kernels.nets import numpy_state
from tests.methods.test_dp_rounds import (
    CLIP,
    DELTA,
    PER_ORG,
    TARGET,
    Z,
    clipped,
    devices_of,
    download_weights,
    dp_accounting_epsilon,
    dp_federation,
    dp_round_params,
)
from tests.methods.test_secagg import Cohort, run_session

QBITS = 16


def device_bound(dimension: int) -> float:
    """The L2 norm a device clips to: C less sqrt(d) quantization steps of 2C / (2^16 - 1)."""
    return CLIP - math.sqrt(dimension) * 2 * CLIP / (2**QBITS - 1)


async def secure_dp_round(client, owner, member, model, fed, z: float):
    """A DP round with secure_aggregation whose Poisson draw left two devices per organization."""
    extra = {
        "secure_aggregation": {"threshold": 2, "stage_seconds": 600},
        "differential_privacy": {"noise_multiplier": z, "clipping_norm": CLIP},
    }
    for _ in range(20):
        rnd = await client.ok(
            "training.create_round", dp_round_params(model, fed, **extra), owner.token
        )
        body = await client.call("training.select_devices", {"round_id": rnd["id"]}, owner.token)
        if "result" in body:
            theirs = await client.ok("training.get_round", {"round_id": rnd["id"]}, member.token)
            mine = body["result"]["selected"]
            if min(len(mine), len(theirs["selected_devices"])) >= 2:
                return rnd, mine + theirs["selected_devices"]
            await client.ok("training.cancel_round", {"round_id": rnd["id"]}, owner.token)
    raise AssertionError("twenty Poisson draws all left an organization with < 2 devices")


async def run_secure_dp(client, org, other_org, model, bundle, database_url, z, budget):
    """Devices run SecAgg+ on a secure DP round, the owner aggregates; what to check it with."""
    fed = await dp_federation(client, org, other_org, model, budget=budget)
    tokens = await devices_of(client, [org, other_org])
    rnd, selected = await secure_dp_round(client, org, other_org, model, fed, z)
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    base = numpy_state(bundle[0])
    rng = np.random.default_rng(23)
    # Norms around 0.3 * sqrt(#params) >> C: every device clips.
    deltas = [
        {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in base.items()}
        for _ in selected
    ]
    # Sample counts are ignored under DP: every device weighs 1.
    samples = [10 * (i + 1) for i in range(len(selected))]
    c = Cohort(
        rnd,
        [tokens[d] for d in selected],
        selected,
        [SecAggDevice(d, s) for d, s in zip(deltas, samples, strict=True)],
        deltas,
        samples,
    )
    survivors, answers = await run_session(client, database_url, c)
    assert answers[max(answers)]["status"] == "completed"
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    new = await download_weights(client, org.token, model["id"], version["version"])
    config = c.devices[0].config
    bound = device_bound(config["dimension"])
    expected_cohort = TARGET  # q N = (TARGET / N) N
    summed = {k: sum(clipped(deltas[i], bound)[k] for i in survivors) for k in base}
    residual = np.concatenate(
        [(new[k].astype(np.float64) - base[k] - summed[k] / expected_cohort).ravel() for k in base]
    )
    return fed, rnd, version, config, residual, len(survivors)


async def test_a_secure_dp_round_is_the_noised_sum_of_device_clipped_deltas(
    client, org, other_org, mlp_model, mlp_bundle, database_url
):
    fed, rnd, version, config, residual, _ = await run_secure_dp(
        client, org, other_org, mlp_model, mlp_bundle, database_url, Z, 10.0
    )

    assert config["max_weight"] == 1 and config["clip"] == CLIP
    assert config["l2_norm_bound"] == pytest.approx(device_bound(config["dimension"]), rel=1e-12)
    for reader in (org, other_org):
        status = await client.ok("training.secagg.status", {"round_id": rnd["id"]}, reader.token)
        assert status["stage"] == "completed"
        for hidden in ("counts", "survivors_count", "dropped_count", "total_weight", "devices"):
            assert hidden not in status
    q = TARGET / (2 * PER_ORG)
    sigma = Z * CLIP / TARGET
    assert version["metrics"]["dp_noise_std"] == pytest.approx(sigma, rel=1e-12)
    assert "num_updates" not in version and "total_samples" not in version
    history = await client.ok(
        "federations.privacy.history", {"federation_id": fed["id"]}, org.token
    )
    charged = next(e for e in history["items"] if e["round_id"] == rnd["id"])
    assert charged["round_epsilon_cost"] == pytest.approx(
        dp_accounting_epsilon(Z, q, DELTA), rel=1e-6
    )
    # Rounding moves each device's coordinate by under one step 2C / (2^16 - 1): ~1e-4 sigma here.
    statistic = float(np.sum((residual / sigma) ** 2))
    assert stats.chi2.sf(statistic, residual.size) > 1e-6
    assert stats.chi2.cdf(statistic, residual.size) > 1e-6


async def test_with_negligible_noise_the_result_is_the_clipped_sum_within_the_rounding(
    client, org, other_org, mlp_model, mlp_bundle, database_url
):
    # No budget, z = 1e-9: the noise is ~1e-10 C; what remains is the devices' clipping and
    # their rounding, under one step 2C / (2^16 - 1) each, summed over m and divided by q N.
    _, _, _, _, residual, m = await run_secure_dp(
        client, org, other_org, mlp_model, mlp_bundle, database_url, 1e-9, None
    )
    step = 2 * CLIP / (2**QBITS - 1)
    assert np.max(np.abs(residual)) <= m * step / TARGET + 1e-6


async def test_a_secure_dp_round_needs_deltas(client, org, other_org, mlp_model):
    fed = await dp_federation(client, org, other_org, mlp_model)
    params = dp_round_params(
        mlp_model, fed, update_format="weights", secure_aggregation={"threshold": 2}
    )
    err = await client.error("training.create_round", params, org.token)
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "update_format"
