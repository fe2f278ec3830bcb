"""Aggregating a round into a new model version, with its I/O around the pure kernels.

The round is claimed in Postgres (running -> aggregating, :class:`Claim`: a
token and a lease renewed while the aggregation works) so two callers cannot
both aggregate it and a crashed worker's round is taken over once its lease
ran out. The claim fixes the round's set of updates: an upload commits before
it or finds the round aggregating and is refused. The update loop runs in a
worker thread (:mod:`fedrpc.services.update_loop`), so do the new version's
bytes (:mod:`fedrpc.services.version_artifacts`). The new version's objects are
written first, then one transaction stores the version (and the server
optimiser state of its lineage) and completes the round, an UPDATE guarded by
the claim: if the round was cancelled or taken over meanwhile, nothing is
published. Any failure leaves no version row and no object behind. A private
round was charged to its federation's privacy ledger when its devices were
drawn (:mod:`fedrpc.services.selection`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
from typing import Any

import msgspec
import numpy as np

from fedrpc.db import Database
from fedrpc.errors import BadRequest, NotFound, PreconditionFailed
from fedrpc.fl import InvalidInput
from fedrpc.fl.aggregate import check_strategy
from fedrpc.fl.metrics import version_metrics
from fedrpc.fl.tensors import decode_state_dict, encode_safetensors, manifest_from_json
from fedrpc.services.artifact_sandbox import SANDBOX
from fedrpc.services.policy import (
    check_federation_round,
    check_round_mix,
    check_secure_round,
)
from fedrpc.services.rounds import Claim, ClaimLost
from fedrpc.services.secagg_result import session_result
from fedrpc.services.selection import poisson_selected
from fedrpc.services.storage_gc import delete_unnamed
from fedrpc.services.update_loop import RoundFailed, UpdateRow, cap_sample_counts, compute
from fedrpc.services.version_artifacts import encode_weights, export_graphs
from fedrpc.services.versions import publish_version
from fedrpc.settings import Settings
from fedrpc.storage import Storage
from schemas.federations import Federation
from schemas.models.versions import ModelVersion
from schemas.training import Round

log = logging.getLogger("fedrpc.services.round_aggregation")
# FEDRPC_AGGREGATION_LEASE_SECONDS's default, for callers without settings at hand.
LEASE_SECONDS = Settings().aggregation_lease_seconds


class BaseArtifacts(msgspec.Struct):
    manifest: list[dict[str, Any]]
    input_shape: list[int | None]
    weights_key: str
    program_key: str
    program_sha256: str
    onnx_key: str


class StateRow(msgspec.Struct):
    strategy: str
    version: int
    parent_version: int | None
    object_key: str
    sha256: str


async def _server_state(
    db: Database, storage: Storage, rnd: Round, strategy: str
) -> dict[str, np.ndarray]:
    """The optimiser state of the round's lineage: the one computed with its base version by
    the same strategy; none (a fresh start) for a base version made any other way."""
    row = await db.maybe(
        "training.aggregate.find_server_state",
        StateRow,
        model_id=rnd.model_id,
        version=rnd.base_version,
    )
    if row is None or row.strategy != strategy:
        return {}
    data = await storage.get(row.object_key)
    if hashlib.sha256(data).hexdigest() != row.sha256:
        raise RoundFailed("the server optimiser state changed in storage since it was written")
    return decode_state_dict(data, "safetensors", field="server state")


async def aggregate_round(
    db: Database,
    storage: Storage,
    round_id: str,
    *,
    strategy: str | None = None,
    params: dict[str, float] | None = None,
    min_updates: int | None = None,
    publish: bool = True,
    lease_seconds: float = LEASE_SECONDS,
) -> ModelVersion:
    """Aggregate a running round into a new version of its model (a draft unless publish).

    The round's rules are checked before it is claimed (a round that cannot be aggregated
    is never closed to uploads) and again on the updates the claim fixed.
    """
    rnd = await db.get(
        "training.aggregate.get_round", Round, round_id=round_id, missing="no round with this id"
    )
    name = strategy or rnd.strategy
    secure = None
    if rnd.secagg_config is not None:
        # The completed SecAgg+ session's weighted average is the round's one input.
        check_secure_round(name, update_format=rnd.update_format, private=rnd.dp_config is not None)
        secure = await session_result(db, rnd.id, rnd.state)
    federation = None
    if rnd.federation_id is not None:
        federation = await db.get(
            "training.get_round_federation", Federation, federation_id=rnd.federation_id
        )
        check_federation_round(federation, strategy=name, private=rnd.dp_config is not None)
    try:
        full_params = check_strategy(
            name,
            params if params is not None else rnd.strategy_params,
            dp=rnd.dp_config is not None,
        )
    except InvalidInput as exc:
        raise BadRequest(str(exc)) from None
    needed = min_updates or rnd.min_updates
    await _inputs(db, rnd, secure, federation, needed, "training.aggregate.list_round_update_heads")
    claim = Claim(db, round_id, lease_seconds)
    await claim.take()
    try:
        # The set of updates is fixed now: an upload committed before the claim, or it finds
        # the round aggregating and is refused (the claim's UPDATE waits for its row lock).
        rows, count = await _inputs(
            db, rnd, secure, federation, needed, "training.aggregate.list_round_updates"
        )
        async with claim.renewed():
            return await _aggregate_claimed(
                db, storage, claim, rnd, name, full_params, rows, publish, num_updates=count
            )
    except ClaimLost:
        # Cancelled or taken over: the other party owns the round's state now.
        raise await claim.lost_error() from None
    except (RoundFailed, NotFound) as exc:
        # These will not pass by retrying: the round fails with the reason.
        await claim.fail(exc.message)
        raise
    except InvalidInput as exc:
        # Strategy parameters impossible for this many updates: retry with others.
        await claim.release()
        raise BadRequest(str(exc)) from None
    except BaseException:
        # Storage down, a lost connection, a bug: leave the round retryable.
        await claim.release()
        raise


async def _inputs(
    db: Database,
    rnd: Round,
    secure: tuple | None,
    federation: Federation | None,
    needed: int,
    query: str,
) -> tuple[list[UpdateRow], int]:
    """The round's inputs and their count, once they meet its rules."""
    if secure is None:
        rows = cap_sample_counts(
            await db.all(query, UpdateRow, round_id=rnd.id), rnd.max_sample_count
        )
        count = len(rows)
    else:
        rows, count = [secure[0]], secure[1].survivors
    if count < needed:
        if rnd.dp_config is not None:  # a private round's update count is not published
            raise PreconditionFailed(
                f"the round has fewer updates than the {needed} it needs",
                state=rnd.state,
                min_updates=needed,
            )
        raise PreconditionFailed(
            f"the round has {count} updates and needs {needed}",
            state=rnd.state,
            received=count,
            min_updates=needed,
        )
    if federation is not None:
        # The federation's floor holds whatever min_updates the caller asked for.
        if secure is None:
            mix = await db.get(
                "training.get_round_mix", _Mix, round_id=rnd.id, update_ids=[r.id for r in rows]
            )
        else:
            mix = _Mix(secure[1].survivor_orgs, secure[1].participant_orgs)
        check_round_mix(
            federation, mix.update_orgs, mix.selected_orgs, private=rnd.dp_config is not None
        )
    return rows, count


