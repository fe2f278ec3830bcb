"""Every method against every caller that must be refused, with the refusal's ``data.type``.

RULES declares, for every registered method, who may call it (the registry's callers,
checked against ``x-callers``) and what it lets them touch. A method added without
its line fails ``test_every_method_declares_its_rule``.

The world is tests/methods/test_no_leaks.py's (org A owns a model and a federation
that org B is an active member of, each with devices, a group, keys, rounds, updates,
jobs and analytics rows) plus an outsider org C with a device, an enrollment key of
A, a revoked key and a revoked device of A, an analytics question of A and a device
of A that no round selected. Each method is called with params that name A's real
objects, as:

- no token: ``unauthorized`` (401), except public methods, which answer;
- a revoked org API key, a revoked device's token: ``unauthorized`` (401), public
  methods included (a token that is sent is checked);
- an enrollment key of A: ``forbidden`` for everything but devices.register, which
  refuses a group the key is not bound to (``forbidden``);
- a device token on a method only an org key may call: ``forbidden``; an org key on a
  device's method: ``forbidden`` (dispatch refuses the kind);
- another organization's key (C, in no federation with A), or one invited into A's
  federation that has not joined (D): ``forbidden`` for A's
  devices, groups, keys, org id, models, rounds and federations (docs/design.md: another
  organization's ids are ``forbidden``, checked before existence); an analytics
  question of a federation C is not in is ``not_found`` (docs/analytics.md);
- another organization's device (C's): ``forbidden`` for A's models, rounds, jobs and
  devices;
- another device of A: ``forbidden`` for A's other device's record, personalized state
  and jobs; a device no round selected, ``forbidden`` on the round's device stages;
- a federation member (B) on what only the owner may do (invite, share, set the budget,
  create versions, publish, run rounds) and on A's devices, groups and keys: ``forbidden``.

Calls whose caller is allowed (a member reading the shared model, a device acting as
itself) are not made here: the method tests cover them. Every mismatch is collected and
reported in one assertion.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from fedrpc.registry import Registry
from tests.conftest import DEVICE_DEFAULTS, register_device
from tests.methods.conftest import inline
from tests.methods.test_no_leaks import World, build_world
from tests.methods.test_weights_upload import update_bytes, upload_params

# What a method lets its callers touch:
#   public        anyone, no token needed
#   caller        the calling principal itself (no object of anyone named)
#   org           the caller's own organization's lists and new objects (nothing of another named)
#   device        the calling device itself
#   org-owned     an object one organization owns (device, group, key, org id): its own only
#   enroll        registers a device into the caller's own groups (an enrollment key: its bound ones)
#   own-device    one device's own data: the device itself, or its organization's org key
#   model-reader  a model the caller's organization owns or reads through a federation
#   model-owner   a model only its owner changes
#   federation-member / federation-owner   a federation's active members / its owner
#   round-reader / round-owner             a round's organization and federation / its owner
#   round-device  a round the calling device was selected for
#   device-job    a device job of the calling device
#   question      an analytics question of a federation the caller is an active member of
RULES: dict[str, tuple[str, str]] = {
    "analytics.report": ("device", "device"),
    "devices.get": ("org device", "own-device"),
    "devices.groups.add_devices": ("org", "org-owned"),
    "devices.groups.create": ("org", "org"),
    "devices.groups.list": ("org", "org"),
    "devices.list": ("org", "org-owned"),
    "devices.register": ("org enroll", "enroll"),
    "devices.revoke": ("org", "org-owned"),
    "devices.rotate_token": ("device", "device"),
    "devices.sync": ("device", "device"),
    "federations.analytics.anova": ("org", "federation-member"),
    "federations.analytics.chi_square": ("org", "federation-member"),
    "federations.analytics.descriptive": ("org", "federation-member"),
    "federations.analytics.queries.get": ("org", "question"),
    "federations.analytics.queries.list": ("org", "org"),
    "federations.analytics.t_test": ("org", "federation-member"),
    "federations.create": ("org", "org-owned"),
    "federations.get": ("org", "federation-member"),
    "federations.invite": ("org", "federation-owner"),
    "federations.join": ("org", "org-owned"),
    "federations.list": ("org", "org-owned"),
    "federations.members": ("org", "federation-member"),
    "federations.models.list": ("org", "federation-member"),
    "federations.models.share": ("org", "federation-owner"),
    "federations.privacy.estimate": ("org", "federation-member"),
    "federations.privacy.get": ("org", "federation-member"),
    "federations.privacy.history": ("org", "federation-member"),
    "federations.privacy.set_budget": ("org", "federation-owner"),
    "models.create": ("org", "org"),
    "models.get": ("org device", "model-reader"),
    "models.list": ("org", "org"),
    "models.versions.create": ("org", "model-owner"),
    "models.versions.download": ("org device", "model-reader"),
    "models.versions.get": ("org device", "model-reader"),
    "models.versions.list": ("org device", "model-reader"),
    "models.versions.publish": ("org", "model-owner"),
    "orgs.api_keys.create": ("org", "org-owned"),
    "orgs.api_keys.list": ("org", "org"),
    "orgs.api_keys.revoke": ("org", "org-owned"),
    "orgs.get": ("org", "org-owned"),
    "rpc.discover": ("public", "public"),
    "system.ping": ("org device", "caller"),
    "system.version": ("public", "public"),
    "training.aggregate": ("org", "round-owner"),
    "training.cancel_round": ("org", "round-owner"),
    "training.create_round": ("org", "model-owner"),
    "training.device_jobs.complete": ("device", "device-job"),
    "training.device_jobs.create": ("device", "round-device"),
    "training.device_jobs.update_status": ("device", "device-job"),
    "training.get_round": ("org", "round-reader"),
    "training.get_round_progress": ("org", "round-reader"),
    "training.list_rounds": ("org", "org"),
    "training.personalized.get": ("org device", "own-device"),
    "training.personalized.list": ("org", "federation-member"),
    "training.personalized.metrics": ("org device", "own-device"),
    "training.personalized.update": ("device", "model-reader"),
    "training.secagg.masked_vectors": ("device", "round-device"),
    "training.secagg.setup": ("device", "round-device"),
    "training.secagg.share_keys": ("device", "round-device"),
    "training.secagg.status": ("org", "round-reader"),
    "training.secagg.unmask": ("device", "round-device"),
    "training.select_devices": ("org", "round-owner"),
    "training.start_round": ("org", "round-owner"),
    "training.updates.by_device": ("org", "model-reader"),
    "training.updates.list": ("org", "model-reader"),
    "training.updates.stats": ("org", "model-reader"),
    "training.weights.upload": ("device", "round-device"),
    "uploads.create": ("org device", "caller"),
}

# Scenario -> what each rule answers when the caller is allowed to call the method at all
# (the kind checks of dispatch come first: see expected()). Absent: the caller may do it.
OUTSIDER, INVITED, OUTSIDER_DEVICE, SIBLING, MEMBER = (
    "another org's key",
    "an org invited to the federation, not joined",
    "another org's device",
    "another device of the org",
    "a federation member",
)
REFUSALS: dict[str, dict[str, str]] = {
    "org-owned": {OUTSIDER: "forbidden", MEMBER: "forbidden"},
    "enroll": {OUTSIDER: "forbidden", MEMBER: "forbidden"},
    "own-device": {
        OUTSIDER: "forbidden",
        OUTSIDER_DEVICE: "forbidden",
        SIBLING: "forbidden",
        MEMBER: "forbidden",
    },
    "model-reader": {OUTSIDER: "forbidden", OUTSIDER_DEVICE: "forbidden"},
    "model-owner": {OUTSIDER: "forbidden", MEMBER: "forbidden"},
    "federation-member": {OUTSIDER: "forbidden"},
    "federation-owner": {OUTSIDER: "forbidden", MEMBER: "forbidden"},
    "round-reader": {OUTSIDER: "forbidden"},
    "round-owner": {OUTSIDER: "forbidden", MEMBER: "forbidden"},
    "round-device": {OUTSIDER_DEVICE: "forbidden", SIBLING: "forbidden"},
    "device-job": {OUTSIDER_DEVICE: "forbidden", SIBLING: "forbidden"},
    "question": {OUTSIDER: "not_found"},
}
NO_TOKEN, REVOKED_KEY, REVOKED_DEVICE, ENROLL_KEY, DEVICE_ON_ADMIN = (
    "no token",
    "a revoked org key",
    "a revoked device",
    "an enrollment key",
    "a device token on an org method",
)
SCENARIOS = [
    NO_TOKEN,
    REVOKED_KEY,
    REVOKED_DEVICE,
    ENROLL_KEY,
    DEVICE_ON_ADMIN,
    OUTSIDER,
    INVITED,
    OUTSIDER_DEVICE,
    SIBLING,
    MEMBER,
]

# (method, scenario) -> the bug that makes its answer differ; left out of the assertion.
KNOWN: dict[tuple[str, str], str] = {}


def expected(method: str, scenario: str) -> str | None:
    """The answer ``method`` must give in ``scenario``: a data.type, "ok", or None (not asked)."""
    callers, rule = RULES[method]
    kinds = set(callers.split())
    if "public" in kinds:
        return {NO_TOKEN: "ok", REVOKED_KEY: "unauthorized", REVOKED_DEVICE: "unauthorized"}.get(
            scenario
        )
    if scenario in (NO_TOKEN, REVOKED_KEY, REVOKED_DEVICE):
        return "unauthorized"
    if scenario == ENROLL_KEY:
        return "forbidden"  # dispatch, or for devices.register a group the key is not bound to
    if scenario == DEVICE_ON_ADMIN:
        return "forbidden" if "device" not in kinds else None
    if scenario in (OUTSIDER, INVITED, MEMBER):
        # An invitation grants nothing until it is accepted: the invited org is an outsider.
        looks_like = OUTSIDER if scenario == INVITED else scenario
        return REFUSALS.get(rule, {}).get(looks_like) if "org" in kinds else "forbidden"
    if "device" not in kinds:
        return None  # an org method: DEVICE_ON_ADMIN covers device tokens
    return REFUSALS.get(rule, {}).get(scenario)


# --- the world -------------------------------------------------------------------------------


@dataclass
class Matrix:
    world: World
    outsider: object  # org C: in no federation with A
    invited: object  # org D: invited to A's federation, has not joined
    outsider_device: dict
    enroll_token: str
    revoked_key_token: str
    revoked_device_token: str
    unselected_device: dict  # A's, registered after every round's selection
    victim_device: dict  # A's, only ever named by calls that must be refused
    victim_key_id: str
    query_id: str
    bundle: bytes

    @property
    def a(self):
        return self.world.a

    @property
    def fed_id(self) -> str:
        return self.world.fed["id"]

    @property
    def model_id(self) -> str:
        return self.world.model["id"]

    @property
    def device(self) -> dict:
        """A's device whose record, state and jobs the scenarios name."""
        return self.world.a.devices[0]


