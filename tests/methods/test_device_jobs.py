"""training.device_jobs.*: open, report and complete jobs, through real HTTP against Postgres and S3."""

from __future__ import annotations

import hashlib

import psycopg
import pytest
import safetensors.numpy

from tests.conftest import register_device
from tests.methods.conftest import b64

JOB_UNKNOWN = "job_" + "5" * 32
ROUND_UNKNOWN = "rnd_" + "6" * 32
MODEL_UNKNOWN = "mdl_" + "7" * 32


async def selected_round(client, org, model, *, start: bool = True) -> tuple[dict, dict]:
    """A round of `model` version 1 with exactly one selected device (running unless start=False)."""
    device = await register_device(client, org.token)
    rnd = await client.ok(
        "training.create_round",
        {"model_id": model["id"], "base_version": 1, "target_device_count": 1},
        org.token,
    )
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    if start:
        await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    return rnd, device


def federated(rnd: dict, **extra) -> dict:
    return {
        "job_type": "federated",
        "round_id": rnd["id"],
        "model_id": rnd["model_id"],
        "base_version": 1,
        **extra,
    }


async def job_in(client, token: str, job_id: str, path: list[str]) -> dict:
    """Walk a job through the given states with update_status; returns the last answer."""
    job = {}
    for state in path:
        job = await client.ok(
            "training.device_jobs.update_status", {"job_id": job_id, "state": state}, token
        )
    return job


def job_rows(settings) -> list[tuple]:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute("SELECT id, state FROM device_jobs ORDER BY created_at").fetchall()


def assert_invalid(error: dict, path: str) -> None:
    assert error["code"] == -32602 and error["data"]["type"] == "bad_request", error
    assert error["data"]["path"] == path, error


# --- create ---------------------------------------------------------------------------------------------------


async def test_a_selected_device_opens_a_queued_federated_job(client, org, mlp_model):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    assert job["id"].startswith("job_") and len(job["id"]) == 36
    assert (job["state"], job["job_type"], job["round_id"]) == ("queued", "federated", rnd["id"])
    assert (job["device_id"], job["model_id"], job["base_version"]) == (
        device["device_id"],
        mlp_model["id"],
        1,
    )
    assert job["progress"] == {} and job["metrics"] is None and job["completed_at"] is None
    assert job["last_error"] is None and job["adapter_key"] is None


async def test_a_job_may_be_opened_while_the_round_is_selected_but_not_started(
    client, org, mlp_model
):
    rnd, device = await selected_round(client, org, mlp_model, start=False)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    assert job["state"] == "queued"


async def test_a_personalization_job_needs_a_readable_model_and_an_existing_version(
    client, org, other_org, mlp_model
):
    device = await register_device(client, org.token)
    params = {"job_type": "personalization", "model_id": mlp_model["id"], "base_version": 1}
    job = await client.ok("training.device_jobs.create", params, device["token"])
    assert (
        job["round_id"] is None
        and job["job_type"] == "personalization"
        and job["state"] == "queued"
    )
    missing_version = await client.error(
        "training.device_jobs.create", {**params, "base_version": 2}, device["token"]
    )
    assert missing_version["data"]["type"] == "not_found"
    unknown = await client.error(
        "training.device_jobs.create", {**params, "model_id": MODEL_UNKNOWN}, device["token"]
    )
    assert unknown["data"]["type"] == "not_found"
    stranger = await register_device(client, other_org.token)
    foreign = await client.error("training.device_jobs.create", params, stranger["token"])
    assert foreign["data"]["type"] == "forbidden"


async def test_federated_job_refusals_write_nothing(client, org, mlp_model, settings):
    rnd, device = await selected_round(client, org, mlp_model)
    bystander = await register_device(client, org.token)
    error = await client.error("training.device_jobs.create", federated(rnd), bystander["token"])
    assert error["data"]["type"] == "forbidden"
    error = await client.error(
        "training.device_jobs.create", federated(rnd, base_version=2), device["token"]
    )
    assert error["data"]["type"] == "bad_request" and error["data"]["base_version"] == 1
    error = await client.error(
        "training.device_jobs.create", federated(rnd, round_id=ROUND_UNKNOWN), device["token"]
    )
    assert error["data"]["type"] == "not_found"
    await client.ok("training.cancel_round", {"round_id": rnd["id"]}, org.token)
    error = await client.error("training.device_jobs.create", federated(rnd), device["token"])
    assert error["data"]["type"] == "precondition_failed" and error["data"]["state"] == "cancelled"
    assert job_rows(settings) == []


