"""Hostile review of federated analytics: what another organization, a hostile device or a
non-member can learn or break, through real HTTP.

Each test states the defence the docs promise (docs/analytics.md, docs/privacy.md,
docs/design.md). A failing test is an attack that works today; see the review report.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.methods.test_analytics import (
    analytics_federation,
    devices,
    group_of,
    report,
    report_values,
    when,
)

DESCRIPTIVE = "federations.analytics.descriptive"


async def budget_federation(client, owner, member, epsilon: float, **policy) -> dict:
    """A federation with a privacy budget, `member` active."""
    fed = await client.ok(
        "federations.create",
        {
            "name": "budgeted",
            "org_id": owner.id,
            "privacy_policy": {"total_epsilon_budget": epsilon},
            "analytics_policy": policy,
        },
        owner.token,
    )
    await client.ok(
        "federations.invite", {"federation_id": fed["id"], "org_ids": [member.id]}, owner.token
    )
    await client.ok(
        "federations.join", {"federation_id": fed["id"], "org_id": member.id}, member.token
    )
    return fed


async def one_each(client, devs, values, variable: str = "x", minutes_ago: float = 10) -> None:
    """Device i reports the single value values[i]."""
    for device, v in zip(devs, values, strict=True):
        await report(
            client,
            device,
            [{"variable": variable, "value": float(v), "recorded_at": when(minutes_ago)}],
        )


async def categories(client, device, a: str, b: str) -> None:
    await report(
        client,
        device,
        [
            {"variable": "a", "category": a, "recorded_at": when()},
            {"variable": "b", "category": b, "recorded_at": when()},
        ],
    )


def by_member(fed, **extra) -> dict:
    return {
        "federation_id": fed["id"],
        "variable": "x",
        "group_by": "federation_member",
        **extra,
    }


# --- The privacy floor -------------------------------------------------------------------------


async def test_one_device_reporting_floor_many_times_is_not_a_group(client, org, other_org):
    """The floor counts observations, so one device of another member that reports ten
    times (a daily metric) is a 'group of ten': its mean and median are shown."""
    fed = await analytics_federation(client, org, other_org)  # floor 10
    (victim,) = await devices(client, other_org, 1)
    values = [71.0, 73.0, 72.0, 74.0, 73.0, 72.0, 75.0, 73.0, 71.0, 76.0]
    await report_values(client, [victim], values)

    got = await client.call(DESCRIPTIVE, by_member(fed), org.token)

    shown = {g["group_id"]: g for g in got.get("result", {}).get("groups", [])}
    if other_org.id in shown:  # the attack: a single device's own statistics
        assert shown[other_org.id]["mean"] == pytest.approx(np.mean(values))
        assert shown[other_org.id]["median"] == pytest.approx(np.median(values))
    assert other_org.id not in shown, "a single device passed the floor of 10"


async def test_a_null_histogram_bin_locates_a_single_devices_value(client, org, other_org):
    """Empty bins are shown as 0 and small bins as null, so the null bin is where the lone
    value lies; narrowing the range in a second question gives it to 1e-4."""
    fed = await analytics_federation(client, org, other_org)  # floor 10
    theirs = await devices(client, other_org, 12)
    secret = 57.3141
    await one_each(client, theirs, [0.5] * 11 + [secret])

    first = await client.ok(
        DESCRIPTIVE,
        by_member(fed, histogram={"bins": 100, "lower": 0.0, "upper": 100.0}),
        org.token,
    )
    # The defence: another organization's values get no histogram (an order statistic)
    # unless the federation allows min and max.
    (theirs_shown,) = [g for g in first["groups"] if g["group_id"] == other_org.id]
    assert "histogram" not in theirs_shown, "a histogram of another member's values"


async def test_the_median_of_an_odd_group_is_one_devices_raw_value(client, org, other_org):
    """docs/analytics.md: 'no raw value ... ever leaves the database in a response'.
    percentile_cont at odd n returns the middle observation itself."""
    fed = await analytics_federation(client, org, other_org)
    values = [float(v) for v in np.random.default_rng(7).normal(50, 10, 11).round(6)]
    await one_each(client, await devices(client, other_org, 11), values)

    got = await client.ok(DESCRIPTIVE, by_member(fed), org.token)

    (group,) = [g for g in got["groups"] if g["group_id"] == other_org.id]
    assert group.get("median") not in values, "the median is one device's exact value"


async def test_overlapping_device_groups_difference_out_one_device(client, org, other_org):
    """Two shown groups sharing one device, and `overall` over their union (counted once):
    n_a*mean_a + n_b*mean_b - n*mean is that device's value, and every member reads it."""
    fed = await analytics_federation(client, org, other_org, min_group_size=5)
    mine = await devices(client, org, 11)
    shared, secret = mine[10], 42.125
    g_a = await group_of(client, org, [*mine[:5], shared], "a")
    g_b = await group_of(client, org, [*mine[5:10], shared], "b")
    await one_each(client, mine, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, secret])

    asked = await client.ok(
        DESCRIPTIVE,
        {"federation_id": fed["id"], "variable": "x", "group_ids": [g_a, g_b]},
        org.token,
    )
    read = await client.call(
        "federations.analytics.queries.get", {"query_id": asked["query_id"]}, other_org.token
    )

    # The groups are the asker's own devices (their values are its own); the defence is that
    # no other member reads a question naming its device groups.
    assert read["error"]["data"]["type"] == "not_found", "one device's value, read by a member"


