"""training.secagg.*: N device clients run SecAgg+ through the real server over HTTP.

The result must equal the float64 weighted mean of the survivors' updates within the
quantization bound (computed here: stochastic rounding moves a value by less than one
step 2c / L), with dropouts at every stage; then training.aggregate publishes it.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from hashlib import sha256

import aiohttp
import numpy as np
import psycopg
import pytest
import safetensors.numpy

from fedrpc.app import SERVICES, create_app
from fedrpc.client.secagg import SecAggDevice
from fedrpc.fl import InvalidInput
from fedrpc.tasks import aggregate_due_rounds
from tests.conftest import RpcClient, register_device
from tests.methods.conftest import shared_federation
from tests.methods.test_aggregate import base_state, download

N = 6
T = 3
CLIP = 1.0
QBITS = 16


def sql(database_url: str, statement: str, *args) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(statement, args or None)


def expire_stage(database_url: str, round_id: str) -> None:
    """The current stage's deadline passes (the database clock decides, as in production)."""
    sql(
        database_url,
        "UPDATE secagg_sessions SET stage_deadline = now() - interval '1 second' "
        "WHERE round_id = %s",
        round_id,
    )


@dataclass
class Cohort:
    rnd: dict
    tokens: list[str]  # selected devices' tokens
    ids: list[str]
    devices: list[SecAggDevice]
    deltas: list[dict[str, np.ndarray]]
    samples: list[int]
    extra: dict = field(default_factory=dict)


def make_delta(base: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in base.items()}


async def secure_round(
    client,
    org,
    model,
    net,
    n: int = N,
    t: int | None = T,
    federation_id: str | None = None,
    known: dict[str, str] | None = None,
    round_params: dict | None = None,
    **secagg,
) -> Cohort:
    """A started secure round of n selected devices (``known``: tokens of the org's devices
    from earlier rounds, which are eligible again)."""
    registered = [await register_device(client, org.token) for _ in range(n)]
    by_id = {} if known is None else known
    by_id.update({d["device_id"]: d["token"] for d in registered})
    params = {
        "model_id": model["id"],
        "base_version": 1,
        "target_device_count": n,
        "update_format": "delta",
        "secure_aggregation": {
            **({} if t is None else {"threshold": t}),
            "stage_seconds": 600,
            **secagg,
        },
    }
    if federation_id:
        params |= {"federation_id": federation_id, "min_updates": 2}
    params |= round_params or {}
    rnd = await client.ok("training.create_round", params, org.token)
    selected = (await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token))[
        "selected"
    ]
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    base = base_state(net)
    deltas = [make_delta(base, 1000 + i) for i in range(n)]
    samples = [5 * (i + 1) for i in range(n)]
    devices = [SecAggDevice(deltas[i], samples[i]) for i in range(n)]
    return Cohort(rnd, [by_id[d] for d in selected], selected, devices, deltas, samples)


async def run_stage(client, database_url, c, method, live, params_of, read) -> dict[int, dict]:
    """Every live device calls ``method``; if the stage has not closed, its deadline passes
    and each replays (devices poll so); returns the last answers."""
    answers = {i: await client.ok(method, params_of(i), c.tokens[i]) for i in live}
    if not all(read(i, answers[i]) for i in live):
        # The early callers poll: the last call may have closed the stage.
        answers = {i: await client.ok(method, params_of(i), c.tokens[i]) for i in live}
    if not all(read(i, answers[i]) for i in live):
        expire_stage(database_url, c.rnd["id"])
        answers = {i: await client.ok(method, params_of(i), c.tokens[i]) for i in live}
        assert all(read(i, answers[i]) for i in live), answers
    return answers


async def upload_vector(client, token: str, data: bytes) -> str:
    """A device's masked vector sent through a presigned PUT; its upload id."""
    upload = await client.ok(
        "uploads.create",
        {"purpose": "secagg_vector", "size_bytes": len(data), "sha256": sha256(data).hexdigest()},
        token,
    )
    async with aiohttp.ClientSession() as http, http.put(upload["url"], data=data) as resp:
        assert resp.status == 200, await resp.text()
    return upload["upload_id"]


async def through_stage_one(client, database_url, c: Cohort) -> None:
    """Every device sets up its keys and hands in its bundles (stages 0 and 1 closed)."""
    rid, everyone = c.rnd["id"], range(len(c.devices))
    for method, params, read in (
        ("training.secagg.setup", lambda i: c.devices[i].setup_params(rid), "read_setup"),
        ("training.secagg.share_keys", lambda i: c.devices[i].share_keys_params(), "read_share_keys"),
    ):  # fmt: skip
        await run_stage(
            client, database_url, c, method, everyone, params,
            lambda i, a, read=read: getattr(c.devices[i], read)(a),
        )  # fmt: skip