async def test_one_live_job_per_round_and_device_but_a_retry_after_failure(
    client, org, mlp_model, settings
):
    rnd, device = await selected_round(client, org, mlp_model)
    first = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    error = await client.error("training.device_jobs.create", federated(rnd), device["token"])
    assert error["data"]["type"] == "conflict"
    await job_in(client, device["token"], first["id"], ["failed"])
    second = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    assert second["id"] != first["id"]
    assert job_rows(settings) == [(first["id"], "failed"), (second["id"], "queued")]


async def test_create_replays_with_the_same_idempotency_key(client, org, mlp_model, settings):
    rnd, device = await selected_round(client, org, mlp_model)
    params = federated(rnd, idempotency_key="open-1")
    first = await client.ok("training.device_jobs.create", params, device["token"])
    again = await client.ok("training.device_jobs.create", params, device["token"])
    assert again == first
    other = {
        "job_type": "personalization",
        "model_id": mlp_model["id"],
        "base_version": 1,
        "idempotency_key": "open-1",
    }
    assert (await client.error("training.device_jobs.create", other, device["token"]))["data"][
        "type"
    ] == "conflict"
    assert len(job_rows(settings)) == 1


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"job_type": None}, "$"),
        ({"job_type": "distillation"}, "$.job_type"),
        ({"base_version": "1"}, "$.base_version"),
        ({"base_version": 0}, "$.base_version"),
        ({"model_id": "mdl_nothex"}, "$.model_id"),
        ({"colour": "blue"}, "$"),
        ({"round_id": None}, "$"),
    ],
)
async def test_create_validates_params(client, org, mlp_model, change, path):
    rnd, device = await selected_round(client, org, mlp_model, start=False)
    params = {k: v for k, v in {**federated(rnd), **change}.items() if v is not None}
    assert_invalid(await client.error("training.device_jobs.create", params, device["token"]), path)


async def test_a_personalization_job_may_not_name_a_round(client, org, mlp_model):
    rnd, device = await selected_round(client, org, mlp_model, start=False)
    params = {
        "job_type": "personalization",
        "round_id": rnd["id"],
        "model_id": mlp_model["id"],
        "base_version": 1,
    }
    assert_invalid(await client.error("training.device_jobs.create", params, device["token"]), "$")


# --- authorization ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        "training.device_jobs.create",
        "training.device_jobs.update_status",
        "training.device_jobs.complete",
    ],
)
async def test_device_job_methods_need_a_device_token(client, org, method):
    resp, body = await client.post(
        {"jsonrpc": "2.0", "method": method, "params": {"job_id": JOB_UNKNOWN}, "id": 1}
    )
    assert resp.status == 401 and body["error"]["data"]["type"] == "unauthorized"
    error = await client.error(method, {"job_id": JOB_UNKNOWN, "state": "failed"}, org.token)
    assert error["data"]["type"] == "forbidden"


async def test_another_devices_job_is_forbidden_and_unknown_jobs_are_not_found(
    client, org, other_org, mlp_model
):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    for owner in (org, other_org):
        intruder = await register_device(client, owner.token)
        error = await client.error(
            "training.device_jobs.update_status",
            {"job_id": job["id"], "state": "failed"},
            intruder["token"],
        )
        assert error["data"]["type"] == "forbidden"
        error = await client.error(
            "training.device_jobs.complete", {"job_id": job["id"]}, intruder["token"]
        )
        assert error["data"]["type"] == "forbidden"
    for method, params in [
        ("training.device_jobs.update_status", {"job_id": JOB_UNKNOWN, "state": "training"}),
        ("training.device_jobs.complete", {"job_id": JOB_UNKNOWN}),
    ]:
        assert (await client.error(method, params, device["token"]))["data"]["type"] == "not_found"
    assert (await job_in(client, device["token"], job["id"], ["queued"]))["state"] == "queued"


# --- update_status and complete --------------------------------------------------------------------------------


