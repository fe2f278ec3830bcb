"""Heavy privacy math in the math pool: time limit, bound, lanes, and a loop that stays free.

The pool's own rules are checked on a bare MathPool with sleeping jobs (exact,
fast); the estimates go through HTTP against a real server and are checked
against dp-accounting.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import numpy as np
import pytest

from fedrpc.app import SERVICES
from fedrpc.errors import BadRequest, RateLimited
from fedrpc.fl.privacy import RoundCharge, clear_cache, uncached_pairs
from fedrpc.math_pool import MathPool
from fedrpc.services.privacy_budget import charge_round
from tests.kernels.privacy_references import dp_accounting_pld, opacus_epsilon
from tests.methods.test_analytics import analytics_federation
from tests.methods.test_analytics_dp import ask, clipped_devices
from tests.methods.test_dp_rounds import (
    Z,
    devices_of,
    dp_accounting_epsilon,
    dp_federation,
    dp_round_params,
)

# About 1.7 s of PLD FFTs on a 2-core machine (a tiny rate makes a wide loss grid).
HEAVY = {"noise_multiplier": 0.5, "sample_rate": 0.001, "num_steps": 100, "accountant": "pld"}
# Distinct PLD estimates of tens of ms each (dp-accounting takes ~0.3 s apiece).
DISTINCT = [(3.0, 0.5, 3), (1.2, 0.01, 10), (2.5, 0.2, 1), (1.5, 0.3, 5)]


@pytest.fixture
def time_limit() -> float:
    return 10.0


@pytest.fixture
def settings(settings, time_limit):
    return msgspec.structs.replace(settings, math_time_limit_seconds=time_limit)


@pytest.fixture
async def federation(client, org) -> dict:
    return await client.ok(
        "federations.create",
        {"name": "dp", "org_id": org.id, "privacy_policy": {"total_epsilon_budget": 8.0}},
        org.token,
    )


# -- through the server --------------------------------------------------------------------


@pytest.mark.parametrize("time_limit", [0.3])
async def test_an_estimate_over_the_time_limit_is_too_expensive_and_the_server_goes_on(
    client, org, federation
):
    pool = client.app[SERVICES].math_pool
    fed = {"federation_id": federation["id"]}

    error = await client.error("federations.privacy.estimate", {**fed, **HEAVY}, org.token)

    assert error["data"]["type"] == "bad_request" and error["code"] == 4400
    assert error["data"]["reason"] == "too_expensive"
    assert error["data"]["time_limit_seconds"] == 0.3
    assert pool.recycled == 1  # the runaway worker was killed and replaced
    cheap = {**fed, "noise_multiplier": 4.0, "sample_rate": 1.0, "accountant": "pld"}
    after = await client.ok("federations.privacy.estimate", cheap, org.token)
    assert after["round_epsilon_cost"] > 0


async def test_distinct_estimates_computed_concurrently_match_dp_accounting(
    client, org, federation
):
    fed = {"federation_id": federation["id"]}
    calls = [
        {**fed, "noise_multiplier": s, "sample_rate": q, "num_steps": n, "accountant": "pld"}
        for s, q, n in DISTINCT
    ]

    answers = await asyncio.gather(
        *(client.ok("federations.privacy.estimate", c, org.token) for c in calls)
    )

    for (s, q, n), answer in zip(DISTINCT, answers, strict=True):
        reference = dp_accounting_pld([RoundCharge(s, q, n)], 1e-5)
        assert answer["round_epsilon_cost"] == pytest.approx(reference, abs=1e-6)
        assert answer["projected_epsilon"] == answer["round_epsilon_cost"]
        assert answer["current_epsilon"] == 0.0


async def test_the_loop_answers_while_an_estimate_runs(client, org, federation):
    params = {"federation_id": federation["id"], **HEAVY}
    await client.ok("system.ping", {}, org.token)
    started = time.perf_counter()
    estimate = asyncio.ensure_future(client.ok("federations.privacy.estimate", params, org.token))
    await asyncio.sleep(0.2)  # the estimate is under way in a worker

    probes = []
    for _ in range(10):
        t = time.perf_counter()
        await client.ok("system.ping", {}, org.token)
        probes.append(time.perf_counter() - t)
        await asyncio.sleep(0.02)
    still_running = not estimate.done()
    answer = await estimate
    duration = time.perf_counter() - started

    assert still_running and answer["round_epsilon_cost"] > 0
    assert max(probes) < duration / 10, (probes, duration)


async def test_a_new_rdp_pair_is_priced_in_the_pool_and_then_from_the_cache(
    client, org, federation
):
    pool = client.app[SERVICES].math_pool
    clear_cache()
    params = {"federation_id": federation["id"], "noise_multiplier": 20.0, "sample_rate": 0.5}

    first = await client.ok("federations.privacy.estimate", params, org.token)
    learned = uncached_pairs([(20.0, 0.5)]) == []  # the worker's curve, now in our cache
    again = await client.ok("federations.privacy.estimate", params, org.token)

    assert pool._executor is not None and learned
    assert first == again  # priced inline from the learned curve: the same numbers
    reference = opacus_epsilon([RoundCharge(20.0, 0.5, 1)], 1e-5)
    assert again["round_epsilon_cost"] == pytest.approx(reference, rel=1e-6)


async def test_a_dp_rounds_draw_prices_its_new_pair_in_the_pool(client, org, other_org, mlp_model):
    pool = client.app[SERVICES].math_pool
    fed = await dp_federation(client, org, other_org, mlp_model)
    await devices_of(client, [org, other_org])  # 8 devices, target 6: q = 0.75
    rnd = await client.ok("training.create_round", dp_round_params(mlp_model, fed), org.token)
    clear_cache()

    await client.call("training.select_devices", {"round_id": rnd["id"]}, org.token)

    assert pool._executor is not None  # priced by a worker, not on the event loop
    assert uncached_pairs([(Z, 0.75)]) == []  # and the worker's curve was learned
    state = await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token)
    assert state["rounds_tracked"] == 1
    assert state["current_epsilon_spent"] == pytest.approx(
        dp_accounting_epsilon(Z, 0.75, 1e-5), rel=1e-6
    )


async def test_a_dp_question_prices_the_ledgers_history_in_the_pool(client, org, other_org):
    pool = client.app[SERVICES].math_pool
    fed = await analytics_federation(client, org, other_org)
    await clipped_devices(client, org, 30, np.random.default_rng(1))
    earlier = RoundCharge(1.3, 0.37, 4)  # a training round, charged before a restart
    await charge_round(client.app[SERVICES].db, fed["id"], "rnd_" + "7" * 32, earlier)
    clear_cache()

    got = await client.ok("federations.analytics.descriptive", ask(fed), other_org.token)

    assert pool._executor is not None and uncached_pairs([(1.3, 0.37)]) == []
    z, delta = got["dp"]["noise_multiplier"], got["dp"]["delta"]
    history = [earlier, RoundCharge(z, 1.0, 1)]
    entry = (
        await client.ok("federations.privacy.history", {"federation_id": fed["id"]}, org.token)
    )["items"][-1]
    assert entry["cumulative_epsilon"] == pytest.approx(opacus_epsilon(history, delta), rel=1e-6)


# -- the pool itself -----------------------------------------------------------------------


async def test_a_job_beyond_the_queue_bound_is_refused_at_once_and_retryable():
    pool = MathPool(workers=1, queue=1, time_limit=5.0)
    try:
        await pool.run(time.sleep, 0)  # started: no worker start-up in what follows
        running = asyncio.ensure_future(pool.run(time.sleep, 0.4))
        waiting = asyncio.ensure_future(pool.run(time.sleep, 0.01))
        await asyncio.sleep(0.05)

        with pytest.raises(RateLimited) as refused:
            await pool.run(time.sleep, 0)

        assert refused.value.details["reason"] == "math_pool_busy"
        assert refused.value.details["retry_after"] >= 1
        # The bound is per lane: heavy jobs filling theirs do not refuse quick pricing.
        await pool.run(time.sleep, 0, quick=True)
        await asyncio.gather(running, waiting)
        await pool.run(time.sleep, 0)  # room again
    finally:
        await pool.close()


async def test_one_owner_holds_at_most_its_share_of_the_heavy_lane():
    pool = MathPool(workers=1, queue=7, time_limit=5.0)  # a share of (1 + 7) // 4 = 2
    try:
        await pool.run(time.sleep, 0)  # started: no worker start-up in what follows
        mine = [asyncio.ensure_future(pool.run(time.sleep, 0.3, owner="org_a")) for _ in range(2)]
        await asyncio.sleep(0.05)

        with pytest.raises(RateLimited) as refused:
            await pool.run(time.sleep, 0, owner="org_a")
        assert refused.value.details["reason"] == "math_pool_busy"
        await pool.run(time.sleep, 0, owner="org_b")  # another organization still gets in
        await asyncio.gather(*mine)
        await pool.run(time.sleep, 0, owner="org_a")  # and the share comes back
    finally:
        await pool.close()


async def test_a_quick_job_does_not_wait_behind_heavy_ones():
    pool = MathPool(workers=2, queue=8, time_limit=5.0)
    try:
        await asyncio.gather(pool.run(time.sleep, 0), pool.run(time.sleep, 0))
        heavy = [asyncio.ensure_future(pool.run(time.sleep, 0.5)) for _ in range(3)]
        await asyncio.sleep(0.05)

        started = time.perf_counter()
        await pool.run(time.sleep, 0, quick=True)
        quick_wait = time.perf_counter() - started

        assert quick_wait < 0.25  # heavy jobs hold one of the two workers, not both
        assert sum(h.done() for h in heavy) == 0
        await asyncio.gather(*heavy)
    finally:
        await pool.close()


async def test_a_job_killed_by_another_jobs_time_out_runs_again():
    pool = MathPool(workers=2, queue=8, time_limit=0.6)
    try:
        await asyncio.gather(pool.run(time.sleep, 0), pool.run(time.sleep, 0))
        runaway = asyncio.ensure_future(pool.run(time.sleep, 5))
        await asyncio.sleep(0.3)
        bystander = asyncio.ensure_future(pool.run(time.sleep, 0.5, quick=True))

        with pytest.raises(BadRequest) as refused:
            await runaway
        await bystander  # its worker was killed with the runaway's; it ran again

        assert refused.value.details["reason"] == "too_expensive" and pool.recycled == 1
    finally:
        await pool.close()


async def test_a_closed_pool_refuses_and_a_lazy_one_starts_nothing():
    pool = MathPool()
    await pool.close()

    assert pool._executor is None
    with pytest.raises(Exception, match="shutting down"):
        await pool.run(time.sleep, 0)
