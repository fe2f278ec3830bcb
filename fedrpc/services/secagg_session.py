"""SecAgg+ sessions, the server's side of docs/secagg.md over the pure kernels.

One session per secure round, started by the first ``training.secagg.setup``.
Every stage call runs in one transaction holding the session row's lock
(``FOR UPDATE``), so calls of one session take turns across processes and a
restart loses nothing: keys, bundles, masked vectors and shares are rows.

A stage closes when every device still in the session has handed in its part,
or when the stage deadline (``secure_aggregation.stage_seconds``, database
clock) has passed; whichever call comes first after that closes it (devices
poll by replaying their last call). A device that misses a stage has dropped
for the rest of the session. A stage that closes with fewer than the minimum
of devices (``min_survivors``, default ``max(3, t, min_updates)``) fails the
session with the reason, and so does a needed secret that cannot get ``t``
shares. Once every needed secret has ``t`` shares, the server reconstructs,
unmasks and dequantizes on a worker thread and stores the weighted average
(safetensors, the round's update format) for ``training.aggregate``.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime
from typing import Any

import msgspec
import numpy as np

from fedrpc.auth import new_id
from fedrpc.db import Database, jsonb
from fedrpc.errors import BadRequest, PreconditionFailed
from fedrpc.fl import InvalidInput
from fedrpc.fl import secagg as fl_secagg
from fedrpc.fl.secagg import graph, keys, masking, quantize, shamir
from fedrpc.fl.tensors import (
    FLOATING_DTYPES,
    decode_state_dict,
    encode_safetensors,
    manifest_from_json,
    unflatten,
)
from fedrpc.services.policy import check_secagg_device
from fedrpc.services.update_loop import UpdateRow
from fedrpc.storage import Storage

STAGES = ("setup", "share_keys", "masked_vectors", "unmask")
DONE = {stage: i for i, stage in enumerate(STAGES)}  # participant.stage: last stage completed


class Target(msgspec.Struct):
    id: str
    org_id: str
    state: str
    secagg_config: dict[str, Any] | None
    update_format: str
    max_sample_count: int
    min_updates: int
    model_id: str
    base_version: int
    federation_id: str | None
    selected: bool
    revoked: bool
    member: bool
    selected_count: int
    manifest: list[dict[str, Any]]


class Session(msgspec.Struct):
    id: str
    round_id: str
    stage: str
    seed: bytes | None
    config: dict[str, Any]
    stage_seconds: int
    stage_deadline: datetime
    failure_reason: str | None
    result_key: str | None
    result_sha256: str | None
    total_weight: int | None
    survivors: int | None
    past_deadline: bool


class Participant(msgspec.Struct):
    device_id: str
    org_id: str
    idx: int | None
    pk1: bytes
    pk2: bytes
    stage: str

    @property
    def done(self) -> int:
        return DONE[self.stage]


class ShareRow(msgspec.Struct):
    holder: int
    owner: int
    kind: str
    share: bytes


class View(msgspec.Struct):
    """A locked session with its participants and, once stage 0 closed, its graph."""

    session: Session
    parts: list[Participant]
    nbrs: dict[int, tuple[int, ...]]

    def me(self, device_id: str) -> Participant | None:
        return next((p for p in self.parts if p.device_id == device_id), None)

    def indexed(self, done: int) -> dict[int, Participant]:
        """Participants with an index that completed at least stage ``done``."""
        return {p.idx: p for p in self.parts if p.idx is not None and p.done >= done}


def _minimum(config: dict[str, Any]) -> int:
    return config["min_survivors"]


def _initial_config(session_id: str, target: Target) -> dict[str, Any]:
    sc = target.secagg_config or {}
    manifest = manifest_from_json(target.manifest)
    floating = [s for s in manifest if s.dtype in FLOATING_DTYPES]
    try:
        spec = quantize.make_spec(
            max(target.selected_count, 3),
            sc.get("clip", 1.0),
            sc.get("quantization_bits", 16),
            target.max_sample_count,
        )
    except InvalidInput as exc:
        raise PreconditionFailed(f"the round's secure_aggregation cannot run: {exc}") from None
    threshold = sc["threshold"]
    return {
        "session_id": session_id,
        **fl_secagg.PRIMITIVES,
        "update_format": target.update_format,
        "clip": spec.clip,
        "quantization_bits": spec.bits,
        "max_weight": spec.max_weight,
        "modulus_bits": spec.modulus_bits,
        "dimension": sum(s.size for s in floating),
        "tensors": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in floating],
        "threshold": threshold,
        "max_devices": target.selected_count,
        "requested_neighbours": sc.get("neighbours"),
        "min_survivors": sc.get("min_survivors") or max(3, threshold, target.min_updates),
    }


def spec_of(config: dict[str, Any]) -> quantize.QuantSpec:
    return quantize.QuantSpec(
        clip=config["clip"],
        bits=config["quantization_bits"],
        max_weight=config["max_weight"],
        modulus_bits=config["modulus_bits"],
    )


async def open_target(db: Database, round_id: str, device_id: str, org_id: str) -> Target:
    """The round, once the policy lets this device take part in its session."""
    target = await db.get(
        "training.secagg.find_secagg_target",
        Target,
        round_id=round_id,
        device_id=device_id,
        org_id=org_id,
        missing="no round with this id",
    )
    check_secagg_device(
        secure=target.secagg_config is not None,
        state=target.state,
        selected=target.selected,
        revoked=target.revoked,
        member=target.member,
    )
    return target


async def _locked(db: Database, round_id: str) -> Session | None:
    return await db.maybe("training.secagg.get_session_for_update", Session, round_id=round_id)


async def start(db: Database, target: Target) -> Session:
    """The round's session, locked, started now if this is the first setup call."""
    session = await _locked(db, target.id)
    if session is None:
        sid = new_id("sag")
        await db.run(
            "training.secagg.insert_session",
            id=sid,
            round_id=target.id,
            config=jsonb(_initial_config(sid, target)),
            stage_seconds=(target.secagg_config or {}).get("stage_seconds", 300),
        )
        session = await _locked(db, target.id)
    return session