async def test_a_job_walks_the_whole_path_with_progress_and_metrics(client, org, mlp_model):
    rnd, device = await selected_round(client, org, mlp_model)
    token = device["token"]
    job = await client.ok("training.device_jobs.create", federated(rnd), token)
    await job_in(client, token, job["id"], ["downloading", "training"])
    progress = {"epoch": 1, "total_epochs": 3, "samples_processed": 640, "loss": 0.75}
    reported = await client.ok(
        "training.device_jobs.update_status",
        {"job_id": job["id"], "state": "training", "progress": progress},
        token,
    )
    assert reported["state"] == "training" and reported["progress"] == progress
    assert isinstance(reported["progress"]["epoch"], int)
    later = {**progress, "epoch": 2, "samples_processed": 1280, "loss": 0.5}
    reported = await client.ok(
        "training.device_jobs.update_status",
        {"job_id": job["id"], "state": "training", "progress": later},
        token,
    )
    assert reported["progress"] == later
    kept = await client.ok(
        "training.device_jobs.update_status", {"job_id": job["id"], "state": "uploading"}, token
    )
    assert kept["progress"] == later and kept["completed_at"] is None
    metrics = {"loss": 0.25, "accuracy": 0.875, "num_examples": 1920}
    done = await client.ok(
        "training.device_jobs.complete", {"job_id": job["id"], "metrics": metrics}, token
    )
    assert (
        done["state"] == "completed"
        and done["metrics"] == metrics
        and done["completed_at"] is not None
    )
    assert done["created_at"] <= done["updated_at"]


@pytest.mark.parametrize(
    ("path", "target", "stuck_in", "allowed"),
    [
        ([], "training", "queued", ["downloading", "training"]),
        ([], "uploading", "queued", ["training", "uploading"]),
        (["downloading"], "queued", "downloading", ["queued"]),
        (["downloading", "training"], "downloading", "training", ["queued", "downloading"]),
        (
            ["downloading", "training", "uploading"],
            "training",
            "uploading",
            ["downloading", "training"],
        ),
        (["failed"], "downloading", "failed", ["queued", "downloading"]),
        (["failed"], "failed", "failed", ["queued", "downloading", "training", "uploading"]),
    ],
)
async def test_out_of_order_moves_are_refused_with_the_current_state(
    client, org, mlp_model, path, target, stuck_in, allowed
):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    await job_in(client, device["token"], job["id"], path)
    error = await client.error(
        "training.device_jobs.update_status",
        {"job_id": job["id"], "state": target},
        device["token"],
    )
    assert error["data"]["type"] == "precondition_failed"
    assert error["data"]["state"] == stuck_in and error["data"]["allowed"] == allowed


@pytest.mark.parametrize("path", [[], ["downloading"], ["downloading", "training"]])
async def test_complete_needs_an_uploading_job(client, org, mlp_model, path):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    before = await job_in(client, device["token"], job["id"], path) if path else job
    error = await client.error(
        "training.device_jobs.complete", {"job_id": job["id"]}, device["token"]
    )
    assert error["data"]["type"] == "precondition_failed"
    assert error["data"]["state"] == before["state"] and error["data"]["allowed"] == ["uploading"]


@pytest.mark.parametrize(
    "path",
    [[], ["downloading"], ["downloading", "training"], ["downloading", "training", "uploading"]],
)
async def test_any_unfinished_job_may_fail_with_its_error(client, org, mlp_model, path):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    await job_in(client, device["token"], job["id"], path)
    failed = await client.ok(
        "training.device_jobs.update_status",
        {"job_id": job["id"], "state": "failed", "last_error": "out of memory"},
        device["token"],
    )
    assert failed["state"] == "failed" and failed["last_error"] == "out of memory"
    error = await client.error(
        "training.device_jobs.complete", {"job_id": job["id"]}, device["token"]
    )
    assert error["data"]["state"] == "failed"


async def test_completed_is_reached_only_through_complete(client, org, mlp_model):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    await job_in(client, device["token"], job["id"], ["downloading", "training", "uploading"])
    error = await client.error(
        "training.device_jobs.update_status",
        {"job_id": job["id"], "state": "completed"},
        device["token"],
    )
    assert error["data"]["type"] == "bad_request" and error["data"]["field"] == "state"


