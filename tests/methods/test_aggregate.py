"""training.aggregate: strategies end to end, artifacts that run, atomicity, DP, automation."""

from __future__ import annotations

import asyncio
import io

import aiohttp
import msgspec
import numpy as np
import onnxruntime as ort
import psycopg
import pytest
import safetensors.numpy
import torch
from minio import Minio

from fedrpc.app import SERVICES, create_app
from fedrpc.services.version_artifacts import TEMPLATES
from fedrpc.tasks import aggregate_due_rounds
from tests.conftest import RpcClient, register_device
from tests.kernels.nets import NETS
from tests.methods.conftest import b64, inline, shared_federation


def base_state(net) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def client_state(base: dict[str, np.ndarray], seed: int, fmt: str) -> dict[str, np.ndarray]:
    """A client's trained weights (or delta): the base moved by seeded noise; int buffers unchanged."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in base.items():
        if value.dtype.kind != "f":
            out[name] = value
            continue
        delta = rng.normal(0, 0.1, value.shape).astype(np.float32)
        out[name] = delta if fmt == "delta" else (value + delta).astype(np.float32)
    return out


async def run_round(
    client,
    org,
    model,
    bundle_net,
    *,
    n=3,
    base_version=1,
    seed=100,
    fmt="weights",
    strategy=None,
    samples=None,
    extra=None,
    bystanders=0,
    tokens=None,
) -> tuple[dict, list[dict[str, np.ndarray]], list[int]]:
    """A running round of n selected devices that have all uploaded (bystanders are eligible too).

    ``tokens`` collects the device tokens of the org's earlier rounds: they are eligible again.
    """
    registered = [await register_device(client, org.token) for _ in range(n + bystanders)]
    tokens = {} if tokens is None else tokens
    tokens.update({d["device_id"]: d["token"] for d in registered})
    params = {
        "model_id": model["id"],
        "base_version": base_version,
        "target_device_count": n,
        "min_updates": 1,
        "update_format": fmt,
        **(extra or {}),
    }
    if strategy:
        params["strategy"] = strategy
    rnd = await client.ok("training.create_round", params, org.token)
    selected = (await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token))[
        "selected"
    ]
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    devices = [{"token": tokens[d]} for d in selected]
    base = base_state(bundle_net)
    states, counts = [], samples or [10 * (i + 1) for i in range(n)]
    for i, device in enumerate(devices):
        state = client_state(base, seed=seed + i, fmt=fmt)
        states.append(state)
        await client.ok(
            "training.weights.upload",
            {
                "round_id": rnd["id"],
                "model_id": model["id"],
                "version": base_version,
                "sample_count": counts[i],
                "update_format": fmt,
                "weights": {"data": b64(safetensors.numpy.save(state))},
                "metrics": {"loss": 1.0 + i, "accuracy": 0.5 + 0.1 * i},
            },
            device["token"],
        )
    return rnd, states, counts


async def download(client, token, model_id, version) -> dict[str, bytes]:
    links = await client.ok(
        "models.versions.download", {"model_id": model_id, "version": version}, token
    )
    blobs = {}
    async with aiohttp.ClientSession() as http:
        for link in links["artifacts"]:
            async with http.get(link["url"]) as resp:
                blobs[link["kind"]] = await resp.read()
    return blobs


def reference_fedavg(base, states, counts, fmt) -> dict[str, np.ndarray]:
    """Plain float64 sample-weighted mean, written independently of the kernels."""
    total = float(sum(counts))
    out = {}
    for name, value in base.items():
        if value.dtype.kind != "f":
            out[name] = value
            continue
        mean = (
            sum(s[name].astype(np.float64) * c for s, c in zip(states, counts, strict=True)) / total
        )
        out[name] = (value.astype(np.float64) + mean) if fmt == "delta" else mean
    return out


@pytest.mark.parametrize("fmt", ["weights", "delta"])
async def test_fedavg_matches_a_float64_reference_and_completes_the_round(
    client, org, mlp_model, mlp_bundle, fmt
):
    net, _ = mlp_bundle
    rnd, states, counts = await run_round(client, org, mlp_model, net, fmt=fmt)
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    assert (
        version["version"] == 2
        and version["parent_version"] == 1
        and version["round_id"] == rnd["id"]
        and version["published"] is True
    )
    assert (
        version["strategy"] == "fedavg"
        and version["num_updates"] == 3
        and version["total_samples"] == 60
    )
    expected_loss = sum((1.0 + i) * c for i, c in enumerate(counts)) / sum(counts)
    assert version["metrics"]["loss"] == pytest.approx(expected_loss)
    stored = safetensors.numpy.load(
        (await download(client, org.token, mlp_model["id"], 2))["safetensors"]
    )
    for name, want in reference_fedavg(base_state(net), states, counts, fmt).items():
        np.testing.assert_allclose(stored[name], want, rtol=1e-6, atol=1e-6)
    done = await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert done["state"] == "completed" and done["result_version"] == 2


async def test_new_onnx_runs_like_the_real_network_with_the_new_weights(client, org, convbn_bundle):
    # Three versions: re-exported from an uploaded graph whose BatchNorm is folded, filled into
    # the kept template of that base, and filled into the server's own graph of version 2.
    TEMPLATES.clear()
    net, bundle = convbn_bundle
    model = await client.ok("models.create", {"name": "convbn"}, org.token)
    await client.ok(
        "models.versions.create", {"model_id": model["id"], **inline(bundle)}, org.token
    )
    tokens: dict[str, str] = {}
    for base_version, seed in [(1, 100), (1, 200), (2, 300)]:
        # Every round's devices train from the weights of its base version.
        base_net = NETS["convbn"]().eval()
        base_blobs = await download(client, org.token, model["id"], base_version)
        base_net.load_state_dict(torch.load(io.BytesIO(base_blobs["torch"]), weights_only=True))
        rnd, _, _ = await run_round(
            client, org, model, base_net, base_version=base_version, seed=seed, tokens=tokens
        )
        version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
        blobs = await download(client, org.token, model["id"], version["version"])
        fresh = NETS["convbn"]().eval()
        fresh.load_state_dict(torch.load(io.BytesIO(blobs["torch"]), weights_only=True))
        session = ort.InferenceSession(blobs["onnx"], providers=["CPUExecutionProvider"])
        for batch in (5, 7):
            x = np.random.default_rng(batch).normal(size=(batch, *fresh.input_shape))
            x = x.astype(np.float32)
            want = fresh(torch.from_numpy(x)).detach().numpy()
            got = session.run(None, {session.get_inputs()[0].name: x})[0]
            assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, float(np.max(np.abs(want))))
    assert len(TEMPLATES) == 2  # one per base program: versions 1 and 2


async def test_fedmedian_takes_the_coordinate_median(client, org, mlp_model, mlp_bundle):
    net, _ = mlp_bundle
    rnd, states, _ = await run_round(client, org, mlp_model, net, strategy={"name": "fedmedian"})
    await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    stored = safetensors.numpy.load(
        (await download(client, org.token, mlp_model["id"], 2))["safetensors"]
    )
    for name in ("fc1.weight", "fc2.bias"):
        np.testing.assert_allclose(
            stored[name], np.median(np.stack([s[name] for s in states]), axis=0), rtol=1e-6
        )


async def test_fedavgm_keeps_server_momentum_between_rounds(client, org, mlp_model, mlp_bundle):
    net, _ = mlp_bundle
    strategy = {"name": "fedavgm", "params": {"server_learning_rate": 1.0, "server_momentum": 0.5}}
    rnd, states, counts = await run_round(
        client, org, mlp_model, net, fmt="delta", strategy=strategy
    )
    await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    stored = safetensors.numpy.load(
        (await download(client, org.token, mlp_model["id"], 2))["safetensors"]
    )
    first = reference_fedavg(
        base_state(net), states, counts, "delta"
    )  # momentum starts at the first delta
    np.testing.assert_allclose(stored["fc1.weight"], first["fc1.weight"], rtol=1e-5, atol=1e-6)
    # The momentum is kept with the version it was computed with (its lineage).
    state_strategy = await client.app[SERVICES].db.value(
        "training.aggregate.find_server_state", model_id=mlp_model["id"], version=2
    )
    assert state_strategy == "fedavgm"


async def test_two_concurrent_aggregations_make_one_version(client, org, mlp_model, mlp_bundle):
    rnd, _, _ = await run_round(client, org, mlp_model, mlp_bundle[0])
    answers = await asyncio.gather(
        *(client.call("training.aggregate", {"round_id": rnd["id"]}, org.token) for _ in range(2))
    )
    outcomes = sorted("ok" if "result" in a else a["error"]["data"]["type"] for a in answers)
    assert outcomes in (["conflict", "ok"], ["ok", "precondition_failed"])
    assert (await client.ok("models.versions.list", {"model_id": mlp_model["id"]}, org.token))[
        "total"
    ] == 2


async def test_publish_false_makes_a_draft_no_round_can_start_from_until_published(
    client, org, other_org, mlp_model, mlp_bundle
):
    fed = await shared_federation(client, org, other_org, mlp_model)
    rnd, _, _ = await run_round(client, org, mlp_model, mlp_bundle[0])
    draft = await client.ok(
        "training.aggregate", {"round_id": rnd["id"], "publish": False}, org.token
    )
    assert draft["version"] == 2 and draft["published"] is False
    assert (await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token))[
        "result_version"
    ] == 2
    # The owner reads and downloads the draft.
    got = await client.ok("models.versions.get", {"model_id": mlp_model["id"]}, org.token)
    assert got == draft
    assert "safetensors" in await download(client, org.token, mlp_model["id"], 2)
    new_round = {"model_id": mlp_model["id"], "base_version": 2, "target_device_count": 1}
    error = await client.error("training.create_round", new_round, org.token)
    assert error["data"]["type"] == "precondition_failed"
    assert "draft" in error["data"]["message"] and error["data"]["published"] is False
    # A federation member sees only the published version 1.
    theirs = await client.ok("models.versions.list", {"model_id": mlp_model["id"]}, other_org.token)
    assert theirs["total"] == 1 and [v["version"] for v in theirs["items"]] == [1]
    latest = await client.ok("models.versions.get", {"model_id": mlp_model["id"]}, other_org.token)
    assert latest["version"] == 1
    model_of = {"model_id": mlp_model["id"]}
    assert (await client.ok("models.get", model_of, other_org.token))["latest_version"] == 1
    assert (await client.ok("models.get", model_of, org.token))["latest_version"] == 2
    job = {"job_type": "personalization", "model_id": mlp_model["id"], "base_version": 2}
    member_device = await register_device(client, other_org.token)
    own_device = await register_device(client, org.token)
    error = await client.error("training.device_jobs.create", job, member_device["token"])
    assert error["data"]["type"] == "not_found"
    assert (await client.ok("training.device_jobs.create", job, own_device["token"]))[
        "base_version"
    ] == 2
    for method, params in (
        ("models.versions.get", {"model_id": mlp_model["id"], "version": 2}),
        ("models.versions.download", {"model_id": mlp_model["id"], "version": 2}),
    ):
        assert (await client.error(method, params, other_org.token))["data"]["type"] == "not_found"
    # Members never create rounds on the owner's model, drafts or not.
    member_round = {**new_round, "federation_id": fed["id"]}
    error = await client.error("training.create_round", member_round, other_org.token)
    assert error["data"]["type"] == "forbidden"

    published = await client.ok(
        "models.versions.publish", {"model_id": mlp_model["id"], "version": 2}, org.token
    )
    assert published == {**draft, "published": True}
    assert (await client.ok("training.create_round", new_round, org.token))["base_version"] == 2
    assert (
        await client.ok(
            "models.versions.get", {"model_id": mlp_model["id"], "version": 2}, other_org.token
        )
    )["published"] is True


async def test_publish_must_be_a_boolean(client, org, mlp_model, mlp_bundle):
    rnd, _, _ = await run_round(client, org, mlp_model, mlp_bundle[0], n=1)
    error = await client.error(
        "training.aggregate", {"round_id": rnd["id"], "publish": "yes"}, org.token
    )
    assert error["code"] == -32602 and error["data"]["path"] == "$.publish"
    assert (await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token))[
        "state"
    ] == "running"


@pytest.mark.parametrize("state", ["pending", "cancelled"])
async def test_rounds_that_are_not_running_are_refused(client, org, mlp_model, state):
    await register_device(client, org.token)
    rnd = await client.ok(
        "training.create_round",
        {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 1},
        org.token,
    )
    if state == "cancelled":
        await client.ok("training.cancel_round", {"round_id": rnd["id"]}, org.token)
    error = await client.error("training.aggregate", {"round_id": rnd["id"]}, org.token)
    assert error["data"]["type"] == "precondition_failed"


async def test_zero_updates_is_a_precondition_failure_and_the_round_stays_running(
    client, org, mlp_model
):
    await register_device(client, org.token)
    rnd = await client.ok(
        "training.create_round",
        {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 1},
        org.token,
    )
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    error = await client.error("training.aggregate", {"round_id": rnd["id"]}, org.token)
    assert error["data"]["type"] == "precondition_failed" and error["data"]["received"] == 0
    assert (await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token))[
        "state"
    ] == "running"


async def test_impossible_strategy_parameters_are_refused_and_the_round_stays_retryable(
    client, org, mlp_model, mlp_bundle
):
    rnd, _, _ = await run_round(client, org, mlp_model, mlp_bundle[0])
    error = await client.error(
        "training.aggregate",
        {"round_id": rnd["id"], "strategy": {"name": "bulyan", "params": {"num_malicious": 1}}},
        org.token,
    )
    assert error["data"]["type"] == "bad_request" and "bulyan" in error["data"]["message"].lower()
    error = await client.error(
        "training.aggregate",
        {"round_id": rnd["id"], "strategy": {"name": "krum", "params": {"beta": 0.1}}},
        org.token,
    )
    assert error["data"]["type"] == "bad_request"
    assert (await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token))[
        "version"
    ] == 2


@pytest.mark.parametrize("kept_in", ["row", "s3"])
async def test_a_corrupt_update_in_storage_fails_the_round_and_writes_nothing(
    aiohttp_client, make_org, mlp_bundle, settings, database_url, kept_in
):
    # Small updates are kept in their row by default; with row_update_max_bytes 0, in S3.
    limit = settings.row_update_max_bytes if kept_in == "row" else 0
    client = RpcClient(
        await aiohttp_client(
            create_app(msgspec.structs.replace(settings, row_update_max_bytes=limit))
        )
    )
    org = await make_org()
    mlp_model = await client.ok("models.create", {"name": "mlp"}, org.token)
    await client.ok(
        "models.versions.create", {"model_id": mlp_model["id"], **inline(mlp_bundle[1])}, org.token
    )
    rnd, _, _ = await run_round(client, org, mlp_model, mlp_bundle[0])
    s3 = Minio(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, secure=False)
    before = sorted(
        o.object_name for o in s3.list_objects(settings.s3_bucket, prefix="models/", recursive=True)
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        victim, in_row = conn.execute(
            "SELECT object_key, data IS NOT NULL FROM training_updates WHERE round_id = %s LIMIT 1",
            (rnd["id"],),
        ).fetchone()
        assert in_row == (kept_in == "row")
        if in_row:
            conn.execute(
                "UPDATE training_updates SET data = 'garbage' WHERE object_key = %s", (victim,)
            )
    if not in_row:
        s3.put_object(settings.s3_bucket, victim, io.BytesIO(b"garbage"), 7)
    error = await client.error("training.aggregate", {"round_id": rnd["id"]}, org.token)
    assert (
        error["data"]["type"] == "precondition_failed"
        and "changed in storage" in error["data"]["message"]
    )
    after = sorted(
        o.object_name for o in s3.list_objects(settings.s3_bucket, prefix="models/", recursive=True)
    )
    assert after == before
    assert (await client.ok("models.versions.list", {"model_id": mlp_model["id"]}, org.token))[
        "total"
    ] == 1
    failed = await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert failed["state"] == "failed" and "changed in storage" in failed["failure_reason"]


async def test_only_the_owner_aggregates(client, org, other_org, mlp_model, mlp_bundle):
    rnd, _, _ = await run_round(client, org, mlp_model, mlp_bundle[0])
    error = await client.error("training.aggregate", {"round_id": rnd["id"]}, other_org.token)
    assert error["data"]["type"] == "forbidden"
    device = await register_device(client, org.token)
    assert (await client.error("training.aggregate", {"round_id": rnd["id"]}, device["token"]))[
        "data"
    ]["type"] == "forbidden"


async def _dp_federation(client, org, mlp_model, budget: float) -> dict:
    fed = await client.ok(
        "federations.create",
        {
            "name": "dp",
            "org_id": org.id,
            "min_round_updates": 2,
            "privacy_policy": {"total_epsilon_budget": budget},
        },
        org.token,
    )
    await client.ok(
        "federations.models.share",
        {"federation_id": fed["id"], "model_id": mlp_model["id"]},
        org.token,
    )
    return fed


async def test_a_round_that_would_exceed_the_budget_is_not_drawn(client, org, mlp_model):
    # The charge is made when the devices are drawn: past the budget nothing is drawn.
    fed = await _dp_federation(client, org, mlp_model, 0.01)
    await register_device(client, org.token)
    params = {
        "model_id": mlp_model["id"],
        "base_version": 1,
        "target_device_count": 2,
        "federation_id": fed["id"],
        "differential_privacy": {"noise_multiplier": 0.5, "clipping_norm": 1.0},
    }
    rnd = await client.ok("training.create_round", params, org.token)
    error = await client.error("training.select_devices", {"round_id": rnd["id"]}, org.token)
    assert error["data"]["type"] == "privacy_budget_exhausted"
    shown = await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert shown["state"] == "pending" and shown["selected_devices"] == []
    assert (await client.ok("federations.privacy.get", {"federation_id": fed["id"]}, org.token))[
        "rounds_tracked"
    ] == 0


async def test_rounds_aggregate_by_themselves_when_every_device_uploaded(
    client, org, mlp_model, mlp_bundle
):
    rnd, _, _ = await run_round(
        client, org, mlp_model, mlp_bundle[0], extra={"auto_aggregate": True}
    )
    await aggregate_due_rounds(client.app[SERVICES])
    done = await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert done["state"] == "completed" and done["result_version"] == 2


async def test_auto_rounds_with_too_few_updates_fail_at_the_deadline(
    client, org, mlp_model, database_url
):
    await register_device(client, org.token)
    rnd = await client.ok(
        "training.create_round",
        {
            "model_id": mlp_model["id"],
            "base_version": 1,
            "target_device_count": 1,
            "auto_aggregate": True,
        },
        org.token,
    )
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    await aggregate_due_rounds(client.app[SERVICES])
    assert (await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token))[
        "state"
    ] == "running"
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE training_rounds SET deadline_at = now() - interval '1 second' WHERE id = %s",
            (rnd["id"],),
        )
    await aggregate_due_rounds(client.app[SERVICES])
    failed = await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert failed["state"] == "failed" and "needs 1" in failed["failure_reason"]
