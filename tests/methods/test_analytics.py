"""Federated analytics through real HTTP, against scipy and numpy on the raw values.

The tests keep the raw values; the service sees them only through
analytics.report. Every number is checked against numpy (linear percentiles,
ddof=1) or scipy.stats at relative error 1e-9 (an absolute floor only where a
value can be 0).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest
from scipy import stats

from tests.conftest import register_device

NOW = datetime.now(UTC).replace(microsecond=0)
RTOL = 1e-9


def close(got, want, rtol=RTOL, atol=0.0):
    assert got == pytest.approx(want, rel=rtol, abs=atol), (got, want)


def when(minutes_ago: float = 10) -> str:
    return (NOW - timedelta(minutes=minutes_ago)).isoformat()


async def analytics_federation(client, owner, member, **policy) -> dict:
    """A federation of `owner` with `member` active and the given analytics policy."""
    fed = await client.ok(
        "federations.create",
        {"name": "stats", "org_id": owner.id, "analytics_policy": policy},
        owner.token,
    )
    await client.ok(
        "federations.invite", {"federation_id": fed["id"], "org_ids": [member.id]}, owner.token
    )
    await client.ok(
        "federations.join", {"federation_id": fed["id"], "org_id": member.id}, member.token
    )
    return fed


async def devices(client, org, n: int, **overrides) -> list[dict]:
    return [await register_device(client, org.token, **overrides) for _ in range(n)]


async def report(client, device: dict, rows: list[dict]) -> dict:
    return await client.ok("analytics.report", {"observations": rows}, device["token"])


async def report_values(client, devs: list[dict], values, variable: str = "x") -> None:
    """Spread `values` over the devices, one batch each."""
    for device, chunk in zip(devs, np.array_split(np.asarray(values), len(devs)), strict=True):
        rows = [{"variable": variable, "value": float(v), "recorded_at": when()} for v in chunk]
        await report(client, device, rows)


async def group_of(client, org, devs: list[dict], name: str) -> str:
    group = await client.ok("devices.groups.create", {"name": name}, org.token)
    await client.ok(
        "devices.groups.add_devices",
        {"group_id": group["id"], "device_ids": [d["device_id"] for d in devs]},
        org.token,
    )
    return group["id"]


def numpy_stats(values) -> dict:
    x = np.asarray(values, dtype=np.float64)
    p25, p50, p75 = np.percentile(x, [25, 50, 75])
    return {
        "count": x.size,
        "mean": x.mean(),
        "std_dev": x.std(ddof=1),
        "median": np.median(x),
        "min": x.min(),
        "max": x.max(),
        "p25": p25,
        "p50": p50,
        "p75": p75,
    }


def check_group(got: dict, values, min_max: bool = True) -> None:
    want = numpy_stats(values)
    assert got["count"] == want["count"]
    for key in ("mean", "std_dev", "median"):
        close(got[key], want[key])
    for key in ("p25", "p50", "p75"):
        close(got["percentiles"][key], want[key])
    if min_max:
        close(got["min"], want["min"])
        close(got["max"], want["max"])
    else:
        assert "min" not in got and "max" not in got


async def test_descriptive_by_member_matches_numpy_even_at_1e8(client, org, other_org):
    fed = await analytics_federation(client, org, other_org, allow_min_max=True, min_group_size=3)
    rng = np.random.default_rng(1)
    mine, theirs = await devices(client, org, 3), await devices(client, other_org, 4)
    a, b = rng.normal(5, 2, 40), 1e8 + rng.normal(0, 1, 57)
    await report_values(client, mine, a)
    await report_values(client, theirs, b)
    missing = {"variable": "x", "recorded_at": when()}  # neither value nor category
    await report(client, theirs[0], [missing, missing])

    got = await client.ok(
        "federations.analytics.descriptive",
        {"federation_id": fed["id"], "variable": "x", "group_by": "federation_member"},
        other_org.token,
    )

    groups = {g["group_id"]: g for g in got["groups"]}
    assert set(groups) == {org.id, other_org.id} and got["suppressed_groups"] == []
    check_group(groups[org.id], a)
    check_group(groups[other_org.id], b)  # a textbook sum of squares loses this std
    assert groups[other_org.id]["missing"] == 2 and groups[org.id]["missing"] == 0
    check_group(got["overall"], np.concatenate([a, b]))
    assert got["query_id"].startswith("anq_")


async def test_small_groups_are_suppressed_and_order_statistics_stay_with_their_owner(
    client, org, other_org
):
    fed = await analytics_federation(client, org, other_org, min_group_size=12)
    rng = np.random.default_rng(2)
    # The floor counts devices: 12 reporting devices are shown, 5 are not (whatever they send).
    big, small = await devices(client, org, 12), await devices(client, org, 5)
    g_big, g_small = (
        await group_of(client, org, big, "big"),
        await group_of(client, org, small, "small"),
    )
    values, few = rng.normal(0, 1, 36), rng.normal(0, 1, 40)
    await report_values(client, big, values)
    await report_values(client, small, few)

    got = await client.ok(
        "federations.analytics.descriptive",
        {
            "federation_id": fed["id"],
            "variable": "x",
            "histogram": {"bins": 4, "lower": -2.0, "upper": 2.0},
        },
        org.token,
    )

    assert [g["group_id"] for g in got["groups"]] == [g_big]
    assert got["suppressed_groups"] == [g_small]
    check_group(got["groups"][0], values)  # its own devices: min, max, percentiles shown
    # Overall holds the shown groups only: nothing of the suppressed group enters it.
    check_group(got["overall"], values)
    counts, _ = np.histogram(values, bins=4, range=(-2.0, 2.0))
    hist = got["groups"][0]["histogram"]
    assert hist["edges"] == pytest.approx(list(np.linspace(-2, 2, 5)), rel=1e-12)
    # Bins with values of fewer than 12 devices are not shown (12 devices: 3 values each).
    devices_in = [
        len({i // 3 for i, v in enumerate(values) if lo <= v < hi})
        for lo, hi in zip(np.linspace(-2, 2, 5)[:-1], np.linspace(-2, 2, 5)[1:], strict=True)
    ]
    assert hist["counts"] == [
        int(c) if c == 0 or d >= 12 else None for c, d in zip(counts, devices_in, strict=True)
    ]
    # Every group small: a clear error naming them, recorded as a failed question.
    err = await client.error(
        "federations.analytics.descriptive",
        {"federation_id": fed["id"], "variable": "x", "group_ids": [g_small]},
        org.token,
    )
    assert err["data"]["type"] == "precondition_failed"
    assert err["data"]["suppressed_groups"] == [g_small]
    listed = await client.ok("federations.analytics.queries.list", {}, org.token)
    assert [q["status"] for q in listed["queries"]] == ["failed", "completed"]
    assert listed["total"] == 2 and listed["queries"][0]["error_message"]
    # They name the asker's device groups: no other member reads them.
    assert await client.ok("federations.analytics.queries.list", {}, other_org.token) == {
        "queries": [],
        "total": 0,
    }
    # Another member's values: no order statistic (min, max, median, percentiles).
    theirs = await devices(client, other_org, 12)
    await report_values(client, theirs, rng.normal(0, 1, 36))
    by_member = await client.ok(
        "federations.analytics.descriptive",
        {"federation_id": fed["id"], "variable": "x", "group_by": "federation_member"},
        org.token,
    )
    groups = {g["group_id"]: g for g in by_member["groups"]}
    for hidden in ("min", "max", "median", "percentiles"):
        assert hidden not in groups[other_org.id] and hidden not in by_member["overall"]
        assert hidden in groups[org.id]


async def test_another_members_device_groups_are_never_named(client, org, other_org):
    fed = await analytics_federation(client, org, other_org, min_group_size=2)
    rng = np.random.default_rng(3)
    mine, theirs = await devices(client, org, 2), await devices(client, other_org, 2)
    g_mine = await group_of(client, org, mine, "mine")
    g_theirs = await group_of(client, other_org, theirs, "theirs")
    await report_values(client, mine, rng.normal(0, 1, 10))
    await report_values(client, theirs, rng.normal(0, 1, 10))

    own = await client.ok(
        "federations.analytics.descriptive",
        {"federation_id": fed["id"], "variable": "x"},
        other_org.token,
    )
    named = await client.call(
        "federations.analytics.descriptive",
        {"federation_id": fed["id"], "variable": "x", "group_ids": [g_mine]},
        other_org.token,
    )

    assert [g["group_id"] for g in own["groups"]] == [g_theirs]
    assert g_mine not in str(own)
    # Naming another organization's group finds nothing (its ids stay with it): it is
    # suppressed like an empty or small group of one's own, and the answer tells which none.
    assert named["error"]["data"]["type"] == "precondition_failed"
    assert named["error"]["data"]["suppressed_groups"] == [g_mine]


@pytest.mark.parametrize("equal_var", [False, True])
@pytest.mark.parametrize("level", [0.95, 0.99])
async def test_t_test_matches_scipy(client, org, other_org, equal_var, level):
    fed = await analytics_federation(client, org, other_org, min_group_size=3)
    rng = np.random.default_rng(4)
    a, b = rng.normal(10, 2, 35), rng.normal(11, 4, 48)
    await report_values(client, await devices(client, org, 3), a)
    await report_values(client, await devices(client, other_org, 3), b)

    got = await client.ok(
        "federations.analytics.t_test",
        {
            "federation_id": fed["id"],
            "variable": "x",
            "group_by": "federation_member",
            "group_a": org.id,
            "group_b": other_org.id,
            "confidence_level": level,
            "equal_var": equal_var,
        },
        org.token,
    )

    want = stats.ttest_ind(a, b, equal_var=equal_var)
    close(got["t_statistic"], want.statistic)
    close(got["p_value"], want.pvalue)
    close(got["degrees_of_freedom"], want.df)
    ci = want.confidence_interval(level)
    close(got["confidence_interval"]["lower"], ci.low)
    close(got["confidence_interval"]["upper"], ci.high)
    assert got["confidence_interval"]["level"] == level
    pooled = np.sqrt(
        ((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2)
    )
    close(got["cohens_d"], (a.mean() - b.mean()) / pooled)
    assert got["significant"] == (want.pvalue < 1 - level)


async def test_anova_and_tukey_match_scipy(client, org, other_org):
    fed = await analytics_federation(client, org, other_org, min_group_size=2)
    rng = np.random.default_rng(5)
    samples, ids = [], []
    for i, (mean, size) in enumerate([(0.0, 20), (0.5, 31), (1.5, 26)]):
        devs = await devices(client, org, 2)
        ids.append(await group_of(client, org, devs, f"g{i}"))
        samples.append(rng.normal(mean, 1, size))
        await report_values(client, devs, samples[-1])

    got = await client.ok(
        "federations.analytics.anova",
        {"federation_id": fed["id"], "variable": "x", "confidence_level": 0.95},
        org.token,
    )

    by_id = dict(zip(ids, samples, strict=True))
    order = got["groups"]
    assert sorted(order) == sorted(ids)
    data = [by_id[g] for g in order]
    want = stats.f_oneway(*data)
    close(got["f_statistic"], want.statistic)
    close(got["p_value"], want.pvalue)
    assert got["degrees_of_freedom_between"] == 2
    assert got["degrees_of_freedom_within"] == sum(x.size for x in data) - 3
    everything = np.concatenate(data)
    between = sum(x.size * (x.mean() - everything.mean()) ** 2 for x in data)
    close(got["eta_squared"], between / np.sum((everything - everything.mean()) ** 2))
    tukey = stats.tukey_hsd(*data)
    ci = tukey.confidence_interval(0.95)
    for pair in got["post_hoc_pairs"]:
        i, j = order.index(pair["group_a"]), order.index(pair["group_b"])
        close(pair["mean_difference"], data[i].mean() - data[j].mean())
        # scipy integrates the studentized range to 1e-11 absolute.
        close(pair["p_value"], tukey.pvalue[i, j], atol=1e-11)
        close(pair["confidence_interval"]["lower"], ci.low[i, j])
        close(pair["confidence_interval"]["upper"], ci.high[i, j])
    assert len(got["post_hoc_pairs"]) == 3


@pytest.mark.parametrize(("rows", "cols", "yates"), [(2, 2, None), (2, 2, False), (3, 3, None)])
async def test_chi_square_matches_scipy(client, org, other_org, rows, cols, yates):
    fed = await analytics_federation(client, org, other_org, min_group_size=2)
    rng = np.random.default_rng(6 + rows)
    observed = np.zeros((rows, cols), dtype=int)
    for device in await devices(client, org, 24) + await devices(client, other_org, 21):
        r, c = int(rng.integers(rows)), int(rng.integers(cols))
        observed[r, c] += 1
        # An older answer to variable a that the latest one replaces: a device counts once.
        await report(
            client,
            device,
            [
                {"variable": "a", "category": "stale", "recorded_at": when(60)},
                {"variable": "a", "category": f"r{r}", "recorded_at": when(5)},
                {"variable": "b", "category": f"c{c}", "recorded_at": when(5)},
            ],
        )

    params = {"federation_id": fed["id"], "variable_1": "a", "variable_2": "b"}
    if yates is not None:
        params["yates"] = yates
    got = await client.ok("federations.analytics.chi_square", params, org.token)

    want = stats.chi2_contingency(observed, correction=True if yates is None else yates)
    assert got["observed"]["rows"] == [f"r{i}" for i in range(rows)]
    assert got["observed"]["counts"] == observed.tolist()
    close(got["chi_square_statistic"], want.statistic)
    close(got["p_value"], want.pvalue)
    assert got["degrees_of_freedom"] == want.dof
    np.testing.assert_allclose(got["expected"]["counts"], want.expected_freq, rtol=RTOL)
    close(got["cramers_v"], stats.contingency.association(observed, method="cramer"))
    assert got["yates_applied"] == (want.dof == 1 and yates is not False)
    assert bool(got["warnings"]) == bool((want.expected_freq < 5).any())


async def test_who_may_ask_and_read(client, org, other_org, make_org):
    fed = await analytics_federation(client, org, other_org, min_group_size=2)
    outsider, invited = await make_org(), await make_org()
    await client.ok(
        "federations.invite", {"federation_id": fed["id"], "org_ids": [invited.id]}, org.token
    )
    devs = await devices(client, org, 2)
    await report_values(client, devs, np.arange(10.0))
    ask = {"federation_id": fed["id"], "variable": "x", "group_by": "federation_member"}
    answer = await client.ok("federations.analytics.descriptive", ask, org.token)

    for stranger in (outsider, invited):
        err = await client.error("federations.analytics.descriptive", ask, stranger.token)
        assert err["data"]["type"] == "forbidden"
        err = await client.error(
            "federations.analytics.queries.get", {"query_id": answer["query_id"]}, stranger.token
        )
        assert err["data"]["type"] == "not_found"
        listed = await client.ok("federations.analytics.queries.list", {}, stranger.token)
        assert listed == {"queries": [], "total": 0}
    err = await client.error("federations.analytics.descriptive", ask, devs[0]["token"])
    assert err["data"]["type"] == "forbidden"
    # A member reads the owner's question; its answer names no device.
    got = await client.ok(
        "federations.analytics.queries.get", {"query_id": answer["query_id"]}, other_org.token
    )
    assert got["status"] == "completed" and got["query_type"] == "descriptive"
    assert got["result"]["groups"][0]["count"] == 10
    assert not any(d["device_id"] in str(got) for d in devs)
    # Another federation's query id is not found for this federation's members.
    other_fed = await analytics_federation(client, outsider, invited, min_group_size=2)
    theirs = await client.call(
        "federations.analytics.descriptive",
        {**ask, "federation_id": other_fed["id"]},
        outsider.token,
    )
    assert theirs["error"]["data"]["type"] == "precondition_failed"  # no data: recorded, failed
    (their_query,) = (await client.ok("federations.analytics.queries.list", {}, outsider.token))[
        "queries"
    ]
    err = await client.error(
        "federations.analytics.queries.get", {"query_id": their_query["id"]}, org.token
    )
    assert err["data"]["type"] == "not_found"
    listed = await client.ok(
        "federations.analytics.queries.list", {"federation_id": other_fed["id"]}, org.token
    )
    assert listed == {"queries": [], "total": 0}


def stored(database_url: str, device_id: str) -> int:
    """How many observations of a device the database holds (read past the privacy floor)."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT count(*) FROM analytics_observations WHERE device_id = %s", (device_id,)
        ).fetchone()[0]