async def test_a_group_with_one_observation_is_told_apart_from_an_empty_one(client, org, other_org):
    """suppressed_groups (and the message) differ between 'none' and 'fewer than the floor':
    with a one-minute window this says whether another member's device reported then."""
    fed = await analytics_federation(client, org, other_org)
    (device,) = await devices(client, other_org, 1)
    await report(client, device, [{"variable": "x", "value": 1.0, "recorded_at": when(5)}])

    def window(start: float, end: float) -> dict:
        filters = {"start_time": when(start), "end_time": when(end)}
        return by_member(fed, group_ids=[other_org.id], filters=filters)

    busy = await client.error(DESCRIPTIVE, window(6, 4), org.token)
    quiet = await client.error(DESCRIPTIVE, window(9, 7), org.token)

    assert busy["data"]["suppressed_groups"] == [other_org.id]
    assert (busy["data"]["suppressed_groups"], busy["data"]["message"]) == (
        quiet["data"]["suppressed_groups"],
        quiet["data"]["message"],
    ), "whether one device of another member reported in the window is told"


# --- Chi-square --------------------------------------------------------------------------------


async def test_suppressed_categories_name_a_single_devices_raw_category(client, org, other_org):
    fed = await analytics_federation(client, org, other_org, min_group_size=2)
    for device, (a, b) in zip(
        await devices(client, org, 4), [("p", "x"), ("p", "y"), ("q", "x"), ("q", "y")], strict=True
    ):
        await categories(client, device, a, b)
    (victim,) = await devices(client, other_org, 1)
    secret = "hiv-positive jane.doe@example.com"
    await categories(client, victim, secret, "x")

    got = await client.call(
        "federations.analytics.chi_square",
        {"federation_id": fed["id"], "variable_1": "a", "variable_2": "b"},
        org.token,
    )

    assert secret not in str(got), "a single device's category is named"


async def test_chi_square_padding_isolates_one_device_of_another_member(client, org, other_org):
    """The asker fills every row and column past the floor with its own devices and
    subtracts them: what remains is one device of another organization, in its cell."""
    fed = await analytics_federation(client, org, other_org, min_group_size=5)
    mine = {("pos", "x"): 5, ("neg", "y"): 5}
    for (a, b), n in mine.items():
        for device in await devices(client, org, n):
            await categories(client, device, a, b)
    (victim,) = await devices(client, other_org, 1)
    await categories(client, victim, "pos", "y")

    got = await client.call(
        "federations.analytics.chi_square",
        {"federation_id": fed["id"], "variable_1": "a", "variable_2": "b"},
        org.token,
    )

    if "result" in got:
        table = got["result"]["observed"]
        others = {
            (r, c): table["counts"][i][j] - mine.get((r, c), 0)
            for i, r in enumerate(table["rows"])
            for j, c in enumerate(table["columns"])
        }
        assert not any(0 < n < 5 for n in others.values()), f"others' cells: {others}"