async def build_matrix(client, org, other_org, outsider, invited, model, bundle) -> Matrix:
    world = await build_world(client, org, other_org, model, bundle)
    a = world.a
    await client.ok(
        "federations.invite", {"federation_id": world.fed["id"], "org_ids": [invited.id]}, org.token
    )
    asked = await client.ok(
        "federations.analytics.descriptive",
        {"federation_id": world.fed["id"], "variable": "walk"},
        org.token,
    )
    enroll = await client.ok("orgs.api_keys.create", {"name": "app", "scope": "enroll"}, org.token)
    victim_key = await client.ok("orgs.api_keys.create", {"name": "victim"}, org.token)
    await client.ok("orgs.api_keys.revoke", {"key_id": a.key["id"]}, org.token)
    await client.ok("devices.revoke", {"device_id": a.spare["device_id"]}, org.token)
    return Matrix(
        world=world,
        outsider=outsider,
        invited=invited,
        outsider_device=await register_device(client, outsider.token),
        enroll_token=enroll["token"],
        revoked_key_token=a.key["token"],
        revoked_device_token=a.spare["token"],
        unselected_device=await register_device(client, org.token),
        victim_device=await register_device(client, org.token),
        victim_key_id=victim_key["id"],
        query_id=asked["query_id"],
        bundle=bundle,
    )


