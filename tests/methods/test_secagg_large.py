"""SecAgg+ at the size issue 11 names: 20 devices x 100,806 parameters over real HTTP.

Dropouts at every stage and in combinations, half of the devices sending their
masked vector through a presigned upload; the result must equal the float64
weighted mean of the survivors' clipped updates within one quantization step
(the bound of stochastic rounding, computed in test_secagg.BOUND), and the
version training.aggregate publishes must match it.
"""

from __future__ import annotations

import pytest

from tests.methods.test_secagg import aggregate_and_check, run_session, secure_round

N = 20
T = 10


@pytest.mark.parametrize(
    "drop",
    [
        pytest.param({0: {1}, 1: {2}, 2: {3}, 3: {4}}, id="one-at-every-stage"),
        # Flower's SecAgg+ gives up when a device drops before stage 1 closes.
        pytest.param({0: {1, 5}, 1: {2, 6}}, id="before-stage-1-closes"),
        pytest.param({2: {3, 7, 11}, 3: {4, 8, 12}}, id="after-masking-and-silent-at-unmask"),
    ],
)
async def test_twenty_devices_with_100k_parameters_get_the_survivors_weighted_mean(
    client, org, wide_model, wide_bundle, database_url, drop
):
    net, _ = wide_bundle
    c = await secure_round(client, org, wide_model, net, n=N, t=T)
    c.extra["upload"] = set(range(0, N, 2))

    survivors, answers = await run_session(client, database_url, c, drop)

    gone = drop.get(0, set()) | drop.get(1, set()) | drop.get(2, set())
    assert sorted(survivors) == sorted(set(range(N)) - gone)
    assert c.devices[0].config["dimension"] == 100_806
    assert answers[max(answers)]["status"] == "completed"
    status = await client.ok("training.secagg.status", {"round_id": c.rnd["id"]}, org.token)
    assert status["survivors_count"] == len(survivors)
    # Dropped: devices that set up keys and then missed a stage (stage-0 no-shows never joined).
    assert status["counts"]["setup"] == N - len(drop.get(0, set()))
    assert status["dropped_count"] == len(gone - drop.get(0, set()))
    await aggregate_and_check(client, org, wide_model, net, c, survivors)