@pytest.mark.parametrize(
    ("bad", "index"),
    [
        ({"value": 1.0, "category": "a"}, 2),
        ({"recorded_at": (NOW + timedelta(days=1)).isoformat()}, 2),
        ({"recorded_at": "2026-01-01T00:00:00"}, 2),
        ({"variable": "x", "category": "a"}, 2),  # x is numeric earlier in the batch
        ({"variable": "undeclared"}, 2),
    ],
)
async def test_a_bad_row_rejects_the_whole_batch(client, org, other_org, database_url, bad, index):
    await analytics_federation(
        client, org, other_org, min_group_size=2, variables={"x": "numeric", "c": "categorical"}
    )
    device = (await devices(client, org, 1))[0]
    good = {"variable": "x", "value": 1.0, "recorded_at": when()}
    rows = [good, good, {**good, **bad}, good]

    err = await client.error("analytics.report", {"observations": rows}, device["token"])

    assert err["data"]["type"] == "bad_request" and err["data"]["index"] == index
    assert stored(database_url, device["device_id"]) == 0


async def test_kinds_are_fixed_and_batches_bounded_and_idempotent(
    client, org, other_org, database_url
):
    await analytics_federation(client, org, other_org, min_group_size=2)
    device = (await devices(client, org, 1))[0]
    first = {"variable": "x", "value": 2.0, "recorded_at": when()}
    await report(client, device, [first, first])
    err = await client.error(
        "analytics.report",
        {"observations": [first, {"variable": "x", "category": "a", "recorded_at": when()}]},
        device["token"],
    )
    assert err["data"]["type"] == "bad_request" and err["data"]["index"] == 1
    too_many = [first] * 10_001
    err = await client.error("analytics.report", {"observations": too_many}, device["token"])
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "observations"
    assert "at most 10000 observations" in err["data"]["message"]
    # Infinity is no JSON number; 1e999 parses as one and is refused.
    body = (
        '{"jsonrpc":"2.0","id":1,"method":"analytics.report","params":{"observations":'
        '[{"variable":"x","value":1e999,"recorded_at":"' + when() + '"}]}}'
    )
    _, answer = await client.post(body.encode(), device["token"], raw=True)
    assert answer["error"]["code"] == -32602, answer
    assert answer["error"]["data"]["type"] == "bad_request"
    assert answer["error"]["data"]["path"] == "$.observations[0].value"
    keyed = {"observations": [first], "idempotency_key": "batch-7"}
    once = await client.ok("analytics.report", keyed, device["token"])
    again = await client.ok("analytics.report", keyed, device["token"])
    assert once == again == {"accepted": 1}
    assert stored(database_url, device["device_id"]) == 3
    # A device reports only as itself: there is nothing to name another device with.
    err = await client.error(
        "analytics.report",
        {"observations": [first], "device_id": device["device_id"]},
        device["token"],
    )
    assert err["code"] == -32602 and err["data"]["type"] == "bad_request"
    assert err["data"]["path"] == "$" and "device_id" in err["data"]["message"]


async def test_overall_counts_a_device_in_two_groups_once(client, org, other_org):
    fed = await analytics_federation(client, org, other_org, min_group_size=2)
    devs = await devices(client, org, 5)
    await group_of(client, org, devs[:3], "a")
    await group_of(client, org, devs[2:], "b")  # devs[2] is in both
    values = np.random.default_rng(9).normal(3, 1, 15)
    await report_values(client, devs, values)

    got = await client.ok(
        "federations.analytics.descriptive",
        {"federation_id": fed["id"], "variable": "x"},
        org.token,
    )

    assert sorted(g["count"] for g in got["groups"]) == [9, 9]
    check_group(got["overall"], values)  # 15 observations, not 18
