"""Small device updates kept in their Postgres row (FEDRPC_ROW_UPDATE_MAX_BYTES, migration 0015).

Up to the limit an update is stored in its row and no S3 object is written; above it,
in S3 as before. Either way aggregation reads the same bytes: the new version is the
float64 weighted mean computed here from what the devices sent.
"""

from __future__ import annotations

import msgspec
import numpy as np
import psycopg
import pytest
import safetensors.numpy

from fedrpc.app import create_app
from tests.conftest import RpcClient, register_device
from tests.methods.conftest import inline, upload_delta
from tests.methods.test_aggregate import base_state, download
from tests.methods.test_weights_upload import bucket_keys


def deltas(net, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in base_state(net).items()}


@pytest.mark.parametrize("limit", [65536, 700])
async def test_updates_up_to_the_limit_live_in_rows_and_aggregate_exactly(
    aiohttp_client, make_org, settings, database_url, mlp_bundle, limit
):
    net, files = mlp_bundle
    client = RpcClient(
        await aiohttp_client(
            create_app(msgspec.structs.replace(settings, row_update_max_bytes=limit))
        )
    )
    org = await make_org()
    model = await client.ok("models.create", {"name": "rows"}, org.token)
    await client.ok("models.versions.create", {"model_id": model["id"], **inline(files)}, org.token)
    devices = [await register_device(client, org.token) for _ in range(3)]
    rnd = await client.ok(
        "training.create_round",
        {"model_id": model["id"], "base_version": 1, "target_device_count": 3},
        org.token,
    )
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    sent = [deltas(net, 10 + i) for i in range(3)]
    samples = [5, 10, 20]
    before = set(bucket_keys(settings))
    for device, delta, n in zip(devices, sent, samples, strict=True):
        await upload_delta(client, rnd, device["token"], delta, sample_count=n)

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT size_bytes, data IS NOT NULL FROM training_updates WHERE round_id = %s",
            (rnd["id"],),
        ).fetchall()
    size = len(safetensors.numpy.save(sent[0]))  # 163 float32 and a header: about 900 bytes
    assert all(s == size for s, _ in rows)
    in_rows = size <= limit
    assert all(kept == in_rows for _, kept in rows)
    written = set(bucket_keys(settings)) - before
    assert len(written) == (0 if in_rows else 3)

    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    stored = safetensors.numpy.load(
        (await download(client, org.token, model["id"], version["version"]))["safetensors"]
    )
    for name, value in base_state(net).items():
        mean = sum(d[name].astype(np.float64) * n for d, n in zip(sent, samples, strict=True))
        want = value.astype(np.float64) + mean / sum(samples)
        assert np.max(np.abs(stored[name] - want)) < 1e-6, name