async def test_completing_twice_is_refused_unless_it_is_a_replay(client, org, mlp_model, settings):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    await job_in(client, device["token"], job["id"], ["downloading", "training", "uploading"])
    params = {"job_id": job["id"], "metrics": {"loss": 0.5}, "idempotency_key": "done-1"}
    first = await client.ok("training.device_jobs.complete", params, device["token"])
    assert await client.ok("training.device_jobs.complete", params, device["token"]) == first
    again = await client.error(
        "training.device_jobs.complete", {**params, "idempotency_key": "done-2"}, device["token"]
    )
    assert again["data"]["type"] == "precondition_failed" and again["data"]["state"] == "completed"
    changed = await client.error(
        "training.device_jobs.complete", {**params, "metrics": {"loss": 0.4}}, device["token"]
    )
    assert changed["data"]["type"] == "conflict"
    error = await client.error(
        "training.device_jobs.update_status",
        {"job_id": job["id"], "state": "failed"},
        device["token"],
    )
    assert error["data"]["state"] == "completed"
    assert job_rows(settings) == [(job["id"], "completed")]


async def test_a_cancelled_round_tells_the_device_to_stop_and_lets_it_fail_the_job(
    client, org, mlp_model
):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    await job_in(client, device["token"], job["id"], ["downloading", "training"])
    await client.ok("training.cancel_round", {"round_id": rnd["id"]}, org.token)
    for method, params in [
        ("training.device_jobs.update_status", {"job_id": job["id"], "state": "training"}),
        ("training.device_jobs.update_status", {"job_id": job["id"], "state": "uploading"}),
    ]:
        error = await client.error(method, params, device["token"])
        assert error["data"]["type"] == "precondition_failed" and error["data"]["stop"] is True
        assert error["data"]["state"] == "training" and error["data"]["round_state"] == "cancelled"
    failed = await client.ok(
        "training.device_jobs.update_status",
        {"job_id": job["id"], "state": "failed", "last_error": "round cancelled"},
        device["token"],
    )
    assert failed["state"] == "failed"


async def test_a_cancelled_round_refuses_completion(client, org, mlp_model):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    await job_in(client, device["token"], job["id"], ["downloading", "training", "uploading"])
    await client.ok("training.cancel_round", {"round_id": rnd["id"]}, org.token)
    error = await client.error(
        "training.device_jobs.complete", {"job_id": job["id"]}, device["token"]
    )
    assert error["data"]["stop"] is True and error["data"]["round_state"] == "cancelled"
    assert error["data"]["state"] == "uploading"


async def test_update_status_replays_with_the_same_idempotency_key(client, org, mlp_model):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    params = {"job_id": job["id"], "state": "downloading", "idempotency_key": "dl"}
    first = await client.ok("training.device_jobs.update_status", params, device["token"])
    await job_in(client, device["token"], job["id"], ["training"])
    # The replay answers with the first result; it does not move the job back.
    assert await client.ok("training.device_jobs.update_status", params, device["token"]) == first
    assert (await job_in(client, device["token"], job["id"], ["training"]))["state"] == "training"


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ('{"job_id":"%s","state":"training","progress":{"loss":1e999}}', "$.progress[...]"),
        ('{"job_id":"%s","state":"training","progress":{"loss":1e13}}', "$.progress[...]"),
        ('{"job_id":"%s","state":"training","progress":{"loss":"low"}}', "$.progress[...]"),
        ('{"job_id":"%s","state":"resting"}', "$.state"),
        ('{"job_id":"%s"}', "$"),
        ('{"job_id":"%s","state":"training","eta":5}', "$"),
        ('{"job_id":"%s","state":"failed","last_error":""}', "$.last_error"),
        ('{"job_id":"job_123","state":"failed"}', "$.job_id"),
    ],
)
async def test_update_status_validates_params(client, org, mlp_model, body, path):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    raw = b'{"jsonrpc":"2.0","method":"training.device_jobs.update_status","id":1,"params":' + (
        body.replace("%s", job["id"]).encode() + b"}"
    )
    _, answer = await client.post(raw, device["token"], raw=True)
    assert_invalid(answer["error"], path)


async def test_a_malformed_progress_key_is_invalid_params(client, org, mlp_model):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    error = await client.error(
        "training.device_jobs.update_status",
        {"job_id": job["id"], "state": "queued", "progress": {"bad key!": 1}},
        device["token"],
    )
    # msgspec words a bad dict key as "at `key` in `$.progress`": the path is the map's.
    assert error["code"] == -32602 and error["data"]["type"] == "bad_request"
    assert error["data"]["path"] == "$.progress"


