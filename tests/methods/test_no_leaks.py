"""Nothing leaks in any response: every method, called as each side, is searched for the other's ids.

The world, built through real HTTP: org A owns a model and a federation (rounds
mix at least 2 updates) that org B is an active member of. Each organization
has a device group, two devices in it, a spare device, an extra API key, an
upload, and its devices' updates, device jobs and personalized states (with a
metric name only that organization reports). A runs two federated rounds on the
shared model: one whose selection criteria name A's device group, and one that
selects all four devices and receives an update from each.

The walk then calls every method of the registry as org B, as one of B's
devices and as org A, with params naming the world's ids, and searches every
response (results and errors alike) for the other side's device ids, device
group ids, update ids, device job ids, upload ids, API key ids and tokens, and
its private metric name. A device also must not see its sibling devices' ids,
tokens, jobs or updates. A probe pass then names the other side's ids in
params, as a hostile caller that learned them would: such an id may be echoed
in an error, never returned in a result.

A method that is neither in WALK nor in SKIPPED fails the walk: add it to one
of them (with params, or with the reason it cannot be called harmlessly).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from fedrpc.registry import Registry
from tests.conftest import DEVICE_DEFAULTS, register_device
from tests.methods.conftest import inline, shared_federation
from tests.methods.test_weights_upload import update_bytes, upload_params

# Methods the walk does not call, each with the reason. Empty today: every method can be
# called harmlessly with the world's ids (mutating ones on objects made for the walk).
SKIPPED: dict[str, str] = {}


@dataclass
class Side:
    """One organization's part of the world, and the secrets the other side must never see."""

    org: object
    metric: str
    devices: list[dict] = field(default_factory=list)
    spare: dict = field(default_factory=dict)  # revoked by the walk
    group_id: str = ""
    key: dict = field(default_factory=dict)  # an extra API key, revoked by the walk
    updates: dict[str, str] = field(default_factory=dict)  # device id -> update id
    jobs: dict[str, str] = field(default_factory=dict)  # device id -> job id
    uploads: dict[str, str] = field(default_factory=dict)  # device id -> upload id
    model_id: str = ""  # a model of its own, never shared

    def device_secrets(self, device: dict) -> dict[str, str]:
        did = device["device_id"]
        found = {did: "device id", device["token"]: "device token"}
        for name, table in (("update", self.updates), ("job", self.jobs), ("upload", self.uploads)):
            if did in table:
                found[table[did]] = f"{name} id of {did}"
        return found

    def secrets(self) -> dict[str, str]:
        found = {
            self.org.token: "org API key token",
            self.key["id"]: "API key id",
            self.key["token"]: "API key token",
            self.group_id: "device group id",
            self.metric: "per-device metric name",
        }
        for device in [*self.devices, self.spare]:
            found.update(self.device_secrets(device))
        return found


@dataclass
class World:
    fed: dict
    model: dict
    a: Side
    b: Side
    group_round: dict
    mixed_round: dict


@dataclass
class Walk:
    """The caller's view: its side, the other side, its device, what the walk made."""

    world: World
    me: Side
    other: Side
    device: dict
    token: str
    made: dict = field(default_factory=dict)

    @property
    def fed_id(self) -> str:
        return self.world.fed["id"]

    @property
    def model_id(self) -> str:
        return self.world.model["id"]


async def _federated_round(client, world_org, model, fed, count, criteria=None, start=True):
    """A round of A; returns (round, error of any step that failed or None)."""
    rnd = await client.ok(
        "training.create_round",
        {
            "model_id": model["id"],
            "base_version": 1,
            "target_device_count": count,
            "federation_id": fed["id"],
        },
        world_org.token,
    )
    body = await client.call(
        "training.select_devices",
        {"round_id": rnd["id"], "criteria": criteria or {}},
        world_org.token,
    )
    if "error" in body:
        return rnd, body["error"]["message"]
    if start:
        await client.ok("training.start_round", {"round_id": rnd["id"]}, world_org.token)
    return rnd, None