async def existing(db: Database, round_id: str, session_id: str | None) -> Session:
    """The round's session, locked; a call naming another session is refused."""
    session = await _locked(db, round_id)
    if session is None:
        raise PreconditionFailed(
            "the round's SecAgg+ session has not started: call training.secagg.setup first",
            stage="none",
        )
    if session_id is not None and session_id != session.id:
        raise BadRequest("session_id is not the round's SecAgg+ session", field="session_id")
    return session


async def view(db: Database, session: Session) -> View:
    parts = await db.all("training.secagg.list_participants", Participant, session_id=session.id)
    nbrs: dict[int, tuple[int, ...]] = {}
    if session.seed is not None:
        cfg = session.config
        nbrs = graph.neighbours(
            cfg["devices"], cfg["neighbours"], graph.graph_seed(session.seed, session.id)
        )
    return View(session, parts, nbrs)


def wrong_stage(session: Session, wanted: str) -> PreconditionFailed:
    return PreconditionFailed(
        f"the SecAgg+ session is at stage {session.stage}; this call belongs to stage {wanted}",
        stage=session.stage,
        allowed=[wanted],
    )


async def _fail(db: Database, session: Session, reason: str) -> None:
    await db.run("training.secagg.update_session_failed", session_id=session.id, reason=reason)
    await db.run("training.secagg.update_round_due_now", round_id=session.round_id)


async def _next(db: Database, session: Session, stage: str, **extra: Any) -> None:
    await db.run(
        "training.secagg.update_session_stage",
        session_id=session.id,
        stage=stage,
        seed=extra.get("seed"),
        config=jsonb(extra["config"]) if "config" in extra else None,
    )


