"""A hostile device cannot dominate, break or exhaust an aggregation by what it sends.

Every attack plays through real HTTP against the real server, Postgres and S3:
sample counts above the round's cap, updates whose norm is too large, finite
values that would overflow the float32 accumulator, metric names of the
server's own, and tensor files that would expand to tens of gigabytes.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import psutil
import pytest
import safetensors.numpy
import torch

from tests.conftest import register_device
from tests.methods.test_aggregate import download
from tests.methods.test_weights_upload import (
    bucket_keys,
    run_sql,
    update_state,
    upload_params,
)

MiB = 1 << 20


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def started_round(client, org, model, n: int, **extra) -> tuple[dict, list[dict]]:
    """A running round with n freshly registered devices, all selected."""
    devices = [await register_device(client, org.token) for _ in range(n)]
    params = {
        "model_id": model["id"],
        "base_version": 1,
        "target_device_count": n,
        "min_updates": 1,
        **extra,
    }
    rnd = await client.ok("training.create_round", params, org.token)
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    rnd = await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    return rnd, devices


def base_weights(mlp_bundle) -> dict[str, np.ndarray]:
    return safetensors.numpy.load(mlp_bundle[1]["weights"])


def version_weights(blobs: dict[str, bytes]) -> dict[str, np.ndarray]:
    return safetensors.numpy.load(blobs["safetensors"])


def torch_bomb() -> bytes:
    """fc1.weight as a stride-0 view of one float declaring 4096 x 4096 x 1024 (64 GiB)."""
    buffer = io.BytesIO()
    bomb = torch.zeros(1).expand(4096, 4096, 1024)
    torch.save(
        {
            "fc1.weight": bomb,
            **{k: torch.from_numpy(v) for k, v in update_state(1).items() if k != "fc1.weight"},
        },
        buffer,
    )
    return buffer.getvalue()


def safetensors_header_bomb() -> bytes:
    """A valid-looking safetensors file whose header declares a 64 GiB fc1.weight."""
    import json

    header = {
        "fc1.weight": {"dtype": "F32", "shape": [4096, 4096, 1024], "data_offsets": [0, 64 << 30]}
    }
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * 64


# --- what the offer states ---------------------------------------------------------------


async def test_round_offer_states_the_sample_cap_and_the_norm_bound(client, org, mlp_model):
    capped, [device] = await started_round(
        client, org, mlp_model, 1, max_sample_count=500, max_update_norm=2.5
    )
    default, [other] = await started_round(client, org, mlp_model, 1)

    # The second round picks one of the two devices at random: read both devices' offers.
    offers = {}
    for token in (device["token"], other["token"]):
        for o in (await client.ok("devices.sync", {}, token))["desired_state"]["round_offers"]:
            offers[o["round_id"]] = o
    offer, plain = offers[capped["id"]], offers[default["id"]]
    assert (offer["max_sample_count"], offer["max_update_norm"]) == (500, 2.5)
    assert (plain["max_sample_count"], plain["max_update_norm"]) == (10_000, None)


# --- sample counts -------------------------------------------------------------------------


async def test_sample_count_above_the_rounds_cap_is_refused(client, org, mlp_model, settings):
    rnd, [device] = await started_round(client, org, mlp_model, 1, max_sample_count=500)

    error = await client.error(
        "training.weights.upload", upload_params(rnd, sample_count=501), device["token"]
    )

    assert error["data"]["type"] == "bad_request", error
    assert error["data"]["field"] == "sample_count" and error["data"]["max_sample_count"] == 500
    assert bucket_keys(settings) == []
    accepted = await client.ok(
        "training.weights.upload", upload_params(rnd, sample_count=500), device["token"]
    )
    assert accepted["sample_count"] == 500


async def test_aggregation_weights_no_update_above_the_cap(
    client, org, mlp_model, mlp_bundle, settings
):
    # A row claiming a million samples (stored before the cap existed, or with the cap lowered
    # since) weighs no more than the cap: the mean is the plain mean of the two deltas.
    rnd, devices = await started_round(client, org, mlp_model, 2, max_sample_count=100)
    deltas = [update_state(10), update_state(20)]
    for device, delta in zip(devices, deltas, strict=True):
        await client.ok(
            "training.weights.upload",
            upload_params(rnd, safetensors.numpy.save(delta), sample_count=100),
            device["token"],
        )
    run_sql(
        settings.database_url,
        "UPDATE training_updates SET sample_count = 1000000 WHERE device_id = %s",
        devices[0]["device_id"],
    )

    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)

    assert version["total_samples"] == 200
    got = version_weights(await download(client, org.token, mlp_model["id"], version["version"]))
    for name, base in base_weights(mlp_bundle).items():
        want = base.astype(np.float64) + (deltas[0][name] + deltas[1][name]) / 2.0
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6)


# --- update norms --------------------------------------------------------------------------


async def test_delta_with_a_norm_above_max_update_norm_is_refused(client, org, mlp_model, settings):
    rnd, [device] = await started_round(client, org, mlp_model, 1, max_update_norm=1.0)
    delta = {k: v * 100 for k, v in update_state(1).items()}  # norm about 12
    norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))

    error = await client.error(
        "training.weights.upload",
        upload_params(rnd, safetensors.numpy.save(delta)),
        device["token"],
    )

    assert error["data"]["type"] == "bad_request", error
    assert error["data"]["field"] == "weights" and error["data"]["max_update_norm"] == 1.0
    assert error["data"]["update_norm"] == pytest.approx(norm, rel=1e-6)
    assert bucket_keys(settings) == []
    small = {k: v * 5 for k, v in update_state(1).items()}  # norm about 0.6
    await client.ok(
        "training.weights.upload",
        upload_params(rnd, safetensors.numpy.save(small)),
        device["token"],
    )


async def test_full_weights_are_bounded_by_the_norm_of_their_difference_to_the_base(
    client, org, mlp_model, mlp_bundle
):
    rnd, devices = await started_round(
        client, org, mlp_model, 2, update_format="weights", max_update_norm=1.0
    )
    base = base_weights(mlp_bundle)
    small, large = update_state(1), update_state(2)
    near = {k: v + small[k] * 5 for k, v in base.items()}
    far = {k: v + large[k] * 100 for k, v in base.items()}
    # The full weights' own norm is far above the bound; their delta's is not.
    assert np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in near.values())) > 1.0

    await client.ok(
        "training.weights.upload",
        upload_params(rnd, safetensors.numpy.save(near)),
        devices[0]["token"],
    )
    error = await client.error(
        "training.weights.upload",
        upload_params(rnd, safetensors.numpy.save(far)),
        devices[1]["token"],
    )
    assert error["data"]["type"] == "bad_request" and error["data"]["update_norm"] > 1.0


# --- overflow ------------------------------------------------------------------------------


async def test_finite_values_that_would_overflow_the_sum_are_refused_and_the_round_aggregates(
    client, org, mlp_model, mlp_bundle, settings
):
    rnd, devices = await started_round(client, org, mlp_model, 3)
    huge = {k: np.full_like(v, 3e38) for k, v in update_state(1).items()}
    honest = update_state(7)

    for hostile in devices[:2]:
        error = await client.error(
            "training.weights.upload",
            upload_params(rnd, safetensors.numpy.save(huge)),
            hostile["token"],
        )
        assert error["data"]["type"] == "bad_request", error
    await client.ok(
        "training.weights.upload",
        upload_params(rnd, safetensors.numpy.save(honest)),
        devices[2]["token"],
    )
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)

    assert version["num_updates"] == 1
    got = version_weights(await download(client, org.token, mlp_model["id"], version["version"]))
    for name, base in base_weights(mlp_bundle).items():
        np.testing.assert_allclose(got[name], base + honest[name], rtol=1e-6, atol=1e-6)
    done = await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert done["state"] == "completed"


# --- metrics -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["num_clipped", "noise_std", "dp_noise_std", "DP_Noise_Std", "num_selected"]
)
async def test_device_cannot_report_a_metric_under_a_server_name(
    client, org, mlp_model, settings, name
):
    rnd, [device] = await started_round(client, org, mlp_model, 1)

    error = await client.error(
        "training.weights.upload",
        upload_params(rnd, metrics={"loss": 0.5, name: 0.0}),
        device["token"],
    )

    assert error["data"]["type"] == "bad_request", error
    assert error["data"]["field"] == "metrics" and error["data"]["names"] == [name]
    assert bucket_keys(settings) == []


async def test_server_metric_of_a_version_is_the_servers_even_with_old_client_rows(
    client, org, mlp_model, settings
):
    # Rows stored before the upload check existed may hold server names: they are dropped.
    rnd, devices = await started_round(
        client,
        org,
        mlp_model,
        5,
        strategy={"name": "krum", "params": {"num_malicious": 1}},
    )
    for i, device in enumerate(devices):
        await client.ok(
            "training.weights.upload",
            upload_params(rnd, safetensors.numpy.save(update_state(i)), metrics={"loss": 1.0}),
            device["token"],
        )
    run_sql(
        settings.database_url,
        """UPDATE training_updates SET metrics = metrics || '{"num_selected": 99, "dp_noise_std": 0}'
           WHERE round_id = %s""",
        rnd["id"],
    )

    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)

    assert version["metrics"]["num_selected"] == 1.0 and "dp_noise_std" not in version["metrics"]
    assert version["metrics"]["loss"] == 1.0


def test_every_metric_the_aggregation_kernels_report_is_in_the_servers_namespace():
    from fedrpc.fl.aggregate import aggregate_robust, aggregate_streaming
    from fedrpc.fl.metrics import is_server_metric, version_metrics

    rng = np.random.default_rng(0)
    base = np.zeros(8, np.float32)
    vectors = [rng.normal(size=8).astype(np.float32) for _ in range(6)]
    outcomes = [
        aggregate_streaming(
            "fedavg",
            {},
            base,
            [(v, 1) for v in vectors],
            update_format="delta",
            dp=(1.0, 0.5, 6.0),
            rng=np.random.default_rng(1),
        ),
        *(
            aggregate_robust(
                name, params, base, vectors, [1] * 6, update_format="delta", memory_budget_bytes=MiB
            )
            for name, params in [
                ("krum", {"num_malicious": 1}),
                ("multikrum", {"num_malicious": 1, "num_to_keep": 2}),
                ("fedmedian", {}),
            ]
        ),
    ]
    keys = {k for o in outcomes for k in o.metrics}
    assert keys and all(is_server_metric(k) for k in keys), keys
    merged = version_metrics([({"loss": 1.0, "num_selected": 5.0}, 1)], {"num_selected": 1.0})
    assert merged == {"loss": 1.0, "num_selected": 1.0}


# --- memory --------------------------------------------------------------------------------


def _rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("kind", ["torch_stride0", "safetensors_header"])
async def test_tensor_bomb_upload_is_refused_at_once_without_memory(
    client, org, mlp_model, settings, kind
):
    rnd, [device] = await started_round(client, org, mlp_model, 1)
    data, encoding = (
        (torch_bomb(), "torch")
        if kind == "torch_stride0"
        else (safetensors_header_bomb(), "safetensors")
    )
    assert len(data) < 64 * 1024  # a few KB that declare 64 GiB
    before, started = _rss(), time.perf_counter()

    error = await client.error(
        "training.weights.upload", upload_params(rnd, data, encoding=encoding), device["token"]
    )

    assert time.perf_counter() - started < 1.0
    assert _rss() - before < 200 * MiB
    assert error["data"]["type"] == "bad_request", error
    assert bucket_keys(settings) == []


@pytest.mark.parametrize("kind", ["torch_stride0", "safetensors_header"])
async def test_tensor_bomb_as_personalized_weights_is_refused_without_memory(
    client, org, mlp_model, settings, kind
):
    device = await register_device(client, org.token)
    data, encoding = (
        (torch_bomb(), "torch")
        if kind == "torch_stride0"
        else (safetensors_header_bomb(), "safetensors")
    )
    before, started = _rss(), time.perf_counter()

    error = await client.error(
        "training.personalized.update",
        {
            "model_id": mlp_model["id"],
            "personalization_type": "ditto",
            "weights": {"data": b64(data)},
            "weights_encoding": encoding,
        },
        device["token"],
    )

    assert time.perf_counter() - started < 1.0
    assert _rss() - before < 200 * MiB
    assert error["data"]["type"] == "bad_request", error
    assert bucket_keys(settings, "personalized/") == []
