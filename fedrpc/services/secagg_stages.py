"""The five SecAgg+ calls (docs/secagg.md "Stages"): check, store, close what may close, answer.

Each call is one transaction on the locked session (:mod:`fedrpc.services.secagg_session`).
A replay of a stage a device completed gets the same answer (with what the
session learnt since: the forwarded bundles, the unmask request); the same
stage with other bytes is a ``conflict``; a call for a stage the session is
not in is ``precondition_failed`` with ``data.stage``.
"""

from __future__ import annotations

import secrets

import msgspec

from fedrpc.db import Database
from fedrpc.errors import BadRequest, Conflict, PreconditionFailed
from fedrpc.fl import InvalidInput
from fedrpc.fl.secagg import keys, shamir
from fedrpc.services import secagg_session as sess
from fedrpc.services.policy import counts_visible, weight_visible
from fedrpc.services.secagg_result import ShareRow
from fedrpc.services.secagg_session import View
from fedrpc.storage import Storage
from schemas.training.secagg import (
    Forwarded,
    MaskedVectorsResult,
    Neighbour,
    SessionConfig,
    SetupResult,
    Share,
    ShareKeysResult,
    StageCounts,
    Status,
    UnmaskResult,
)

_CONFIG_FIELDS = set(SessionConfig.__struct_fields__)


def _config(v: View) -> SessionConfig:
    return SessionConfig(**{k: val for k, val in v.session.config.items() if k in _CONFIG_FIELDS})


def _checked_key(value: bytes, field: str) -> bytes:
    try:
        return keys.check_public_key(value)
    except InvalidInput as exc:
        raise BadRequest(f"{field}: {exc}", field=field) from None


class _Keys(msgspec.Struct):
    idx: int | None = None
    pk1: bytes = b""
    pk2: bytes = b""


def _participant(v: View, device_id: str, done: int, stage: str) -> sess.Participant:
    me = v.me(device_id)
    if me is None or me.idx is None or me.done < done:
        raise PreconditionFailed(
            f"this device did not complete the stages before {stage}; it dropped from the session",
            stage=v.session.stage,
        )
    return me


async def setup(
    db: Database,
    storage: Storage,
    round_id: str,
    device_id: str,
    org_id: str,
    pk1: bytes,
    pk2: bytes,
) -> SetupResult:
    async with db.transaction() as tx:
        target = await sess.open_target(tx, round_id, device_id, org_id)
        v = await sess.advance(
            tx, storage, await sess.view(tx, await sess.start(tx, target)), target
        )
        me = v.me(device_id)
        if me is None:
            if v.session.stage != "setup":
                raise sess.wrong_stage(v.session, "setup")
            _checked_key(pk1, "pk1"), _checked_key(pk2, "pk2")
            if pk1 == pk2:
                raise BadRequest("pk1 and pk2 must be different keys", field="pk2")
            if await tx.value(
                "training.secagg.find_key_taken", session_id=v.session.id, pk1=pk1, pk2=pk2
            ):
                raise BadRequest("another device of the session advertised this key", field="pk1")
            await tx.run(
                "training.secagg.insert_participant",
                session_id=v.session.id,
                device_id=device_id,
                org_id=org_id,
                pk1=pk1,
                pk2=pk2,
            )
            v = await sess.advance(tx, storage, await sess.view(tx, v.session), target)
            me = v.me(device_id)
        else:
            mine = await tx.get(
                "training.secagg.find_participant",
                _Keys,
                session_id=v.session.id,
                device_id=device_id,
            )
            if (mine.pk1, mine.pk2) != (pk1, pk2):
                raise Conflict("this device advertised other keys for this session")
        answer = SetupResult(
            session_id=v.session.id,
            stage=v.session.stage,
            stage_deadline=v.session.stage_deadline,
            config=_config(v),
        )
        if me.idx is not None:
            answer.index = me.idx
            answer.neighbours = [
                Neighbour(index=k.idx, pk1=k.pk1, pk2=k.pk2)
                for k in await tx.all(
                    "training.secagg.list_participant_keys",
                    _Keys,
                    session_id=v.session.id,
                    indices=list(v.nbrs[me.idx]),
                )
            ]
        return answer


async def _stage_view(
    tx: Database, storage: Storage, round_id: str, device_id: str, org_id: str, session_id: str
) -> tuple[View, sess.Target]:
    target = await sess.open_target(tx, round_id, device_id, org_id)
    session = await sess.existing(tx, round_id, session_id)
    return await sess.advance(tx, storage, await sess.view(tx, session), target), target


def _stage_after(v: View, stage: str) -> bool:
    """Has the session closed ``stage`` successfully (it is at a later stage, or completed)?"""
    now = v.session.stage
    return now == "completed" or (now in sess.DONE and sess.DONE[now] > sess.DONE[stage])