async def test_oversized_progress_metrics_and_errors_are_invalid_params(client, org, mlp_model):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    many = {f"m{i}": i for i in range(33)}
    cases = [
        ("training.device_jobs.update_status", {"state": "queued", "progress": many}, "$.progress"),
        (
            "training.device_jobs.update_status",
            {"state": "failed", "last_error": "x" * 2001},
            "$.last_error",
        ),
        ("training.device_jobs.complete", {"metrics": many}, "$.metrics"),
        ("training.device_jobs.complete", {"metrics": {"loss": -1e13}}, "$.metrics[...]"),
    ]
    for method, params, path in cases:
        assert_invalid(
            await client.error(method, {"job_id": job["id"], **params}, device["token"]), path
        )
    assert (await job_in(client, device["token"], job["id"], ["queued"]))["progress"] == {}


async def test_a_nan_literal_is_a_parse_error(client, org, mlp_model):
    rnd, device = await selected_round(client, org, mlp_model)
    job = await client.ok("training.device_jobs.create", federated(rnd), device["token"])
    params = '{"job_id":"JOB","state":"queued","progress":{"loss":NaN}}'.replace("JOB", job["id"])
    raw = (
        '{"jsonrpc":"2.0","method":"training.device_jobs.update_status","id":1,"params":'
        + params
        + "}"
    ).encode()
    _, answer = await client.post(raw, device["token"], raw=True)
    assert answer["error"]["code"] == -32700 and answer["error"]["data"]["type"] == "bad_request"


# --- adapters ------------------------------------------------------------------------------------------------


async def personal_weights(client, token: str, model_id: str, weights: bytes) -> dict:
    return (
        await client.ok(
            "training.personalized.update",
            {
                "model_id": model_id,
                "personalization_type": "local_finetune",
                "weights": {"data": b64(weights)},
            },
            token,
        )
    )["state"]


async def uploading_personalization_job(client, token: str, model_id: str) -> dict:
    job = await client.ok(
        "training.device_jobs.create",
        {"job_type": "personalization", "model_id": model_id, "base_version": 1},
        token,
    )
    return await job_in(client, token, job["id"], ["downloading", "training", "uploading"])


async def test_complete_records_an_adapter_the_device_stored(client, org, mlp_model, mlp_bundle):
    device = await register_device(client, org.token)
    state = await personal_weights(
        client, device["token"], mlp_model["id"], mlp_bundle[1]["weights"]
    )
    job = await uploading_personalization_job(client, device["token"], mlp_model["id"])
    done = await client.ok(
        "training.device_jobs.complete",
        {"job_id": job["id"], "adapter_key": state["weights_key"]},
        device["token"],
    )
    stored = safetensors.numpy.save(safetensors.numpy.load(mlp_bundle[1]["weights"]))
    assert done["adapter_key"] == state["weights_key"]
    assert done["adapter_sha256"] == state["weights_sha256"] == hashlib.sha256(stored).hexdigest()


async def test_complete_refuses_adapters_of_other_devices_and_wrong_digests(
    client, org, mlp_model, mlp_bundle, settings
):
    device = await register_device(client, org.token)
    other = await register_device(client, org.token)
    theirs = await personal_weights(
        client, other["token"], mlp_model["id"], mlp_bundle[1]["weights"]
    )
    mine = await personal_weights(
        client, device["token"], mlp_model["id"], mlp_bundle[1]["weights"]
    )
    job = await uploading_personalization_job(client, device["token"], mlp_model["id"])
    cases = [
        ({"adapter_key": theirs["weights_key"]}, "forbidden"),
        ({"adapter_key": "models/" + mlp_model["id"] + "/weights.safetensors"}, "forbidden"),
        ({"adapter_key": mine["weights_key"], "adapter_sha256": "0" * 64}, "bad_request"),
    ]
    for extra, kind in cases:
        error = await client.error(
            "training.device_jobs.complete", {"job_id": job["id"], **extra}, device["token"]
        )
        assert error["data"]["type"] == kind and error["data"]["field"].startswith("adapter")
    assert_invalid(
        await client.error(
            "training.device_jobs.complete",
            {"job_id": job["id"], "adapter_sha256": "0" * 64},
            device["token"],
        ),
        "$",
    )
    assert job_rows(settings)[-1] == (job["id"], "uploading")