async def run_session(client, database_url, c: Cohort, drop: dict[int, set[int]] | None = None):
    """Run all four stages; ``drop[stage]`` are the devices that stop before that stage's call.
    Returns the positions of the survivors (whose masked vectors count) and the last answers."""
    drop = drop or {}
    live = [i for i in range(len(c.devices)) if i not in drop.get(0, set())]
    rid = c.rnd["id"]
    await run_stage(
        client,
        database_url,
        c,
        "training.secagg.setup",
        live,
        lambda i: c.devices[i].setup_params(rid),
        lambda i, a: c.devices[i].read_setup(a),
    )
    live = [i for i in live if i not in drop.get(1, set())]
    tamper = c.extra.get("tamper")

    def share_params(i):
        p = c.devices[i].share_keys_params()
        if tamper and tamper[0] == i:
            for item in p["ciphertexts"]:
                if item["receiver"] == c.devices[tamper[1]].index:
                    raw = bytearray(base64.b64decode(item["bundle"]))
                    raw[40] ^= 1
                    item["bundle"] = base64.b64encode(bytes(raw)).decode()
        return p

    await run_stage(
        client,
        database_url,
        c,
        "training.secagg.share_keys",
        live,
        share_params,
        lambda i, a: c.devices[i].read_share_keys(a),
    )
    live = [i for i in live if i not in drop.get(2, set())]
    uploads = {
        i: await upload_vector(client, c.tokens[i], c.devices[i].masked_vector_bytes())
        for i in live
        if i in c.extra.get("upload", ())
    }
    await run_stage(
        client,
        database_url,
        c,
        "training.secagg.masked_vectors",
        live,
        lambda i: c.devices[i].masked_vectors_params(uploads.get(i)),
        lambda i, a: c.devices[i].read_masked_vectors(a),
    )
    survivors = list(live)
    answers = {}
    for i in [i for i in live if i not in drop.get(3, set())]:
        answers[i] = await client.ok(
            "training.secagg.unmask", c.devices[i].unmask_params(), c.tokens[i]
        )
    return survivors, answers


def expected_mean(c: Cohort, survivors: list[int], name: str) -> np.ndarray:
    """Float64 weighted mean of the survivors' clipped updates, independent of the kernels."""
    weights = [float(c.samples[i]) for i in survivors]
    total = sum(
        np.clip(c.deltas[i][name].astype(np.float64), -CLIP, CLIP) * w
        for i, w in zip(survivors, weights, strict=True)
    )
    return total / sum(weights)


BOUND = 2 * CLIP / (2**QBITS - 1) + 1e-6  # one quantization step, plus float32 storage


async def aggregate_and_check(client, org, model, net, c: Cohort, survivors: list[int]) -> None:
    version = await client.ok("training.aggregate", {"round_id": c.rnd["id"]}, org.token)
    assert version["num_updates"] == len(survivors)
    assert version["total_samples"] == sum(c.samples[i] for i in survivors)
    stored = safetensors.numpy.load(
        (await download(client, org.token, model["id"], version["version"]))["safetensors"]
    )
    for name, value in base_state(net).items():
        want = value.astype(np.float64) + expected_mean(c, survivors, name)
        assert np.max(np.abs(stored[name] - want)) <= BOUND, name


@pytest.mark.parametrize("drop_stage", [None, 0, 1, 2, 3])
async def test_session_result_is_the_survivors_weighted_mean(
    client, org, mlp_model, mlp_bundle, database_url, drop_stage
):
    net, _ = mlp_bundle
    c = await secure_round(client, org, mlp_model, net)
    drop = {} if drop_stage is None else {drop_stage: {1}}

    survivors, answers = await run_session(client, database_url, c, drop)

    if drop_stage is not None and drop_stage < 3:
        assert 1 not in survivors
    if drop_stage == 3:
        assert 1 in survivors and 1 not in answers
    last = answers[max(answers)]
    assert last["status"] == "completed" and last["threshold"] == T, last
    status = await client.ok("training.secagg.status", {"round_id": c.rnd["id"]}, org.token)
    assert status["stage"] == "completed" and status["survivors_count"] == len(survivors)
    assert sorted(status["survivors"]) == sorted(c.ids[i] for i in survivors)
    assert status["total_weight"] == sum(c.samples[i] for i in survivors)
    await aggregate_and_check(client, org, mlp_model, net, c, survivors)


async def test_a_tampered_bundle_is_discarded_by_its_receiver_and_the_session_completes(
    client, org, mlp_model, mlp_bundle, database_url
):
    net, _ = mlp_bundle
    c = await secure_round(client, org, mlp_model, net)
    c.extra["tamper"] = (0, 2)

    survivors, answers = await run_session(client, database_url, c)

    assert c.devices[2].rejected == [c.devices[0].index]
    assert c.devices[0].index not in c.devices[2].held
    assert answers[max(answers)]["status"] == "completed"
    await aggregate_and_check(client, org, mlp_model, net, c, survivors)