async def share_keys(
    db: Database,
    storage: Storage,
    round_id: str,
    device_id: str,
    org_id: str,
    session_id: str,
    ciphertexts: list,
) -> ShareKeysResult:
    given = {c.receiver: c.bundle for c in ciphertexts}
    async with db.transaction() as tx:
        v, target = await _stage_view(tx, storage, round_id, device_id, org_id, session_id)
        me = _participant(v, device_id, 0, "share_keys")
        if me.done >= 1:
            stored = await tx.all(
                "training.secagg.list_bundles_from_sender",
                dict,
                session_id=v.session.id,
                sender=me.idx,
            )
            if {r["receiver"]: bytes(r["bundle"]) for r in stored} != given or len(given) != len(
                ciphertexts
            ):
                raise Conflict("this device handed in other bundles for stage 1")
        else:
            if v.session.stage != "share_keys":
                raise sess.wrong_stage(v.session, "share_keys")
            wanted = set(v.nbrs[me.idx])
            if len(given) != len(ciphertexts) or set(given) != wanted:
                raise BadRequest(
                    "stage 1 takes exactly one bundle per neighbour", field="ciphertexts"
                )
            await tx.run(
                "training.secagg.insert_bundles",
                session_id=v.session.id,
                sender=me.idx,
                receivers=list(given),
                bundles=list(given.values()),
            )
            await _completed(tx, v, device_id, "share_keys")
            v = await sess.advance(tx, storage, await sess.view(tx, v.session), target)
        answer = ShareKeysResult(
            session_id=v.session.id,
            stage=v.session.stage,
            status="waiting",
            stage_deadline=v.session.stage_deadline,
        )
        if _stage_after(v, "share_keys"):
            answer.status = "ready"
            rows = await tx.all(
                "training.secagg.list_bundles_to_receiver",
                dict,
                session_id=v.session.id,
                receiver=me.idx,
            )
            answer.ciphertexts = [
                Forwarded(sender=r["sender"], bundle=bytes(r["bundle"])) for r in rows
            ]
        return answer


async def _completed(tx: Database, v: View, device_id: str, stage: str) -> None:
    await tx.run(
        "training.secagg.update_participant_stage",
        session_id=v.session.id,
        device_id=device_id,
        stage=stage,
    )


async def vector_size(
    db: Database, round_id: str, device_id: str, org_id: str, session_id: str
) -> int:
    """The exact byte length of this device's masked vector, once the policy lets it take part
    in the round's session: checked before any upload of it is read."""
    await sess.open_target(db, round_id, device_id, org_id)
    cfg = await db.get(
        "training.secagg.find_session_config",
        _Config,
        round_id=round_id,
        session_id=session_id,
        missing="no SecAgg+ session with this id for the round",
    )
    return vector_bytes(cfg.config)


class _Config(msgspec.Struct):
    config: dict


def vector_bytes(config: dict) -> int:
    """``(d + 1) * b / 8``: the masked vector's wire length."""
    return (config["dimension"] + 1) * config["modulus_bits"] // 8


async def masked_vectors(
    db: Database,
    storage: Storage,
    round_id: str,
    device_id: str,
    org_id: str,
    session_id: str,
    data: bytes | None,
    digest: str | None,
) -> MaskedVectorsResult:
    """Stage 2. ``data`` is None on a replay through an upload this device already used
    (its bytes are gone: only ``digest`` must match what it handed in) and on a poll of a
    device that handed in its vector (neither bytes nor digest)."""
    stored = None
    if data is not None:
        # Before the lock, so that no other call of the session waits for S3. A fresh key per
        # write: an object is only ever named by the row written after it, so what a replay or
        # a refused call leaves behind is an orphan the storage collector deletes, never an
        # object a row already names (docs/design.md, storage lifecycle).
        stored = await storage.put(
            f"secagg/{round_id}/{session_id}/vectors/{device_id}-{digest[:32]}"
            f"-{secrets.token_hex(6)}",
            data,
        )
    async with db.transaction() as tx:
        v, target = await _stage_view(tx, storage, round_id, device_id, org_id, session_id)
        me = _participant(v, device_id, 1, "masked_vectors")
        if me.done >= 2:
            handed_in = await tx.value(
                "training.secagg.find_vector_sha256", session_id=v.session.id, sender=me.idx
            )
            if digest is not None and handed_in != digest:
                raise Conflict("this device handed in another masked vector")
        elif data is None:
            if digest is not None:
                raise Conflict("masked_vector: the upload has already been used", field="upload_id")
            raise BadRequest("give masked_vector or upload_id", field="masked_vector")
        else:
            if v.session.stage != "masked_vectors":
                raise sess.wrong_stage(v.session, "masked_vectors")
            cfg = v.session.config
            size = vector_bytes(cfg)
            if len(data) != size:
                raise BadRequest(
                    f"the masked vector must be {size} bytes: d + 1 words of "
                    f"{cfg['modulus_bits']} bits",
                    field="masked_vector",
                    size_bytes=size,
                )
            await tx.run(
                "training.secagg.insert_vector",
                session_id=v.session.id,
                sender=me.idx,
                object_key=stored.key,
                size_bytes=len(data),
                sha256=digest,
            )
            await _completed(tx, v, device_id, "masked_vectors")
            v = await sess.advance(tx, storage, await sess.view(tx, v.session), target)
        answer = MaskedVectorsResult(
            session_id=v.session.id,
            stage=v.session.stage,
            status="accepted",
            stage_deadline=v.session.stage_deadline,
        )
        if _stage_after(v, "masked_vectors"):
            answer.survivors, answer.dropped = sess.unmask_request(v, me.idx)
        return answer