async def advance(db: Database, storage: Storage, v: View, target: Target) -> View:
    """Close every stage that may close now (all in, or the deadline passed); the new view."""
    while v.session.stage in STAGES:
        if not await _close_step(db, storage, v, target):
            return v
        session = await _locked(db, v.session.round_id)
        v = await view(db, session)
    return v


async def _close_step(db: Database, storage: Storage, v: View, target: Target) -> bool:
    s, cfg = v.session, v.session.config
    minimum = _minimum(cfg)
    if s.stage == "setup":
        n = len(v.parts)
        if n < target.selected_count and not s.past_deadline:
            return False
        if n < minimum:
            await _fail(
                db, s, f"stage 0 (setup) closed with {n} devices; the session needs {minimum}"
            )
            return True
        await _close_setup(db, v)
        return True
    if s.stage == "unmask":
        return await _try_unmask(db, storage, v, target)
    previous = DONE[s.stage] - 1
    active, done = v.indexed(previous), v.indexed(previous + 1)
    if len(done) < len(active) and not s.past_deadline:
        return False
    if len(done) < minimum:
        await _fail(
            db,
            s,
            f"stage {previous + 1} ({s.stage}) closed with {len(done)} devices; "
            f"the session needs {minimum}",
        )
        return True
    await _next(db, s, STAGES[previous + 2])
    return True


async def _close_setup(db: Database, v: View) -> None:
    s, cfg = v.session, dict(v.session.config)
    ordered = sorted(v.parts, key=lambda p: p.device_id.encode())
    n, t = len(ordered), cfg["threshold"]
    k = graph.effective_degree(n, cfg["requested_neighbours"] or graph.default_parameters(n).k)
    if t > k:
        await _fail(db, s, f"the threshold {t} is above the {k} neighbours each device has")
        return
    await db.run(
        "training.secagg.update_participant_indices",
        session_id=s.id,
        device_ids=[p.device_id for p in ordered],
        indices=list(range(1, n + 1)),
    )
    cfg.update(devices=n, neighbours=k)
    await _next(db, s, "share_keys", seed=secrets.token_bytes(32), config=cfg)


def unmask_request(v: View, index: int) -> tuple[list[int], list[int]]:
    """What device ``index`` is asked in stage 3: self-mask shares of its surviving neighbours,
    mask-key shares of its neighbours that dropped after stage 1 (never both for one)."""
    completers, survivors = v.indexed(1), v.indexed(2)
    mine = [j for j in v.nbrs.get(index, ()) if j in completers]
    return [j for j in mine if j in survivors], [j for j in mine if j not in survivors]


async def _try_unmask(db: Database, storage: Storage, v: View, target: Target) -> bool:
    s, cfg = v.session, v.session.config
    t = cfg["threshold"]
    completers, survivors = v.indexed(1), v.indexed(2)
    answered = set(v.indexed(3))
    rows = await db.all("training.secagg.list_shares", ShareRow, session_id=s.id)
    got: dict[tuple[str, int], dict[int, bytes]] = {}
    for r in rows:
        got.setdefault((r.kind, r.owner), {})[r.holder] = r.share
    short = []
    for owner in completers:
        kind = "self" if owner in survivors else "key"
        holders = [j for j in v.nbrs[owner] if j in survivors]
        have = len(got.get((kind, owner), {}))
        pending = sum(1 for j in holders if j not in answered)
        if have < t:
            short.append((owner, kind, have + pending))
    if not short:
        await _finish(db, storage, v, target, got)
        return True
    hopeless = [o for o in short if o[2] < t]
    if hopeless or s.past_deadline or len(answered) == len(survivors):
        owner, kind, _ = (hopeless or short)[0]
        what = "self-mask secret" if kind == "self" else "mask key"
        await _fail(db, s, f"the {what} of device index {owner} cannot get the {t} shares it needs")
        return True
    return False