async def test_refusals_carry_stable_types(client, org, mlp_model, mlp_bundle, database_url):
    net, _ = mlp_bundle
    c = await secure_round(client, org, mlp_model, net)
    rid = c.rnd["id"]
    outsider = await register_device(client, org.token)
    d0 = c.devices[0]

    err = await client.error("training.secagg.setup", d0.setup_params(rid), outsider["token"])
    assert err["data"]["type"] == "forbidden"
    same = {"round_id": rid, "pk1": d0.setup_params(rid)["pk1"], "pk2": d0.setup_params(rid)["pk1"]}
    err = await client.error("training.secagg.setup", same, c.tokens[0])
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "pk2"
    first = await client.ok("training.secagg.setup", d0.setup_params(rid), c.tokens[0])
    # Another device advertising device 0's key.
    stolen = {
        "round_id": rid,
        "pk1": first and d0.setup_params(rid)["pk1"],
        "pk2": c.devices[1].setup_params(rid)["pk2"],
    }
    err = await client.error("training.secagg.setup", stolen, c.tokens[1])
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "pk1"
    # Stage 1 before stage 0 closed: out of order.
    early = {"round_id": rid, "session_id": first["session_id"], "ciphertexts": []}
    err = await client.error("training.secagg.share_keys", early, c.tokens[0])
    assert err["data"]["type"] == "precondition_failed"

    answers = {}
    for _ in range(2):  # the last registration closes stage 0; the others poll once more
        for i in range(N):
            answers[i] = await client.ok(
                "training.secagg.setup", c.devices[i].setup_params(rid), c.tokens[i]
            )
    assert all(c.devices[i].read_setup(answers[i]) for i in range(N))
    # A replay gets the same answer.
    assert await client.ok("training.secagg.setup", d0.setup_params(rid), c.tokens[0]) == answers[0]
    # Stage 2 during stage 1: out of order.
    d0.active = sorted(d0.neighbours)
    err = await client.error(
        "training.secagg.masked_vectors", d0.masked_vectors_params(), c.tokens[0]
    )
    assert err["data"]["type"] == "precondition_failed" and err["data"]["stage"] == "share_keys"
    # Another session's id.
    wrong = {**d0.share_keys_params(), "session_id": "sag_" + secrets.token_hex(16)}
    err = await client.error("training.secagg.share_keys", wrong, c.tokens[0])
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "session_id"
    # One bundle short.
    short = d0.share_keys_params()
    short["ciphertexts"] = short["ciphertexts"][1:]
    err = await client.error("training.secagg.share_keys", short, c.tokens[0])
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "ciphertexts"
    once = await client.ok("training.secagg.share_keys", d0.share_keys_params(), c.tokens[0])
    again = await client.ok("training.secagg.share_keys", d0.share_keys_params(), c.tokens[0])
    assert once == again and once["status"] == "waiting"


async def test_a_share_for_another_session_is_refused_and_never_both_is_refused_by_the_device(
    client, org, mlp_model, mlp_bundle, database_url
):
    net, _ = mlp_bundle
    c = await secure_round(client, org, mlp_model, net)
    drop = {3: set(range(N))}  # every survivor stops before answering

    await run_session(client, database_url, c, drop)

    d0 = c.devices[0]
    params = d0.unmask_params()
    err = await client.error(
        "training.secagg.unmask",
        {**params, "session_id": "sag_" + secrets.token_hex(16)},
        c.tokens[0],
    )
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "session_id"
    j = d0.survivors[0]
    with pytest.raises(InvalidInput, match="never both"):
        d0.unmask_params(survivors=[j], dropped=[j])
    # A share it was not asked for (a key share of a survivor).
    bogus = {**params, "shares": [{**params["shares"][0], "kind": "key"}]}
    err = await client.error("training.secagg.unmask", bogus, c.tokens[0])
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "shares"
    first = await client.ok("training.secagg.unmask", params, c.tokens[0])
    assert first["status"] == "waiting"
    assert await client.ok("training.secagg.unmask", params, c.tokens[0]) == first


async def test_a_member_sees_counts_but_no_device_ids_of_the_owner(
    client, org, other_org, mlp_model, mlp_bundle, database_url
):
    net, _ = mlp_bundle
    fed = await shared_federation(client, org, other_org, mlp_model)
    c = await secure_round(client, org, mlp_model, net, federation_id=fed["id"])
    await run_session(client, database_url, c)

    seen = await client.ok("training.secagg.status", {"round_id": c.rnd["id"]}, other_org.token)
    owner = await client.ok("training.secagg.status", {"round_id": c.rnd["id"]}, org.token)

    assert seen["stage"] == "completed" and seen["survivors_count"] == N
    assert seen["survivors"] == [] and seen["dropped"] == []
    text = str(seen)
    assert not any(d in text for d in c.ids)
    assert sorted(owner["survivors"]) == sorted(c.ids)


