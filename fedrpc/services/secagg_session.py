"""SecAgg+ sessions, the server's side of docs/secagg.md over the pure kernels.

One session per secure round, started by the first ``training.secagg.setup``.
Every stage call runs in one transaction holding the session row's lock
(``FOR UPDATE``), so calls of one session take turns across processes and a
restart loses nothing: keys, bundles, shares and stage counts are rows, the
masked vectors objects in S3.

A stage closes when every device still in the session has handed in its part,
or when the stage deadline (``secure_aggregation.stage_seconds``, database
clock, never after the round's deadline) has passed; whichever call comes
first after that closes it (devices poll by replaying their last call). A
device that misses a stage has dropped for the rest of the session. A stage
that closes with fewer than the minimum of devices (``min_survivors``, default
``max(3, t, min_updates)``) fails the session with the reason, and so does a
needed secret that cannot get ``t`` shares any more. Once every needed secret
has ``t`` shares, :mod:`fedrpc.services.secagg_result` reconstructs, unmasks
and stores the weighted average.

A call reads the ``n`` participant rows with their stage-3 counters, never
the ``n k`` bundles or shares: the cost of a call grows with the cohort, not
with its square.
"""

from __future__ import annotations

import functools
import secrets
from datetime import datetime
from typing import Any

import msgspec

from fedrpc.auth import new_id
from fedrpc.db import Database, jsonb
from fedrpc.errors import BadRequest, PreconditionFailed
from fedrpc.fl import InvalidInput
from fedrpc.fl import secagg as fl_secagg
from fedrpc.fl.secagg import graph, quantize
from fedrpc.fl.tensors import FLOATING_DTYPES, manifest_from_json
from fedrpc.services import secagg_result
from fedrpc.services.policy import check_secagg_device
from fedrpc.storage import Storage

STAGES = ("setup", "share_keys", "masked_vectors", "unmask")
DONE = {stage: i for i, stage in enumerate(STAGES)}  # participant.stage: last stage completed


class Target(msgspec.Struct):
    id: str
    org_id: str
    state: str
    secagg_config: dict[str, Any] | None
    dp_config: dict[str, Any] | None
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
    round_past_deadline: bool


class Participant(msgspec.Struct):
    device_id: str
    org_id: str
    idx: int | None
    stage: str
    holders: int = 0
    asked: int = 0
    received: int = 0
    done: int = 0  # DONE[stage]: the last stage completed, as a number


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


def _initial_config(session_id: str, target: Target) -> dict[str, Any]:
    sc, dp = target.secagg_config or {}, target.dp_config
    manifest = manifest_from_json(target.manifest)
    floating = [s for s in manifest if s.dtype in FLOATING_DTYPES]
    dimension = sum(s.size for s in floating)
    bits = sc.get("quantization_bits", 16)
    try:
        if dp is None:
            clip, max_weight, norm_bound = sc.get("clip", 1.0), target.max_sample_count, None
        else:
            # DP-FedAvg weighs every device alike and bounds each one's L2 norm by C.
            clip, max_weight = dp["clipping_norm"], 1
            norm_bound = quantize.l2_norm_bound(clip, bits, dimension)
        # DP sums are folded (quantize.dp_sum): honest sums must stay within half the modulus.
        headroom = 1 if dp is None else 2
        spec = quantize.make_spec(headroom * max(target.selected_count, 3), clip, bits, max_weight)
        if dp is not None and spec.modulus_bits != 32:
            raise InvalidInput(
                f"a DP round of {target.selected_count} devices at {bits} quantization bits "
                "needs more than a 32-bit modulus; lower quantization_bits"
            )
    except InvalidInput as exc:
        raise PreconditionFailed(f"the round's secure_aggregation cannot run: {exc}") from None
    threshold = sc.get("threshold")
    return {
        "session_id": session_id,
        **fl_secagg.PRIMITIVES,
        "update_format": target.update_format,
        "clip": spec.clip,
        "l2_norm_bound": norm_bound,
        "quantization_bits": spec.bits,
        "max_weight": spec.max_weight,
        "modulus_bits": spec.modulus_bits,
        "dimension": dimension,
        "tensors": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in floating],
        "threshold": threshold,
        "requested_neighbours": sc.get("neighbours"),
        "dropout_fraction": sc.get("dropout_fraction", 1 / 3),
        "corruption_fraction": sc.get("corruption_fraction", 0.05),
        "min_updates": target.min_updates,
        "min_survivors": sc.get("min_survivors"),
    }


