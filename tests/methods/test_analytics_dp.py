"""Analytics with dp through real HTTP: charged like a training round, noised as stated.

The reference for the charge is dp-accounting (one Gaussian release at q = 1);
for the noise, the exact per-device clipped means the test computes from its
own raw values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tests.kernels.test_stats_dp import reference_epsilon
from tests.methods.test_analytics import analytics_federation, devices, report, when


async def clipped_devices(client, org, n: int, rng) -> list[float]:
    """n devices reporting 3 values each in about [-2, 6]; their means clipped to [0, 4]."""
    means = []
    for device in await devices(client, org, n):
        values = rng.normal(2.0, 2.0, 3)
        await report(
            client,
            device,
            [{"variable": "x", "value": float(v), "recorded_at": when()} for v in values],
        )
        means.append(float(np.mean(np.clip(values, 0.0, 4.0))))
    return means


def ask(fed, **extra) -> dict:
    return {
        "federation_id": fed["id"],
        "variable": "x",
        "group_by": "federation_member",
        "dp": {"epsilon": 2.0, "lower": 0.0, "upper": 4.0},
        **extra,
    }


async def test_a_dp_question_is_charged_as_dp_accounting_says_and_shows_no_single_value(
    client, org, other_org
):
    fed = await analytics_federation(client, org, other_org, allow_min_max=True)
    # 30 devices: the noised count (std about 4 at epsilon 2) stays above the floor of 10.
    await clipped_devices(client, org, 30, np.random.default_rng(1))

    got = await client.ok("federations.analytics.descriptive", ask(fed), other_org.token)

    z, delta = got["dp"]["noise_multiplier"], got["dp"]["delta"]
    assert delta == 1e-5
    assert got["dp"]["epsilon"] == pytest.approx(reference_epsilon(z, delta), rel=1e-6)
    assert got["dp"]["epsilon"] <= 2.0 * (1 + 1e-6)
    history = await client.ok(
        "federations.privacy.history", {"federation_id": fed["id"]}, org.token
    )
    (entry,) = history["items"]
    assert entry["round_id"] == got["query_id"] and entry["noise_multiplier"] == z
    assert entry["sample_rate"] == 1.0 and entry["num_steps"] == 1
    # No percentiles, min or max under dp (they would be single devices' values); the
    # member without devices has a noised count below the floor: suppressed, not shown.
    # (The member has no devices: its noised count, of std about 4, is almost always below
    # the floor of 10, but reaching it is what the mechanism allows: not asserted.)
    (group,) = [g for g in got["groups"] if g["group_id"] == org.id]
    assert org.id not in got["suppressed_groups"]
    for hidden in ("min", "max", "median", "percentiles", "missing"):
        assert hidden not in group


async def test_dp_noise_has_the_calibrated_size(client, org, other_org):
    fed = await analytics_federation(client, org, other_org)  # no budget: repeat freely
    means = await clipped_devices(client, org, 30, np.random.default_rng(2))
    counts, averages, zs = [], [], set()
    for _ in range(40):
        got = await client.ok("federations.analytics.descriptive", ask(fed), org.token)
        (group,) = [g for g in got["groups"] if g["group_id"] == org.id]
        counts.append(group["count"])
        averages.append(group["mean"])
        zs.add(got["dp"]["noise_multiplier"])
    (z,) = zs
    sigma = z * math.sqrt(3)  # per normalised coordinate: (1, y/R, y^2/R^2) has norm sqrt(3)
    c = np.asarray(counts, dtype=np.float64)
    statistic = (c.size - 1) * c.var(ddof=1) / (sigma**2 + 1 / 12)
    assert stats.chi2.sf(statistic, c.size - 1) > 1e-4
    assert stats.chi2.cdf(statistic, c.size - 1) > 1e-4
    assert abs(c.mean() - 30) < 5 * sigma / math.sqrt(c.size)
    # The mean of the devices' clipped means, up to noise of about sigma * R / n.
    assert abs(np.mean(averages) - np.mean(means)) < 5 * sigma * 2.0 / 30 / math.sqrt(40) + 0.05


async def test_a_dp_question_beyond_the_budget_is_refused_and_recorded(client, org, other_org):
    fed = await client.ok(
        "federations.create",
        {"name": "tight", "org_id": org.id, "privacy_policy": {"total_epsilon_budget": 1.0}},
        org.token,
    )
    await clipped_devices(client, org, 12, np.random.default_rng(3))

    err = await client.error("federations.analytics.descriptive", ask(fed), org.token)

    assert err["data"]["type"] == "privacy_budget_exhausted"
    (query,) = (await client.ok("federations.analytics.queries.list", {}, org.token))["queries"]
    assert query["status"] == "failed" and query["params"]["dp"]["epsilon"] == 2.0
    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert state["rounds_tracked"] == 0


async def test_dp_needs_a_fixed_set_of_groups_and_a_proper_range(client, org, other_org):
    fed = await analytics_federation(client, org, other_org)
    by_group = ask(fed, group_by="device_group")
    err = await client.error("federations.analytics.descriptive", by_group, org.token)
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "group_ids"
    upside_down = ask(fed, dp={"epsilon": 1.0, "lower": 4.0, "upper": 0.0})
    err = await client.error("federations.analytics.descriptive", upside_down, org.token)
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "dp"
    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert state["rounds_tracked"] == 0


async def test_a_dp_t_test_compares_noised_groups(client, org, other_org):
    fed = await analytics_federation(client, org, other_org)
    await clipped_devices(client, org, 40, np.random.default_rng(4))
    await clipped_devices(client, other_org, 40, np.random.default_rng(5))
    params = {
        "federation_id": fed["id"],
        "variable": "x",
        "group_by": "federation_member",
        "group_a": org.id,
        "group_b": other_org.id,
        "dp": {"epsilon": 4.0, "lower": 0.0, "upper": 4.0},
    }

    got = await client.ok("federations.analytics.t_test", params, org.token)

    assert 30 <= got["count_a"] <= 50 and 30 <= got["count_b"] <= 50
    assert 0.0 <= got["p_value"] <= 1.0 and got["dp"]["epsilon"] <= 4.0 * (1 + 1e-6)