async def test_chi_square_honours_min_sample_count(client, org, other_org):
    """docs/analytics.md: min_sample_count 'raises the floor for this question'; chi_square
    takes filters but uses the federation's floor only."""
    fed = await analytics_federation(client, org, other_org, min_group_size=2)
    for device, (a, b) in zip(
        await devices(client, other_org, 4),
        [("p", "x"), ("p", "y"), ("q", "x"), ("q", "y")],
        strict=True,
    ):
        await categories(client, device, a, b)

    got = await client.call(
        "federations.analytics.chi_square",
        {
            "federation_id": fed["id"],
            "variable_1": "a",
            "variable_2": "b",
            "filters": {"min_sample_count": 1000},
        },
        org.token,
    )

    assert "error" in got, "categories of 2 devices shown under a floor of 1000"


# --- What other members read -------------------------------------------------------------------


async def test_recorded_questions_do_not_show_the_askers_device_group_ids(client, org, other_org):
    """docs/analytics.md: 'another organization's device group ids stay with it'; yet every
    member reads the params and result of a device_group question."""
    fed = await analytics_federation(client, org, other_org, min_group_size=2)
    mine = await devices(client, org, 2)
    g = await group_of(client, org, mine, "oncology-ward")
    await report_values(client, mine, np.arange(6.0))
    await client.ok(
        DESCRIPTIVE, {"federation_id": fed["id"], "variable": "x", "group_ids": [g]}, org.token
    )

    listed = await client.ok("federations.analytics.queries.list", {}, other_org.token)

    assert listed["total"] == 0  # the question names the asker's groups: it stays the asker's
    assert g not in str(listed), "another member reads the asker's device group id"


# --- Poisoning and cost ------------------------------------------------------------------------


async def test_one_huge_value_from_a_hostile_device_breaks_every_members_questions(
    client, org, other_org
):
    """Values up to 1.8e308 are 'finite' and accepted; (x - centre)^2 then overflows in SQL,
    and every question on the variable fails for everyone, even with the hostile group
    below the floor."""
    fed = await analytics_federation(client, org, other_org)
    await one_each(client, await devices(client, org, 12), np.arange(12.0))
    (hostile,) = await devices(client, other_org, 1)
    refused = await client.call(
        "analytics.report",
        {
            "observations": [
                {"variable": "x", "value": 1e200, "recorded_at": when()},
                {"variable": "x", "value": 0.0, "recorded_at": when()},
            ]
        },
        hostile["token"],
    )
    assert refused["error"]["data"]["type"] == "bad_request"  # |value| <= 1e15
    assert refused["error"]["code"] == -32602
    assert refused["error"]["data"]["path"] == "$.observations[0].value"
    await report(
        client,
        hostile,
        [
            {"variable": "x", "value": 1e15, "recorded_at": when()},
            {"variable": "x", "value": -1e15, "recorded_at": when()},
        ],
    )

    got = await client.call(DESCRIPTIVE, by_member(fed), org.token)

    assert "result" in got, got["error"]


@pytest.mark.xfail(
    strict=True,
    reason="known limitation (docs/analytics.md): a variable's kind is fixed by the organization's first report unless a federation declares it",
)
async def test_a_hostile_device_fixes_a_variables_kind_for_its_whole_organization(
    client, org, other_org
):
    await analytics_federation(client, org, other_org)
    hostile, honest = await devices(client, other_org, 2)
    await report(client, hostile, [{"variable": "hr", "category": "junk", "recorded_at": when()}])

    got = await client.call(
        "analytics.report",
        {"observations": [{"variable": "hr", "value": 72.0, "recorded_at": when()}]},
        honest["token"],
    )

    assert "result" in got, "one device decided that no device of its org reports hr as a number"


@pytest.mark.xfail(
    strict=True,
    reason="known limitation (docs/analytics.md): observations are the organization's, not tied to one federation; declarations of all its federations apply",
)
async def test_one_federations_declarations_block_a_member_in_another(
    client, org, other_org, make_org
):
    """Observations are not tied to a federation, so an owner that declares `x` categorical
    stops a member's devices reporting `x` as the member's other federation declares it."""
    third = await make_org()
    await analytics_federation(client, org, other_org, variables={"x": "categorical"})
    await analytics_federation(client, third, other_org, variables={"x": "numeric"})
    (device,) = await devices(client, other_org, 1)

    got = await client.call(
        "analytics.report",
        {"observations": [{"variable": "x", "value": 1.0, "recorded_at": when()}]},
        device["token"],
    )

    assert "result" in got, "the numeric federation cannot receive x"


