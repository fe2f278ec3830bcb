"""training.secagg.*: the SecAgg+ stages a device calls (0-3) and the session's status.

The rules live in fedrpc/services/secagg_stages.py and secagg_session.py
(docs/secagg.md); these handlers only name the caller.
"""

from __future__ import annotations

import hashlib

from fedrpc.context import Context
from fedrpc.registry import DEVICE, ORG, rpc_method
from fedrpc.services import secagg_stages
from fedrpc.services.payloads import payload_bytes, used_upload_sha256
from fedrpc.services.policy import round_for_reading
from schemas.models.versions import Payload
from schemas.training.secagg import (
    MaskedVectorsParams,
    MaskedVectorsResult,
    SetupParams,
    SetupResult,
    ShareKeysParams,
    ShareKeysResult,
    Status,
    StatusParams,
    UnmaskParams,
    UnmaskResult,
)


@rpc_method(DEVICE)
async def setup(ctx: Context, p: SetupParams) -> SetupResult:
    """Register the device's keys; once stage 0 closes, answer its index and neighbours.

    The first call starts the round's session. Refusals: a device not selected
    for the round `forbidden`; a round without secure_aggregation or not running
    `precondition_failed`; `pk1 == pk2` or a key another device advertised
    `bad_request`; other keys on a replay `conflict`; stage 0 closed
    `precondition_failed` with `data.stage`. Replays answer again, with the
    neighbours once stage 0 closed (devices poll this way).
    """
    return await secagg_stages.setup(
        ctx.db, ctx.storage, p.round_id, ctx.device_id, ctx.org_id, p.pk1, p.pk2
    )


@rpc_method(DEVICE)
async def share_keys(ctx: Context, p: ShareKeysParams) -> ShareKeysResult:
    """Store one 160-byte bundle per neighbour; once stage 1 closes, forward those addressed to it.

    `bad_request` for another session's id or a bundle set that is not one per
    neighbour; `precondition_failed` out of stage; other bundles on a replay `conflict`.
    """
    return await secagg_stages.share_keys(
        ctx.db, ctx.storage, p.round_id, ctx.device_id, ctx.org_id, p.session_id, p.ciphertexts
    )


@rpc_method(DEVICE)
async def masked_vectors(ctx: Context, p: MaskedVectorsParams) -> MaskedVectorsResult:
    """Accept the masked vector; once stage 2 closes, answer the unmask request.

    The vector is exactly `(d + 1) * b / 8` bytes (`bad_request` otherwise),
    inline or through an upload of purpose `secagg_vector`; once it is in, a device
    polls with neither.
    """
    stage = (ctx.db, ctx.storage, p.round_id, ctx.device_id, ctx.org_id, p.session_id)
    if p.masked_vector is None and p.upload_id is None:  # a poll once the vector is in
        return await secagg_stages.masked_vectors(*stage, None, None)
    if p.upload_id is not None and (replayed := await used_upload_sha256(ctx, p.upload_id)):
        return await secagg_stages.masked_vectors(*stage, None, replayed)
    # Who may call and how long the vector is, before a byte of an upload is read.
    size = await secagg_stages.vector_size(*stage[:1], *stage[2:])
    vector = {"masked_vector": Payload(data=p.masked_vector, upload_id=p.upload_id)}
    async with payload_bytes(ctx, vector, "secagg_vector", {"masked_vector": size}) as blobs:
        data = blobs["masked_vector"]
        return await secagg_stages.masked_vectors(*stage, data, hashlib.sha256(data).hexdigest())


@rpc_method(DEVICE)
async def unmask(ctx: Context, p: UnmaskParams) -> UnmaskResult:
    """Store the shares asked for; reconstruct, unmask and store the average once t shares exist.

    Shares not asked for, twice for one device, or not field elements are `bad_request`.
    """
    return await secagg_stages.unmask(
        ctx.db, ctx.storage, p.round_id, ctx.device_id, ctx.org_id, p.session_id, p.shares
    )


@rpc_method(ORG)
async def status(ctx: Context, p: StatusParams) -> Status:
    """The session's stage and counts; device ids of the caller's own organization only."""
    await round_for_reading(ctx, p.round_id)
    return await secagg_stages.status(ctx.db, ctx.storage, p.round_id, ctx.org_id)