def _check_shares(v: View, index: int, shares: list[Share]) -> list[int]:
    """The owners device ``index`` was asked about, once its answer holds only what was asked."""
    survivors, dropped = sess.unmask_request(v, index)
    kinds = {j: "self" for j in survivors} | {j: "key" for j in dropped}
    owners = [s.owner for s in shares]
    if len(set(owners)) != len(owners):
        raise BadRequest("a share is given twice for one device", field="shares")
    for s in shares:
        if kinds.get(s.owner) != s.kind:
            raise BadRequest(
                "a share that was not asked for: answer the unmask request only", field="shares"
            )
        if int.from_bytes(s.share, "big") >= shamir.PRIME:
            raise BadRequest("a share is not an element of the field", field="shares")
    return survivors + dropped


async def unmask(
    db: Database,
    storage: Storage,
    round_id: str,
    device_id: str,
    org_id: str,
    session_id: str,
    shares: list[Share],
) -> UnmaskResult:
    given = {(s.owner, s.kind, s.share) for s in shares}
    async with db.transaction() as tx:
        v, target = await _stage_view(tx, storage, round_id, device_id, org_id, session_id)
        me = _participant(v, device_id, 2, "unmask")
        if me.done >= 3:
            rows = await tx.all(
                "training.secagg.list_shares_from_holder",
                ShareRow,
                session_id=v.session.id,
                holder=me.idx,
            )
            mine = {(r.owner, r.kind, bytes(r.share)) for r in rows}
            if mine != given or len(given) != len(shares):
                raise Conflict("this device handed in other shares for stage 3")
        elif v.session.stage in ("completed", "failed"):
            pass  # the session ended without this answer: it is not stored, the outcome is told
        else:
            if v.session.stage != "unmask":
                raise sess.wrong_stage(v.session, "unmask")
            asked = _check_shares(v, me.idx, shares)
            await tx.run(
                "training.secagg.update_share_counts",
                session_id=v.session.id,
                asked=asked,
                given=[s.owner for s in shares],
            )
            await tx.run(
                "training.secagg.insert_shares",
                session_id=v.session.id,
                holder=me.idx,
                owners=[s.owner for s in shares],
                kinds=[s.kind for s in shares],
                shares=[s.share for s in shares],
            )
            await _completed(tx, v, device_id, "unmask")
            v = await sess.advance(tx, storage, await sess.view(tx, v.session), target)
        status = {"completed": "completed", "failed": "failed"}.get(v.session.stage, "waiting")
        return UnmaskResult(
            session_id=v.session.id,
            stage=v.session.stage,
            status=status,
            shares_received=sum(p.received for p in v.parts),
            threshold=v.session.config["threshold"],
            failure_reason=v.session.failure_reason,
        )


async def status(db: Database, storage: Storage, round_id: str, org_id: str) -> Status:
    """The session as an organization that may read the round sees it: counts (none on a
    round with differential privacy), device ids of its own organization only."""
    async with db.transaction() as tx:
        target = await tx.get(
            "training.secagg.find_secagg_target",
            sess.Target,
            round_id=round_id,
            device_id="",
            org_id=org_id,
        )
        if target.secagg_config is None:
            raise PreconditionFailed("the round has no secure_aggregation", state=target.state)
        session = await sess.locked(tx, round_id)
        if session is None:
            return Status(
                round_id=round_id,
                stage="not_started",
                threshold=target.secagg_config.get("threshold"),
                survivors=[],
                dropped=[],
            )
        v = await sess.advance(tx, storage, await sess.view(tx, session), target)
    s, cfg = v.session, v.session.config
    # Alive: completed every stage before the current one (a finished session: stage 2).
    alive_from = {"setup": 0, "share_keys": 0, "masked_vectors": 1}.get(s.stage, 2)
    if s.stage == "failed":
        alive_from = min(max([p.done for p in v.parts] or [0]), 2)
    alive = [p for p in v.parts if p.done >= alive_from]
    gone = [p for p in v.parts if p.done < alive_from]
    answer = Status(
        session_id=s.id,
        round_id=s.round_id,
        stage=s.stage,
        stage_deadline=s.stage_deadline,
        threshold=cfg.get("threshold"),
        survivors=sorted(p.device_id for p in alive if p.org_id == org_id),
        dropped=sorted(p.device_id for p in gone if p.org_id == org_id),
        failure_reason=s.failure_reason,
    )
    if counts_visible(target.dp_config):
        counts = [sum(1 for p in v.parts if p.done >= i) for i in range(4)]
        answer.devices, answer.neighbours = cfg.get("devices"), cfg.get("neighbours")
        answer.counts = StageCounts(
            setup=counts[0], share_keys=counts[1], masked_vectors=counts[2], unmask=counts[3]
        )
        answer.survivors_count, answer.dropped_count = len(alive), len(gone)
    if weight_visible(target.dp_config, target.federation_id):
        answer.total_weight = s.total_weight
    return answer