class _Mix(msgspec.Struct):
    update_orgs: list[str]
    selected_orgs: list[str]


async def _aggregate_claimed(
    db: Database,
    storage: Storage,
    claim: Claim,
    rnd: Round,
    strategy: str,
    params: dict,
    rows: list[UpdateRow],
    publish: bool,
    *,
    num_updates: int,
) -> ModelVersion:
    base = await db.get(
        "training.aggregate.find_base_artifacts",
        BaseArtifacts,
        model_id=rnd.model_id,
        version=rnd.base_version,
        missing="the base version is gone",
    )
    manifest = manifest_from_json(base.manifest)
    if rnd.dp_config is not None:
        await _require_charged(db, rnd)
    base_bytes, program_bytes, server_state = await asyncio.gather(
        storage.get(base.weights_key),
        storage.get(base.program_key),
        _server_state(db, storage, rnd, strategy),
    )
    outcome, new_state = await asyncio.to_thread(
        compute,
        storage,
        rnd,
        strategy,
        params,
        rows,
        manifest,
        base_bytes,
        server_state,
        checkpoint=claim.check,
    )
    await claim.renew()  # still ours before anything is written
    metrics = version_metrics([(r.metrics, r.sample_count) for r in rows], outcome.metrics)
    private = rnd.dp_config is not None
    if private:
        # A DP version publishes nothing un-noised that depends on single devices: no update
        # count, sample total, client metrics or number clipped (docs/privacy.md).
        metrics = dict(outcome.metrics)
    state_object = None
    if outcome.server_state:
        key = f"models/{rnd.model_id}/server-state/{secrets.token_hex(12)}.safetensors"
        state_object = await storage.put(key, encode_safetensors(outcome.server_state))

    async def along_with(tx: Database, version: int) -> None:
        if state_object is not None:
            await tx.run(
                "training.aggregate.insert_server_state",
                model_id=rnd.model_id,
                version=version,
                parent_version=rnd.base_version,
                strategy=strategy,
                object_key=state_object.key,
                sha256=state_object.sha256,
            )
        # Guarded by the claim: a round cancelled meanwhile, or taken over after this
        # aggregation's lease ran out, gets no version from it (the transaction rolls back
        # and every object written above is deleted).
        await claim.complete(tx, version)

    # The graphs are made on one worker thread while the weights are encoded on
    # another and written: their objects do not wait for the ONNX model.
    graphs = asyncio.ensure_future(
        SANDBOX.in_own_threads(
            export_graphs,
            program_bytes,
            base.program_sha256,
            functools.partial(storage.get_blocking, base.onnx_key),
            manifest,
            new_state,
            owner=rnd.org_id,
        )
    )
    try:
        weights = await asyncio.to_thread(encode_weights, new_state)
        return await publish_version(
            db,
            storage,
            rnd.model_id,
            {**weights, "onnx": _part(graphs, "onnx"), "program": _part(graphs, "program")},
            manifest=base.manifest,
            input_shape=base.input_shape,
            parent_version=rnd.base_version,
            round_id=rnd.id,
            strategy=strategy,
            num_updates=0 if private else num_updates,
            total_samples=0 if private else sum(r.sample_count for r in rows),
            metrics=metrics,
            published=publish,
            along_with=along_with,
        )
    except BaseException:
        await asyncio.gather(
            graphs, return_exceptions=True
        )  # never leave the thread's error unread
        await delete_unnamed(db, storage, [state_object.key] if state_object else [])
        raise


async def _part(graphs: asyncio.Future[dict[str, bytes]], kind: str) -> bytes:
    return (await graphs)[kind]


async def _require_charged(db: Database, rnd: Round) -> None:
    """A private round was charged to its federation's ledger when its devices were drawn
    (services/selection.py), at the rate the Poisson draw used; one that was not cannot be
    accounted and fails."""
    charged = poisson_selected(rnd) and await db.value(
        "training.find_round_charged", federation_id=rnd.federation_id, round_id=rnd.id
    )
    if not charged:
        raise RoundFailed(
            "a differentially private round must be selected by Poisson sampling "
            "(training.select_devices), which charges it, to be aggregated"
        )