@pytest.mark.xfail(
    strict=True,
    reason="known limitation (docs/analytics.md): each federation's policy applies to the questions asked in it, over all its members' observations",
)
async def test_data_reported_under_a_strict_federation_is_read_under_a_lax_one(
    client, org, other_org, make_org
):
    """other_org's devices report `salary` because a strict federation (floor 50, a budget)
    declares it; org reads it in a lax federation both are in (floor 2, min/max)."""
    strict_owner = await make_org()
    await budget_federation(
        client,
        strict_owner,
        other_org,
        1.0,
        min_group_size=50,
        variables={"salary": "numeric"},
    )
    lax = await analytics_federation(client, org, other_org, min_group_size=2, allow_min_max=True)
    salaries = [48_000.0, 131_500.0]
    await one_each(client, await devices(client, other_org, 2), salaries, variable="salary")

    got = await client.call(DESCRIPTIVE, by_member(lax, variable="salary"), org.token)

    shown = got.get("result", {}).get("groups", [])
    assert not shown, f"read at the lax federation's floor: {shown}"


async def test_the_implicit_group_set_is_bounded_like_group_ids(client, org, other_org):
    """group_ids holds at most 200 ids, but without it every device group of the asker is a
    group: one device in N groups gives N groups and N(N-1)/2 Tukey pairs in one call (and in
    the recorded result), computed on the event loop."""
    fed = await analytics_federation(client, org, other_org, min_group_size=2)
    (device,) = await devices(client, org, 1)
    for i in range(201):
        await group_of(client, org, [device], f"g{i:03d}")
    await report_values(client, [device], [1.0, 2.0, 4.0])

    got = await client.call(
        "federations.analytics.anova",
        {"federation_id": fed["id"], "variable": "x", "post_hoc": False},
        org.token,
    )

    assert got["error"]["data"]["type"] == "bad_request" and got["error"]["data"]["field"] == (
        "group_ids"
    ), "more than 200 groups from one device"


# --- Differential privacy ----------------------------------------------------------------------


def dp_question(fed, epsilon: float, **extra) -> dict:
    return by_member(fed, dp={"epsilon": epsilon, "lower": 0.0, "upper": 4.0}, **extra)


async def test_a_federation_with_a_budget_still_answers_without_dp(client, org, other_org):
    """docs/privacy.md, 'Budget means DP'; analytics skips it, and two windows that differ by
    one device give that device's value exactly."""
    fed = await budget_federation(client, org, other_org, 5.0)
    await one_each(client, await devices(client, other_org, 10), np.arange(10.0), minutes_ago=30)
    (late,) = await devices(client, other_org, 1)
    await one_each(client, [late], [77.7], minutes_ago=5)

    before = await client.call(
        DESCRIPTIVE, by_member(fed, filters={"end_time": when(10)}), org.token
    )
    after = await client.call(DESCRIPTIVE, by_member(fed), org.token)

    if "result" in before and "result" in after:
        a, b = before["result"]["overall"], after["result"]["overall"]
        leaked = b["count"] * b["mean"] - a["count"] * a["mean"]
        assert leaked == pytest.approx(77.7, rel=1e-9)
    assert "error" in before, "a question without dp in a federation with a budget"


async def test_a_member_cannot_drain_the_owners_privacy_budget(client, org, other_org):
    """docs/privacy.md: 'no member drains another's privacy budget'. One DP question of a
    member, even one that shows nothing, takes the whole budget the owner's rounds need."""
    fed = await budget_federation(client, org, other_org, 2.0)

    await client.call(DESCRIPTIVE, dp_question(fed, 2.0), other_org.token)
    owners = await client.call(DESCRIPTIVE, dp_question(fed, 0.5), org.token)

    assert owners.get("error", {}).get("data", {}).get("type") != "privacy_budget_exhausted"


async def test_a_dp_range_too_wide_is_refused_before_the_charge(client, org, other_org):
    """lower/upper are 'finite' up to 1e300, but R^2 overflows a float past 1.3e154: the
    noise step raises OverflowError after the ledger was charged (internal error, the
    question unrecorded, the charge kept)."""
    fed = await analytics_federation(client, org, other_org)
    await one_each(client, await devices(client, org, 12), np.arange(12.0))
    wide = by_member(fed, dp={"epsilon": 20.0, "lower": -1e160, "upper": 1e160})

    err = await client.error(DESCRIPTIVE, wide, org.token)

    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    # Refused by the schema (|lower|, |upper| <= 1e15) before anything is charged or recorded.
    assert (err["data"]["type"], state["rounds_tracked"]) == ("bad_request", 0)
    assert err["code"] == -32602 and err["data"]["path"] == "$.dp.lower"