async def build_world(client, org, other_org, model, bundle) -> World:
    # Analytics groups of two devices are shown (the floor counts devices), and so searched.
    fed = await shared_federation(
        client, org, other_org, model, "f", analytics_policy={"min_group_size": 2}
    )
    a, b = Side(org, "owner_only_metric_x7"), Side(other_org, "member_only_metric_q3")
    for side in (a, b):
        group = await client.ok("devices.groups.create", {"name": "field"}, side.org.token)
        side.group_id = group["id"]
        side.devices = [
            await register_device(client, side.org.token, device_group_ids=[group["id"]])
            for _ in range(2)
        ]
        side.key = await client.ok("orgs.api_keys.create", {"name": "script"}, side.org.token)
    own = await client.ok("models.create", {"name": "private"}, b.org.token)
    await client.ok(
        "models.versions.create", {"model_id": own["id"], **inline(bundle)}, b.org.token
    )
    b.model_id = own["id"]
    # Its criteria name A's group, which B must not learn from the round's criteria.
    group_round, error = await _federated_round(
        client, org, model, fed, 2, criteria={"device_group_id": a.group_id}, start=False
    )
    assert error is None, f"the world needs a round selected by A's device group: {error}"
    seen = await client.ok("training.get_round", {"round_id": group_round["id"]}, org.token)
    assert a.group_id in json.dumps(seen["selection_criteria"]), seen
    mixed, error = await _federated_round(client, org, model, fed, 4)
    assert error is None, error
    for i, (side, device) in enumerate([(s, d) for s in (a, b) for d in s.devices]):
        token, did = device["token"], device["device_id"]
        sent = await client.ok(
            "training.weights.upload",
            upload_params(mixed, update_bytes(i), sample_count=5 + i),
            token,
        )
        side.updates[did] = sent["id"]
        job = await client.ok(
            "training.device_jobs.create",
            {
                "job_type": "federated",
                "round_id": mixed["id"],
                "model_id": model["id"],
                "base_version": 1,
            },
            token,
        )
        side.jobs[did] = job["id"]
        await client.ok(
            "training.personalized.update",
            {
                "model_id": model["id"],
                "federation_id": fed["id"],
                "personalization_type": "ditto",
                "metrics": {side.metric: float(i)},
            },
            token,
        )
        data = update_bytes(100 + i)
        upload = await client.ok(
            "uploads.create",
            {
                "purpose": "weights",
                "size_bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            },
            token,
        )
        side.uploads[did] = upload["upload_id"]
        # Six numbers and two categories each: every member's and group's answer is shown.
        rows = [
            {"variable": "walk", "value": float(i + k), "recorded_at": "2026-01-01T00:00:00Z"}
            for k in range(6)
        ] + [
            {"variable": v, "category": f"{v}{i % 2}", "recorded_at": "2026-01-01T00:00:00Z"}
            for v in ("walk_a", "walk_b")
        ]
        await client.ok("analytics.report", {"observations": rows}, token)
    for side in (a, b):
        # Registered after selection, so the rounds above selected exactly the four devices.
        side.spare = await register_device(client, side.org.token)
    return World(fed, model, a, b, group_round, mixed)


# --- what the walk calls ------------------------------------------------------------------------

Params = Callable[[Walk], dict]


def _round_made(w: Walk) -> str:
    return w.made.get("round_id") or w.world.group_round["id"]


# In call order: reads first, then the mutating methods on objects made for the walk, then
# the calls that end a credential. One method may be called with several params.
_B64_KEY_1, _B64_KEY_2 = "AQ" * 21 + "A=", "Ag" * 21 + "A="  # 32 bytes each
_SID = "sag_" + "0" * 32

WALK: list[tuple[str, Params]] = [
    ("rpc.discover", lambda w: {}),
    ("system.ping", lambda w: {}),
    ("system.version", lambda w: {}),
    ("orgs.get", lambda w: {}),
    ("orgs.api_keys.list", lambda w: {"include_revoked": True}),
    ("devices.get", lambda w: {"device_id": w.device["device_id"]}),
    ("devices.list", lambda w: {}),
    ("devices.list", lambda w: {"device_group_id": w.me.group_id}),
    ("devices.groups.list", lambda w: {}),
    ("devices.sync", lambda w: {"battery_pct": 70}),
    ("federations.list", lambda w: {}),
    ("federations.get", lambda w: {"federation_id": w.fed_id}),
    ("federations.members", lambda w: {"federation_id": w.fed_id}),
    ("federations.models.list", lambda w: {"federation_id": w.fed_id}),
    ("federations.privacy.get", lambda w: {"federation_id": w.fed_id}),
    ("federations.privacy.history", lambda w: {"federation_id": w.fed_id}),
    (
        "federations.privacy.estimate",
        lambda w: {
            "federation_id": w.fed_id,
            "noise_multiplier": 1.0,
            "sample_rate": 0.1,
            "num_steps": 10,
        },
    ),
    ("models.list", lambda w: {}),
    ("models.get", lambda w: {"model_id": w.model_id}),
    ("models.versions.list", lambda w: {"model_id": w.model_id}),
    ("models.versions.get", lambda w: {"model_id": w.model_id, "version": 1}),
    ("models.versions.download", lambda w: {"model_id": w.model_id, "version": 1}),
    ("training.list_rounds", lambda w: {}),
    ("training.list_rounds", lambda w: {"federation_id": w.fed_id}),
    ("training.get_round", lambda w: {"round_id": w.world.group_round["id"]}),
    ("training.get_round", lambda w: {"round_id": w.world.mixed_round["id"]}),
    ("training.get_round_progress", lambda w: {"round_id": w.world.mixed_round["id"]}),
    ("training.updates.list", lambda w: {"model_id": w.model_id}),
    ("training.updates.stats", lambda w: {"model_id": w.model_id}),
    ("training.updates.by_device", lambda w: {"model_id": w.model_id}),
    ("training.personalized.list", lambda w: {"federation_id": w.fed_id}),
    ("training.personalized.list", lambda w: {}),
    (
        "training.personalized.get",
        lambda w: {
            "model_id": w.model_id,
            "federation_id": w.fed_id,
            "device_id": w.device["device_id"],
        },
    ),
    (
        "training.personalized.metrics",
        lambda w: {
            "model_id": w.model_id,
            "federation_id": w.fed_id,
            "device_id": w.device["device_id"],
        },
    ),
    # Mutating, harmless: new objects of the caller's own, or replays of what exists.
    ("models.create", lambda w: {"name": "walked"}),
    ("devices.groups.create", lambda w: {"name": "walked"}),
    (
        "devices.groups.add_devices",
        lambda w: {"group_id": w.me.group_id, "device_ids": [w.me.devices[1]["device_id"]]},
    ),
    ("devices.register", lambda w: _device_fields()),
    ("federations.create", lambda w: {"name": "walked", "org_id": w.me.org.id}),
    ("federations.invite", lambda w: {"federation_id": w.fed_id, "org_ids": [w.other.org.id]}),
    ("federations.join", lambda w: {"federation_id": w.fed_id, "org_id": w.me.org.id}),
    ("federations.models.share", lambda w: {"federation_id": w.fed_id, "model_id": w.model_id}),
    ("models.versions.publish", lambda w: {"model_id": w.model_id, "version": 1}),
    ("orgs.api_keys.create", lambda w: {"name": "walked"}),
    ("uploads.create", lambda w: {"purpose": "weights", "size_bytes": 8, "sha256": "0" * 64}),
    (
        "training.personalized.update",
        lambda w: {
            "model_id": w.model_id,
            "federation_id": w.fed_id,
            "personalization_type": "ditto",
            "metrics": {w.me.metric: 9.0},
        },
    ),
    (
        "training.weights.upload",
        lambda w: upload_params(w.world.mixed_round, update_bytes(7), sample_count=3),
    ),
    (
        "training.device_jobs.create",
        lambda w: {"job_type": "personalization", "model_id": w.model_id, "base_version": 1},
    ),
    (
        "training.device_jobs.update_status",
        lambda w: {"job_id": w.me.jobs[w.device["device_id"]], "state": "downloading"},
    ),
    (
        "training.device_jobs.complete",
        lambda w: {"job_id": w.me.jobs[w.device["device_id"]], "metrics": {"steps": 1}},
    ),
    (
        "training.create_round",
        lambda w: {
            "model_id": w.model_id,
            "base_version": 1,
            "target_device_count": 2,
            "federation_id": w.fed_id,
        },
    ),
    ("training.select_devices", lambda w: {"round_id": _round_made(w)}),
    ("training.start_round", lambda w: {"round_id": _round_made(w)}),
    ("training.cancel_round", lambda w: {"round_id": _round_made(w), "reason": "walked"}),
    # SecAgg+ on a round without secure_aggregation: refused before anything is stored
    # (tests/methods/test_secagg.py searches a real session's answers for device ids).
    (
        "training.secagg.setup",
        lambda w: {"round_id": w.world.mixed_round["id"], "pk1": _B64_KEY_1, "pk2": _B64_KEY_2},
    ),
    (
        "training.secagg.share_keys",
        lambda w: {"round_id": w.world.mixed_round["id"], "session_id": _SID, "ciphertexts": []},
    ),
    (
        "training.secagg.masked_vectors",
        lambda w: {
            "round_id": w.world.mixed_round["id"],
            "session_id": _SID,
            "masked_vector": "AAAAAAAAAAA=",
        },
    ),
    (
        "training.secagg.unmask",
        lambda w: {"round_id": w.world.mixed_round["id"], "session_id": _SID, "shares": []},
    ),
    ("training.secagg.status", lambda w: {"round_id": w.world.mixed_round["id"]}),
    ("training.aggregate", lambda w: {"round_id": w.world.mixed_round["id"]}),
    (
        "federations.analytics.descriptive",
        lambda w: {"federation_id": w.fed_id, "variable": "walk"},
    ),
    (
        "federations.analytics.descriptive",
        lambda w: {"federation_id": w.fed_id, "variable": "walk", "group_by": "federation_member"},
    ),
    (
        "federations.analytics.t_test",
        lambda w: {
            "federation_id": w.fed_id,
            "variable": "walk",
            "group_by": "federation_member",
            "group_a": w.me.org.id,
            "group_b": w.other.org.id,
        },
    ),
    (
        "federations.analytics.anova",
        lambda w: {"federation_id": w.fed_id, "variable": "walk", "group_by": "federation_member"},
    ),
    (
        "federations.analytics.chi_square",
        lambda w: {"federation_id": w.fed_id, "variable_1": "walk_a", "variable_2": "walk_b"},
    ),
    ("federations.analytics.queries.list", lambda w: {}),
    (
        "federations.analytics.queries.get",
        lambda w: {"query_id": w.made.get("query_id", "anq_" + "0" * 32)},
    ),
    (
        "analytics.report",
        lambda w: {
            "observations": [
                {"variable": "walk", "value": 1.0, "recorded_at": "2026-01-01T00:00:00Z"}
            ]
        },
    ),
    ("training.get_round", lambda w: {"round_id": w.world.mixed_round["id"]}),
    (
        "models.versions.create",
        lambda w: {"model_id": w.model_id, **inline(w.made["bundle"])},
    ),
    (
        "federations.privacy.set_budget",
        lambda w: {"federation_id": w.fed_id, "total_epsilon_budget": 50.0},
    ),
    ("orgs.api_keys.revoke", lambda w: {"key_id": w.me.key["id"]}),
    ("devices.revoke", lambda w: {"device_id": w.me.spare["device_id"], "reason": "walked"}),
    ("devices.rotate_token", lambda w: {}),
]

# The other side's ids named in params, as a caller that learned them would.
PROBES: list[tuple[str, Params]] = [
    (
        "federations.analytics.descriptive",
        lambda w: {"federation_id": w.fed_id, "variable": "walk", "group_ids": [w.other.group_id]},
    ),
    ("devices.get", lambda w: {"device_id": w.other.devices[0]["device_id"]}),
    ("devices.list", lambda w: {"device_group_id": w.other.group_id}),
    (
        "devices.groups.add_devices",
        lambda w: {"group_id": w.me.group_id, "device_ids": [w.other.devices[0]["device_id"]]},
    ),
    (
        "devices.groups.add_devices",
        lambda w: {"group_id": w.other.group_id, "device_ids": [w.me.devices[0]["device_id"]]},
    ),
    (
        "devices.register",
        lambda w: {**_device_fields(), "device_group_ids": [w.other.group_id]},
    ),
    ("orgs.api_keys.revoke", lambda w: {"key_id": w.other.key["id"]}),
    ("devices.revoke", lambda w: {"device_id": w.other.spare["device_id"]}),
    (
        "training.personalized.get",
        lambda w: {
            "model_id": w.model_id,
            "federation_id": w.fed_id,
            "device_id": w.other.devices[0]["device_id"],
        },
    ),
    (
        "training.personalized.metrics",
        lambda w: {
            "model_id": w.model_id,
            "federation_id": w.fed_id,
            "device_id": w.other.devices[0]["device_id"],
        },
    ),
    (
        "training.device_jobs.update_status",
        lambda w: {"job_id": w.other.jobs[w.other.devices[0]["device_id"]], "state": "failed"},
    ),
    (
        "training.device_jobs.complete",
        lambda w: {"job_id": w.other.jobs[w.other.devices[0]["device_id"]]},
    ),
    # A sibling device of the caller's own organization: secret to the device caller only.
    ("devices.get", lambda w: {"device_id": w.me.devices[1]["device_id"]}),
    (
        "training.personalized.get",
        lambda w: {
            "model_id": w.model_id,
            "federation_id": w.fed_id,
            "device_id": w.me.devices[1]["device_id"],
        },
    ),
    (
        "training.device_jobs.update_status",
        lambda w: {"job_id": w.me.jobs[w.me.devices[1]["device_id"]], "state": "failed"},
    ),
    (
        "training.device_jobs.complete",
        lambda w: {"job_id": w.me.jobs[w.me.devices[1]["device_id"]]},
    ),
]


def _device_fields() -> dict:
    return json.loads(json.dumps(DEVICE_DEFAULTS))


# Reads each caller must get a result from, so that the walk searches real answers.
_ORG_READS = {
    "devices.list",
    "devices.groups.list",
    "federations.members",
    "training.list_rounds",
    "training.get_round",
    "training.get_round_progress",
    "training.updates.list",
    "training.updates.stats",
    "training.updates.by_device",
    "training.personalized.list",
    "training.personalized.get",
    "training.personalized.metrics",
    "federations.analytics.descriptive",
    "federations.analytics.t_test",
    "federations.analytics.anova",
    "federations.analytics.queries.list",
    "federations.analytics.queries.get",
}
MUST_ANSWER = {
    "org A": _ORG_READS | {"training.aggregate", "training.select_devices"},
    "org B": _ORG_READS,
    "device of B": {
        "devices.get",
        "devices.sync",
        "models.versions.download",
        "training.personalized.get",
        "training.personalized.metrics",
        "training.device_jobs.update_status",
        "devices.rotate_token",
        "analytics.report",
    },
}


def walked_methods() -> set[str]:
    return {name for name, _ in WALK}


# --- the walk -----------------------------------------------------------------------------------


@dataclass
class Call:
    method: str
    params: dict
    response: dict

    @property
    def text(self) -> str:
        return json.dumps(self.response)


async def call(client, w: Walk, method: str, params: dict) -> Call:
    body = await client.call(method, params, w.token)
    if "result" in body:
        _remember(w, method, body["result"])
    return Call(method, params, body)


def _remember(w: Walk, method: str, result) -> None:
    if method == "training.create_round":
        w.made["round_id"] = result["id"]
    if method.startswith("federations.analytics.") and "query_id" in result:
        w.made["query_id"] = result["query_id"]
    if method == "devices.rotate_token":
        w.token = result["token"]


def leaks_in(calls: list[Call], secrets: dict[str, str], echo_ok: bool = False) -> list[str]:
    """Every secret found in a response; with echo_ok, an id the call itself named may be
    echoed in an error (never in a result)."""
    found = []
    for c in calls:
        text = c.text
        echoed = set(_flat(c.params)) if echo_ok and "error" in c.response else set()
        for secret, what in secrets.items():
            if secret and secret in text and secret not in echoed:
                found.append(f"{c.method} {json.dumps(c.params)[:120]}: {what} {secret}")
    return found


def secrets_for(world: World, caller: str) -> dict[str, str]:
    """What the caller must never see: the other side's secrets (and a device's siblings')."""
    if caller == "org A":
        return {k: f"B's {v}" for k, v in world.b.secrets().items()}
    found = {k: f"A's {v}" for k, v in world.a.secrets().items()}
    if caller == "device of B":
        for sibling in [*world.b.devices[1:], world.b.spare]:
            found.update({k: f"sibling {v}" for k, v in world.b.device_secrets(sibling).items()})
    return found


def walk_for(world: World, caller: str, bundle: bytes) -> Walk:
    me, other = (world.a, world.b) if caller == "org A" else (world.b, world.a)
    device = me.devices[0]
    token = device["token"] if caller == "device of B" else me.org.token
    return Walk(world, me, other, device, token, made={"bundle": bundle})


def test_every_method_is_walked_or_skipped():
    registered = {spec.name for spec in Registry.from_package()}
    unknown = registered - walked_methods() - set(SKIPPED)
    assert not unknown, (
        f"new methods the leak walk neither calls nor skips: {sorted(unknown)}; "
        "add each to WALK in tests/methods/test_no_leaks.py (or to SKIPPED with a reason)"
    )
    gone = (walked_methods() | set(SKIPPED)) - registered
    assert not gone, f"the leak walk names methods that no longer exist: {sorted(gone)}"
    assert not walked_methods() & set(SKIPPED)


@pytest.mark.parametrize("caller", ["org B", "device of B", "org A"])
async def test_no_response_holds_another_organizations_ids(
    client, org, other_org, mlp_model, mlp_bundle, caller
):
    world = await build_world(client, org, other_org, mlp_model, mlp_bundle[1])
    w = walk_for(world, caller, mlp_bundle[1])
    secrets = secrets_for(world, caller)
    registered = {spec.name for spec in Registry.from_package()}
    calls = [
        await call(client, w, method, params(w)) for method, params in WALK if method in registered
    ]
    assert {c.method for c in calls} == registered - set(SKIPPED)
    # The walk reached what it meant to read: a walk of errors proves nothing.
    failed = {c.method for c in calls if "error" in c.response} & MUST_ANSWER[caller]
    assert not failed, [c.response for c in calls if c.method in failed]
    leaks = leaks_in(calls, secrets)
    probes = [await call(client, w, method, params(w)) for method, params in PROBES]
    leaks += leaks_in(probes, secrets, echo_ok=True)
    assert not leaks, "\n".join([f"{caller} saw {len(leaks)} of the other side's ids:", *leaks])


def _flat(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _flat(v)
    elif isinstance(value, list):
        for v in value:
            yield from _flat(v)
    else:
        yield value