async def test_a_secure_round_refuses_robust_strategies(client, org, mlp_model):
    err = await client.error(
        "training.create_round",
        {
            "model_id": mlp_model["id"],
            "base_version": 1,
            "target_device_count": 3,
            "strategy": {"name": "krum"},
            "secure_aggregation": {"threshold": 2},
        },
        org.token,
    )
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "strategy"


async def test_auto_aggregation_publishes_a_completed_session_and_fails_a_failed_one(
    client, org, mlp_model, mlp_bundle, database_url
):
    net, _ = mlp_bundle
    known: dict[str, str] = {}
    done = await secure_round(client, org, mlp_model, net, known=known)
    sql(
        database_url,
        "UPDATE training_rounds SET auto_aggregate = true WHERE id = %s",
        done.rnd["id"],
    )
    survivors, _ = await run_session(client, database_url, done)
    doomed = await secure_round(client, org, mlp_model, net, known=known)
    sql(
        database_url,
        "UPDATE training_rounds SET auto_aggregate = true WHERE id = %s",
        doomed.rnd["id"],
    )
    setup = {0: set(), 1: {0, 1, 2, 3}}  # 2 of 6 hand in bundles: fewer than the minimum, 3
    with pytest.raises(AssertionError):
        await run_session(client, database_url, doomed, setup)
    failed = await client.ok("training.secagg.status", {"round_id": doomed.rnd["id"]}, org.token)
    assert failed["stage"] == "failed" and "stage 1" in failed["failure_reason"]

    await aggregate_due_rounds(client.app[SERVICES])

    rnd = await client.ok("training.get_round", {"round_id": done.rnd["id"]}, org.token)
    assert rnd["state"] == "completed" and rnd["result_version"] == 2
    gone = await client.ok("training.get_round", {"round_id": doomed.rnd["id"]}, org.token)
    assert gone["state"] == "failed" and "SecAgg+ session failed" in gone["failure_reason"]


async def test_two_server_processes_sharing_one_database_serve_one_session(
    client, aiohttp_client, settings, org, mlp_model, mlp_bundle, database_url
):
    net, _ = mlp_bundle
    second = RpcClient(await aiohttp_client(create_app(settings)))
    c = await secure_round(client, org, mlp_model, net)
    servers = [client, second]

    class Alternating:
        """Each call goes to the other server (a restart between any two calls looks alike)."""

        calls = 0

        async def ok(self, method, params, token):
            self.calls += 1
            return await servers[self.calls % 2].ok(method, params, token)

    survivors, answers = await run_session(Alternating(), database_url, c, {2: {4}})

    assert answers[max(answers)]["status"] == "completed"
    await aggregate_and_check(client, org, mlp_model, net, c, survivors)


async def test_a_sparse_graph_survives_dropouts_at_several_stages(
    client, org, mlp_model, mlp_bundle, database_url
):
    net, _ = mlp_bundle
    c = await secure_round(client, org, mlp_model, net, n=12, t=3, neighbours=6)

    # Each device keeps at least 6 - 3 = t surviving neighbours, whatever the graph's draw.
    survivors, answers = await run_session(client, database_url, c, {0: {0}, 1: {3}, 2: {5, 8}})

    assert c.devices[1].config["neighbours"] == 6 and len(c.devices[1].neighbours) == 6
    assert sorted(survivors) == [1, 2, 4, 6, 7, 9, 10, 11]
    assert answers[max(answers)]["status"] == "completed"
    await aggregate_and_check(client, org, mlp_model, net, c, survivors)


async def test_a_secret_short_of_t_shares_fails_the_session_with_the_reason(
    client, org, mlp_model, mlp_bundle, database_url
):
    net, _ = mlp_bundle
    c = await secure_round(client, org, mlp_model, net)
    _, answers = await run_session(client, database_url, c, {3: {0, 1, 2, 3}})
    assert [a["status"] for a in answers.values()] == ["waiting", "waiting"]

    expire_stage(database_url, c.rnd["id"])
    status = await client.ok("training.secagg.status", {"round_id": c.rnd["id"]}, org.token)

    assert status["stage"] == "failed"
    assert f"cannot get the {T} shares it needs" in status["failure_reason"]
    err = await client.error("training.aggregate", {"round_id": c.rnd["id"]}, org.token)
    assert err["data"]["type"] == "precondition_failed" and err["data"]["session_stage"] == "failed"