async def _finish(
    db: Database,
    storage: Storage,
    v: View,
    target: Target,
    got: dict[tuple[str, int], dict[int, bytes]],
) -> None:
    s = v.session
    vectors = {
        r["sender"]: bytes(r["data"])
        for r in await db.all("training.secagg.list_vectors", dict, session_id=s.id)
    }
    base = await db.get(
        "training.aggregate.find_base_artifacts",
        _Base,
        model_id=target.model_id,
        version=target.base_version,
        missing="the base version is gone",
    )
    base_bytes = await storage.get(base.weights_key)
    try:
        data, weight = await asyncio.to_thread(
            reconstruct, s, v.nbrs, v.indexed(1), v.indexed(2), vectors, got, base, base_bytes
        )
    except InvalidInput as exc:
        await _fail(db, s, f"unmasking failed: {exc}")
        return
    stored = await storage.put(f"secagg/{s.round_id}/{s.id}/mean.safetensors", data)
    await db.run(
        "training.secagg.update_session_completed",
        session_id=s.id,
        result_key=stored.key,
        result_sha256=stored.sha256,
        total_weight=weight,
        survivors=len(vectors),
    )
    await db.run("training.secagg.update_round_due_now", round_id=s.round_id)


class _Base(msgspec.Struct):
    manifest: list[dict[str, Any]]
    weights_key: str


def reconstruct(
    s: Session,
    nbrs: dict[int, tuple[int, ...]],
    completers: dict[int, Participant],
    survivors: dict[int, Participant],
    vectors: dict[int, bytes],
    got: dict[tuple[str, int], dict[int, bytes]],
    base: _Base,
    base_bytes: bytes,
) -> tuple[bytes, int]:
    """The survivors' weighted average as safetensors and their total weight (worker thread)."""
    cfg, sid = s.config, s.id
    t, bits, d = cfg["threshold"], cfg["modulus_bits"], cfg["dimension"]
    alive = sorted(survivors)
    dropped = sorted(set(completers) - set(survivors))
    b_of = dict(zip(alive, shamir.combine_many([got[("self", i)] for i in alive], t), strict=True))
    sk_of = {}
    if dropped:
        sets = [got[("key", j)] for j in dropped]
        sk_of = dict(zip(dropped, shamir.combine_many(sets, t), strict=True))
    pairs = [
        (i, j, keys.pairwise_mask_seed(keys.agree(sk_of[j], survivors[i].pk1), sid, i, j))
        for j in dropped
        for i in nbrs[j]
        if i in survivors
    ]
    selfs = [keys.self_mask_seed(b_of[i], sid, i) for i in alive]
    ys = [masking.unpack(vectors[i], bits, d + 1) for i in alive]
    total = masking.unmask(masking.sum_vectors(ys, bits), selfs, pairs, bits)
    mean, weight = quantize.dequantize(total, spec_of(cfg))
    manifest = manifest_from_json(base.manifest)
    base_state = decode_state_dict(base_bytes, "safetensors", field="base weights")
    state = unflatten(mean.astype(np.float32), manifest, base_state)
    return encode_safetensors(state), weight


class Outcome(msgspec.Struct):
    id: str
    stage: str
    failure_reason: str | None
    result_key: str | None
    result_sha256: str | None
    total_weight: int | None
    survivors: int | None
    survivor_orgs: list[str]
    participant_orgs: list[str]


async def session_result(db: Database, round_id: str, state: str) -> tuple[UpdateRow, Outcome]:
    """A secure round's aggregate input: its completed session's weighted average as the one
    'update' the FedAvg family combines (weighted by the survivors' total weight)."""
    found = await db.maybe("training.secagg.find_session_result", Outcome, round_id=round_id)
    if found is None or found.stage != "completed":
        stage = "none" if found is None else found.stage
        raise PreconditionFailed(
            "a secure-aggregation round is aggregated from its completed SecAgg+ session; "
            f"the session is {'not started' if found is None else stage}",
            state=state,
            session_stage=stage,
        )
    row = UpdateRow(
        id=found.id,
        device_id="",
        object_key=found.result_key,
        sha256=found.result_sha256,
        sample_count=found.total_weight,
        encoding="safetensors",
        metrics={},
    )
    return row, found