def token_for(m: Matrix, method: str, scenario: str) -> str | None:
    _, rule = RULES[method]
    return {
        NO_TOKEN: None,
        REVOKED_KEY: m.revoked_key_token,
        REVOKED_DEVICE: m.revoked_device_token,
        ENROLL_KEY: m.enroll_token,
        DEVICE_ON_ADMIN: m.device["token"],
        OUTSIDER: m.outsider.token,
        INVITED: m.invited.token,
        OUTSIDER_DEVICE: m.outsider_device["token"],
        SIBLING: (m.unselected_device if rule == "round-device" else m.a.devices[1])["token"],
        MEMBER: m.world.b.org.token,
    }[scenario]


# --- params naming A's objects ----------------------------------------------------------------

_B64_KEY_1, _B64_KEY_2 = "AQ" * 21 + "A=", "Ag" * 21 + "A="  # 32 bytes each
_SID = "sag_" + "0" * 32
_ROW = {"variable": "walk", "value": 1.0, "recorded_at": "2026-01-01T00:00:00Z"}
Params = Callable[[Matrix], dict]

PARAMS: dict[str, Params] = {
    "analytics.report": lambda m: {"observations": [_ROW]},
    "devices.get": lambda m: {"device_id": m.device["device_id"]},
    "devices.groups.add_devices": lambda m: {
        "group_id": m.a.group_id,
        "device_ids": [m.victim_device["device_id"]],
    },
    "devices.groups.create": lambda m: {"name": "matrix"},
    "devices.groups.list": lambda m: {},
    "devices.list": lambda m: {"device_group_id": m.a.group_id},
    "devices.register": lambda m: {
        **json.loads(json.dumps(DEVICE_DEFAULTS)),
        "device_group_ids": [m.a.group_id],
    },
    "devices.revoke": lambda m: {"device_id": m.victim_device["device_id"]},
    "devices.rotate_token": lambda m: {},
    "devices.sync": lambda m: {"battery_pct": 50},
    "federations.analytics.anova": lambda m: {
        "federation_id": m.fed_id,
        "variable": "walk",
        "group_by": "federation_member",
    },
    "federations.analytics.chi_square": lambda m: {
        "federation_id": m.fed_id,
        "variable_1": "walk_a",
        "variable_2": "walk_b",
    },
    "federations.analytics.descriptive": lambda m: {"federation_id": m.fed_id, "variable": "walk"},
    "federations.analytics.queries.get": lambda m: {"query_id": m.query_id},
    "federations.analytics.queries.list": lambda m: {"federation_id": m.fed_id},
    "federations.analytics.t_test": lambda m: {
        "federation_id": m.fed_id,
        "variable": "walk",
        "group_by": "federation_member",
        "group_a": m.a.org.id,
        "group_b": m.world.b.org.id,
    },
    "federations.create": lambda m: {"name": "matrix", "org_id": m.a.org.id},
    "federations.get": lambda m: {"federation_id": m.fed_id},
    "federations.invite": lambda m: {"federation_id": m.fed_id, "org_ids": [m.outsider.id]},
    "federations.join": lambda m: {"federation_id": m.fed_id, "org_id": m.a.org.id},
    "federations.list": lambda m: {"org_id": m.a.org.id},
    "federations.members": lambda m: {"federation_id": m.fed_id},
    "federations.models.list": lambda m: {"federation_id": m.fed_id},
    "federations.models.share": lambda m: {"federation_id": m.fed_id, "model_id": m.model_id},
    "federations.privacy.estimate": lambda m: {
        "federation_id": m.fed_id,
        "noise_multiplier": 1.0,
        "sample_rate": 0.1,
        "num_steps": 10,
    },
    "federations.privacy.get": lambda m: {"federation_id": m.fed_id},
    "federations.privacy.history": lambda m: {"federation_id": m.fed_id},
    "federations.privacy.set_budget": lambda m: {
        "federation_id": m.fed_id,
        "total_epsilon_budget": 50.0,
    },
    "models.create": lambda m: {"name": "matrix"},
    "models.get": lambda m: {"model_id": m.model_id},
    "models.list": lambda m: {},
    "models.versions.create": lambda m: {"model_id": m.model_id, **inline(m.bundle)},
    "models.versions.download": lambda m: {"model_id": m.model_id, "version": 1},
    "models.versions.get": lambda m: {"model_id": m.model_id, "version": 1},
    "models.versions.list": lambda m: {"model_id": m.model_id},
    "models.versions.publish": lambda m: {"model_id": m.model_id, "version": 1},
    "orgs.api_keys.create": lambda m: {
        "name": "matrix",
        "scope": "enroll",
        "device_group_ids": [m.a.group_id],
    },
    "orgs.api_keys.list": lambda m: {},
    "orgs.api_keys.revoke": lambda m: {"key_id": m.victim_key_id},
    "orgs.get": lambda m: {"org_id": m.a.org.id},
    "rpc.discover": lambda m: {},
    "system.ping": lambda m: {},
    "system.version": lambda m: {},
    "training.aggregate": lambda m: {"round_id": m.world.mixed_round["id"]},
    "training.cancel_round": lambda m: {"round_id": m.world.group_round["id"]},
    "training.create_round": lambda m: {
        "model_id": m.model_id,
        "base_version": 1,
        "target_device_count": 2,
        "federation_id": m.fed_id,
    },
    "training.device_jobs.complete": lambda m: {"job_id": m.a.jobs[m.device["device_id"]]},
    "training.device_jobs.create": lambda m: {
        "job_type": "federated",
        "round_id": m.world.mixed_round["id"],
        "model_id": m.model_id,
        "base_version": 1,
    },
    "training.device_jobs.update_status": lambda m: {
        "job_id": m.a.jobs[m.device["device_id"]],
        "state": "downloading",
    },
    "training.get_round": lambda m: {"round_id": m.world.mixed_round["id"]},
    "training.get_round_progress": lambda m: {"round_id": m.world.mixed_round["id"]},
    "training.list_rounds": lambda m: {"federation_id": m.fed_id},
    "training.personalized.get": lambda m: {
        "model_id": m.model_id,
        "federation_id": m.fed_id,
        "device_id": m.device["device_id"],
    },
    "training.personalized.list": lambda m: {"federation_id": m.fed_id},
    "training.personalized.metrics": lambda m: {
        "model_id": m.model_id,
        "federation_id": m.fed_id,
        "device_id": m.device["device_id"],
    },
    "training.personalized.update": lambda m: {
        "model_id": m.model_id,
        "federation_id": m.fed_id,
        "personalization_type": "ditto",
        "metrics": {"matrix": 1.0},
    },
    "training.secagg.masked_vectors": lambda m: {
        "round_id": m.world.mixed_round["id"],
        "session_id": _SID,
        "masked_vector": "AAAAAAAAAAA=",
    },
    "training.secagg.setup": lambda m: {
        "round_id": m.world.mixed_round["id"],
        "pk1": _B64_KEY_1,
        "pk2": _B64_KEY_2,
    },
    "training.secagg.share_keys": lambda m: {
        "round_id": m.world.mixed_round["id"],
        "session_id": _SID,
        "ciphertexts": [],
    },
    "training.secagg.status": lambda m: {"round_id": m.world.mixed_round["id"]},
    "training.secagg.unmask": lambda m: {
        "round_id": m.world.mixed_round["id"],
        "session_id": _SID,
        "shares": [],
    },
    "training.select_devices": lambda m: {"round_id": m.world.group_round["id"]},
    "training.start_round": lambda m: {"round_id": m.world.group_round["id"]},
    "training.updates.by_device": lambda m: {"model_id": m.model_id},
    "training.updates.list": lambda m: {"model_id": m.model_id},
    "training.updates.stats": lambda m: {"model_id": m.model_id},
    "training.weights.upload": lambda m: upload_params(
        m.world.mixed_round, update_bytes(7), sample_count=3
    ),
    "uploads.create": lambda m: {"purpose": "weights", "size_bytes": 8, "sha256": "0" * 64},
}