def minimum_of(cfg: dict[str, Any]) -> int:
    """The fewest devices a stage may close with: as configured, else max(3, t, min_updates)
    (``t`` as far as known: before stage 0 closes a default ``t`` is not chosen yet)."""
    if cfg.get("min_survivors"):
        return cfg["min_survivors"]
    return max(3, cfg.get("threshold") or 2, cfg.get("min_updates", 1))


def graph_of(n: int, cfg: dict[str, Any]) -> tuple[int, int]:
    """``(k, t)`` for ``n`` devices: as configured, else the defaults for the session's
    tolerated dropout and collusion (graph.default_parameters). A ``k`` given without ``t``
    takes a majority of the neighbours, ``t = k // 2 + 1``."""
    params = graph.default_parameters(
        n, cfg.get("dropout_fraction", 1 / 3), cfg.get("corruption_fraction", 0.05)
    )
    requested = cfg.get("requested_neighbours")
    k = graph.effective_degree(n, requested or params.k)
    t = cfg.get("threshold") or (k // 2 + 1 if requested else min(params.t, k))
    return k, t


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


async def locked(db: Database, round_id: str) -> Session | None:
    """The round's session, locked for this transaction (None before the first setup)."""
    return await db.maybe("training.secagg.get_session_for_update", Session, round_id=round_id)


async def start(db: Database, target: Target) -> Session:
    """The round's session, locked, started now if this is the first setup call."""
    session = await locked(db, target.id)
    if session is None:
        sid = new_id("sag")
        await db.run(
            "training.secagg.insert_session",
            id=sid,
            round_id=target.id,
            config=jsonb(_initial_config(sid, target)),
            stage_seconds=(target.secagg_config or {}).get("stage_seconds", 300),
        )
        session = await locked(db, target.id)
    return session


async def existing(db: Database, round_id: str, session_id: str) -> Session:
    """The round's session, locked; a call naming another session is refused."""
    session = await locked(db, round_id)
    if session is None:
        raise PreconditionFailed(
            "the round's SecAgg+ session has not started: call training.secagg.setup first",
            stage="none",
        )
    if session_id != session.id:
        raise BadRequest("session_id is not the round's SecAgg+ session", field="session_id")
    return session


@functools.lru_cache(maxsize=16)
def _graph(n: int, k: int, seed: bytes, session_id: str) -> dict[int, tuple[int, ...]]:
    # Rebuilt from the stored seed by any process; cached because every call needs it.
    return graph.neighbours(n, k, graph.graph_seed(seed, session_id))


class _Columns(msgspec.Struct):
    device_id: list[str]
    org_id: list[str]
    idx: list[int | None]
    stage: list[str]
    holders: list[int]
    asked: list[int]
    received: list[int]


async def view(db: Database, session: Session) -> View:
    c = await db.get("training.secagg.get_participant_columns", _Columns, session_id=session.id)
    parts = [
        Participant(*row, DONE[row[3]])
        for row in zip(
            c.device_id, c.org_id, c.idx, c.stage, c.holders, c.asked, c.received, strict=True
        )
    ]
    nbrs: dict[int, tuple[int, ...]] = {}
    if session.seed is not None:
        cfg = session.config
        nbrs = _graph(cfg["devices"], cfg["neighbours"], session.seed, session.id)
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


def _private(s: Session) -> bool:
    # A DP round's device counts are shown to nobody (policy.counts_visible): nor in reasons.
    return s.config.get("l2_norm_bound") is not None


async def _fail_short(db: Database, s: Session, what: str, have: int, minimum: int) -> None:
    late = "the round's deadline passed and " if s.round_past_deadline else ""
    if _private(s):
        await _fail(db, s, f"{late}{what} closed with fewer devices than the session needs")
        return
    await _fail(db, s, f"{late}{what} closed with {have} devices; the session needs {minimum}")


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
        v = await view(db, await locked(db, v.session.round_id))
    return v


async def _close_step(db: Database, storage: Storage, v: View, target: Target) -> bool:
    s, cfg = v.session, v.session.config
    minimum = minimum_of(cfg)
    if s.stage == "setup":
        n = len(v.parts)
        if n < target.selected_count and not s.past_deadline:
            return False
        if n < minimum:
            await _fail_short(db, s, "stage 0 (setup)", n, minimum)
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
        await _fail_short(db, s, f"stage {previous + 1} ({s.stage})", len(done), minimum)
        return True
    if s.stage == "masked_vectors":
        await _count_holders(db, v)
    await _next(db, s, STAGES[previous + 2])
    return True


async def _close_setup(db: Database, v: View) -> None:
    s, cfg = v.session, dict(v.session.config)
    ordered = sorted(v.parts, key=lambda p: p.device_id.encode())
    n = len(ordered)
    k, t = graph_of(n, cfg)
    if t > k:
        told = "" if _private(s) else f" {k}"
        await _fail(db, s, f"the threshold {t} is above the{told} neighbours each device has")
        return
    await db.run(
        "training.secagg.update_participant_indices",
        session_id=s.id,
        device_ids=[p.device_id for p in ordered],
        indices=list(range(1, n + 1)),
    )
    cfg.update(devices=n, neighbours=k, threshold=t)
    await _next(db, s, "share_keys", seed=secrets.token_bytes(32), config=cfg)


async def _count_holders(db: Database, v: View) -> None:
    """At stage 2's close: how many surviving neighbours hold shares of each needed secret."""
    completers, survivors = v.indexed(1), v.indexed(2)
    owners = sorted(completers)
    await db.run(
        "training.secagg.update_participant_holders",
        session_id=v.session.id,
        indices=owners,
        holders=[sum(1 for j in v.nbrs[o] if j in survivors) for o in owners],
    )


def unmask_request(v: View, index: int) -> tuple[list[int], list[int]]:
    """What device ``index`` is asked in stage 3: self-mask shares of its surviving neighbours,
    mask-key shares of its neighbours that dropped after stage 1 (never both for one)."""
    completers, survivors = v.indexed(1), v.indexed(2)
    mine = [j for j in v.nbrs.get(index, ()) if j in completers]
    return [j for j in mine if j in survivors], [j for j in mine if j not in survivors]


async def _try_unmask(db: Database, storage: Storage, v: View, target: Target) -> bool:
    s, t = v.session, v.session.config["threshold"]
    completers, survivors = v.indexed(1), v.indexed(2)
    # Each needed secret: the survivors' self-mask secrets, the dropped completers' mask keys.
    short = [p for p in completers.values() if p.received < t]
    everyone_answered = len(v.indexed(3)) == len(survivors)
    if not short:
        failure = await secagg_result.finish(db, storage, s, v.nbrs, completers, survivors, target)
        if failure is None:
            return True
        if failure.may_wait and not (everyone_answered or s.past_deadline):
            return False  # a wrong share: the answers still to come may outvote it
        await _fail(db, s, failure.reason)
        return True
    hopeless = [p for p in short if p.received + p.holders - p.asked < t]
    if hopeless or s.past_deadline or everyone_answered:
        owner = (hopeless or short)[0]
        what = "self-mask secret" if owner.idx in survivors else "mask key"
        late = "the round's deadline passed: " if s.round_past_deadline else ""
        await _fail(
            db,
            s,
            f"{late}the {what} of device index {owner.idx} cannot get the {t} shares it needs",
        )
        return True
    return False