# --- Defences that hold (coverage) -------------------------------------------------------------


async def test_a_replayed_dp_question_is_neither_charged_nor_noised_again(client, org, other_org):
    fed = await analytics_federation(client, org, other_org)
    await one_each(client, await devices(client, org, 15), np.linspace(0, 4, 15))
    keyed = {**dp_question(fed, 20.0), "idempotency_key": "dp-7"}

    once = await client.ok(DESCRIPTIVE, keyed, org.token)
    again = await client.ok(DESCRIPTIVE, keyed, org.token)

    assert once == again
    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert state["rounds_tracked"] == 1
    # Another principal's same key is its own question: charged on its own.
    theirs = await client.ok(DESCRIPTIVE, keyed, other_org.token)
    assert theirs["query_id"] != once["query_id"]
    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert state["rounds_tracked"] == 2


async def test_a_replayed_dp_question_that_failed_is_charged_again(client, org, other_org):
    """A failure releases the key; the replay draws fresh noise (its suppressed_groups are a
    release), so it must be charged again, and it is."""
    fed = await analytics_federation(client, org, other_org)  # no devices: nothing to show
    keyed = {**dp_question(fed, 20.0), "idempotency_key": "dp-8"}

    for _ in range(2):
        err = await client.error(DESCRIPTIVE, keyed, org.token)
        assert err["data"]["type"] == "precondition_failed"

    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert state["rounds_tracked"] == 2


async def test_dp_counts_a_device_in_two_groups_once(client, org, other_org):
    fed = await analytics_federation(client, org, other_org)
    both, only = await devices(client, org, 12), await devices(client, org, 12)
    g1 = await group_of(client, org, both, "one")
    g2 = await group_of(client, org, [*both, *only], "two")
    await one_each(client, [*both, *only], [2.0] * 24)

    got = await client.ok(
        DESCRIPTIVE,
        {
            "federation_id": fed["id"],
            "variable": "x",
            "group_ids": [g1, g2],
            "dp": {"epsilon": 100.0, "lower": 0.0, "upper": 4.0},
        },
        org.token,
    )

    assert abs(sum(g["count"] for g in got["groups"]) - 24) <= 2  # 36 if counted twice


async def test_duplicate_group_ids_do_not_double_count(client, org, other_org):
    fed = await analytics_federation(client, org, other_org, min_group_size=2)
    mine = await devices(client, org, 3)
    g = await group_of(client, org, mine, "g")
    await one_each(client, mine, [1.0, 2.0, 3.0])

    got = await client.ok(
        DESCRIPTIVE, {"federation_id": fed["id"], "variable": "x", "group_ids": [g, g]}, org.token
    )

    assert [x["count"] for x in got["groups"]] == [3] and got["overall"]["count"] == 3


async def test_a_nul_in_a_category_is_a_bad_request(client, org, other_org):
    await analytics_federation(client, org, other_org)
    (device,) = await devices(client, org, 1)

    err = await client.error(
        "analytics.report",
        {"observations": [{"variable": "c", "category": "a\u0000b", "recorded_at": when()}]},
        device["token"],
    )

    assert err["code"] == 4400 and err["data"]["type"] == "bad_request"
    assert err["data"]["reason"] == "nul_character"


async def test_a_non_member_and_a_device_cannot_ask_or_read(client, org, other_org, make_org):
    fed = await analytics_federation(client, org, other_org, min_group_size=2)
    outsider = await make_org()
    (device,) = await devices(client, other_org, 1)
    for token in (outsider.token, device["token"]):
        err = await client.error(DESCRIPTIVE, dp_question(fed, 1.0), token)
        assert err["data"]["type"] == "forbidden"
        err = await client.error("federations.analytics.queries.list", {}, device["token"])
        assert err["data"]["type"] == "forbidden"
    err = await client.error(DESCRIPTIVE, by_member(fed), None)
    assert err["data"]["type"] in ("unauthorized", "forbidden")
    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert state["rounds_tracked"] == 0
