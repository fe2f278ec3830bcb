"""SecAgg+ rules a hostile device or an impatient operator runs into, over real HTTP.

Small-order public keys (whose agreements anyone can compute) are refused at
stage 0; no stage outlives the round's deadline; status answers before the
session starts; a masked vector through an upload is checked like an inline
one and a replay of it is recognised; a needed secret that can no longer get
t shares fails the session at once, not at the deadline.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime
from hashlib import sha256

import aiohttp

from tests.conftest import register_device
from tests.kernels.test_secagg_primitives import SMALL_ORDER
from tests.methods.test_secagg import (
    expire_stage,
    run_session,
    secure_round,
    sql,
    through_stage_one,
    upload_vector,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_small_order_public_keys_are_refused_at_setup(client, org, mlp_model, mlp_bundle):
    net, _ = mlp_bundle
    c = await secure_round(client, org, mlp_model, net)
    rid = c.rnd["id"]
    good = c.devices[0].setup_params(rid)
    for point in SMALL_ORDER:
        for field in ("pk1", "pk2"):
            params = {**good, field: b64(bytes.fromhex(point))}
            err = await client.error("training.secagg.setup", params, c.tokens[0])
            assert err["data"]["type"] == "bad_request", (point, err)
            assert err["data"]["field"] == field
    # Nothing was stored: the device registers its good keys afterwards.
    answer = await client.ok("training.secagg.setup", good, c.tokens[0])
    assert answer["stage"] == "setup"


async def test_status_answers_before_the_first_setup(client, org, other_org, mlp_model, mlp_bundle):
    net, _ = mlp_bundle
    c = await secure_round(client, org, mlp_model, net)

    status = await client.ok("training.secagg.status", {"round_id": c.rnd["id"]}, org.token)

    assert status["stage"] == "not_started" and status["threshold"] == 3
    assert "session_id" not in status and status["survivors"] == []
    err = await client.error("training.secagg.status", {"round_id": c.rnd["id"]}, other_org.token)
    assert err["data"]["type"] in ("forbidden", "not_found")
    plain = await client.ok(
        "training.create_round",
        {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 3},
        org.token,
    )
    err = await client.error("training.secagg.status", {"round_id": plain["id"]}, org.token)
    assert err["data"]["type"] == "precondition_failed"


async def test_no_stage_outlives_the_round_deadline(
    client, org, mlp_model, mlp_bundle, database_url
):
    net, _ = mlp_bundle
    c = await secure_round(client, org, mlp_model, net, round_params={"deadline_seconds": 120})
    rid = c.rnd["id"]
    rnd = await client.ok("training.get_round", {"round_id": rid}, org.token)

    first = await client.ok("training.secagg.setup", c.devices[0].setup_params(rid), c.tokens[0])

    # stage_seconds is 600; the round ends in 120.
    assert datetime.fromisoformat(first["stage_deadline"]) <= datetime.fromisoformat(
        rnd["deadline_at"]
    )
    sql(
        database_url,
        "UPDATE training_rounds SET deadline_at = now() - interval '1 second' WHERE id = %s",
        rid,
    )
    expire_stage(database_url, rid)
    status = await client.ok("training.secagg.status", {"round_id": rid}, org.token)
    assert status["stage"] == "failed"
    assert "round's deadline passed" in status["failure_reason"]


async def test_a_masked_vector_upload_is_checked_like_an_inline_one(
    client, org, mlp_model, mlp_bundle, database_url
):
    net, _ = mlp_bundle
    c = await secure_round(client, org, mlp_model, net)
    rid = c.rnd["id"]
    await through_stage_one(client, database_url, c)
    d0, d1 = c.devices[0], c.devices[1]
    mine = await upload_vector(client, c.tokens[0], d0.masked_vector_bytes())

    # Another device naming device 0's upload.
    err = await client.error(
        "training.secagg.masked_vectors", d1.masked_vectors_params(mine), c.tokens[1]
    )
    assert err["data"]["type"] == "forbidden"
    # An upload of the wrong size, and one made for another purpose.
    short = await upload_vector(client, c.tokens[1], d1.masked_vector_bytes()[:-4])
    err = await client.error(
        "training.secagg.masked_vectors", d1.masked_vectors_params(short), c.tokens[1]
    )
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "masked_vector"
    data = d1.masked_vector_bytes()
    other = await client.ok(
        "uploads.create",
        {"purpose": "weights", "size_bytes": len(data), "sha256": sha256(data).hexdigest()},
        c.tokens[1],
    )
    async with aiohttp.ClientSession() as http, http.put(other["url"], data=data):
        pass
    err = await client.error(
        "training.secagg.masked_vectors", d1.masked_vectors_params(other["upload_id"]), c.tokens[1]
    )
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "masked_vector"
    # Neither inline nor an upload.
    bare = {"round_id": rid, "session_id": d1.session_id}
    err = await client.error("training.secagg.masked_vectors", bare, c.tokens[1])
    assert err["data"]["type"] == "bad_request" and err["data"]["field"] == "masked_vector"

    once = await client.ok(
        "training.secagg.masked_vectors", d0.masked_vectors_params(mine), c.tokens[0]
    )
    # A replay names the used upload again: recognised by its digest.
    again = await client.ok(
        "training.secagg.masked_vectors", d0.masked_vectors_params(mine), c.tokens[0]
    )
    assert once == again and once["status"] == "accepted"
    # A fresh upload of other bytes is a conflict, as inline other bytes are.
    changed = bytearray(d0.masked_vector_bytes())
    changed[0] ^= 1
    other_bytes = await upload_vector(client, c.tokens[0], bytes(changed))
    err = await client.error(
        "training.secagg.masked_vectors", d0.masked_vectors_params(other_bytes), c.tokens[0]
    )
    assert err["data"]["type"] == "conflict"


async def test_a_secret_that_can_no_longer_get_t_shares_fails_the_session_at_once(
    client, org, mlp_model, mlp_bundle, database_url
):
    net, _ = mlp_bundle
    # All to all among 6: k = 5 = t, so every holder's share of every secret is needed.
    c = await secure_round(client, org, mlp_model, net, t=5)
    c.extra["tamper"] = (0, 2)  # device 2 cannot open device 0's bundle: it holds no share of it

    _, answers = await run_session(client, database_url, c)

    assert c.devices[2].rejected == [c.devices[0].index]
    # Device 2 answered without device 0's share: 0's secret can reach only 4 of 5, now.
    assert answers[2]["status"] == "failed"
    assert "cannot get the 5 shares it needs" in answers[2]["failure_reason"]
    assert answers[1]["status"] == "waiting"


async def test_a_device_that_is_not_a_participant_cannot_replay_another_session(
    client, org, mlp_model, mlp_bundle, database_url
):
    net, _ = mlp_bundle
    c = await secure_round(client, org, mlp_model, net)
    outsider = await register_device(client, org.token)
    await run_session(client, database_url, c)
    params = {
        "round_id": c.rnd["id"],
        "session_id": c.devices[0].session_id,
        "masked_vector": b64(secrets.token_bytes(64)),
    }
    err = await client.error("training.secagg.masked_vectors", params, outsider["token"])
    assert err["data"]["type"] == "forbidden"


async def test_k_and_t_default_from_the_cohort_and_the_tolerated_fractions(
    client, org, mlp_model, mlp_bundle, database_url
):
    net, _ = mlp_bundle
    c = await secure_round(client, org, mlp_model, net, n=12, t=None, dropout_fraction=0.25)
    before = await client.ok("training.secagg.status", {"round_id": c.rnd["id"]}, org.token)
    assert "threshold" not in before  # chosen when stage 0 closes, from the cohort

    survivors, answers = await run_session(client, database_url, c, {2: {3}})

    # Independent of graph.default_parameters: 12 devices are all to all (k = 11); with
    # floor(0.05 * 12) = 0 colluders an honest majority t = 11 // 2 + 1 = 6 leaves
    # ceil(0.75 * 12) - 1 = 8 >= 6 neighbours after the tolerated dropout.
    config = c.devices[0].config
    assert (config["neighbours"], config["threshold"]) == (11, 6)
    assert answers[max(answers)]["status"] == "completed" and len(survivors) == 11