# --- the tests -------------------------------------------------------------------------------


def test_every_method_declares_its_rule():
    registry = Registry.from_package()
    registered = {spec.name for spec in registry}
    missing, gone = sorted(registered - set(RULES)), sorted(set(RULES) - registered)
    assert not missing, (
        f"methods without an authorization rule: {missing}; add each to RULES (and PARAMS) "
        "in tests/methods/test_authorization_matrix.py"
    )
    assert not gone, f"RULES names methods that no longer exist: {gone}"
    assert set(PARAMS) == set(RULES)
    assert {rule for _, rule in RULES.values()} - {"public", "caller", "org", "device"} <= set(
        REFUSALS
    )
    for spec in registry:
        declared = set(RULES[spec.name][0].split())
        actual = {c.name.lower() for c in type(spec.allow) if c in spec.allow}
        assert declared == actual, f"{spec.name}: RULES says {declared}, the registry {actual}"


async def test_every_method_refuses_every_caller_it_must(
    client, org, other_org, make_org, mlp_model, mlp_bundle
):
    outsider, invited = await make_org("initech"), await make_org("hooli")
    m = await build_matrix(client, org, other_org, outsider, invited, mlp_model, mlp_bundle[1])
    mismatches, asked = [], 0
    for method in sorted(RULES):
        for scenario in SCENARIOS:
            want = expected(method, scenario)
            if want is None:
                continue
            asked += 1
            params = PARAMS[method](m)
            resp, body = await client.post(
                {"jsonrpc": "2.0", "method": method, "params": params, "id": 1},
                token_for(m, method, scenario),
            )
            error = body.get("error") if isinstance(body, dict) else None
            got = "ok" if error is None else error["data"]["type"]
            status_ok = resp.status == (401 if want == "unauthorized" else 200)
            if got == want and status_ok:
                continue
            known = KNOWN.get((method, scenario))
            line = (
                f"{method} as {scenario}: {got} (HTTP {resp.status}), want {want}"
                + (f" [known: {known}]" if known else "")
                + f"\n    {json.dumps(body)[:300]}"
            )
            mismatches.append((known, line))
    failing = [line for known, line in mismatches if not known]
    assert asked > 300, asked
    assert not failing, "\n".join([f"{len(failing)} of {asked} calls answered wrongly:", *failing])
