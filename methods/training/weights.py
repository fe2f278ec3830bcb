"""training.weights.upload: a selected device hands in its update for a running round.

Everything is checked before anything is stored: the round and the device's
place in it, what the device claims (its sample_count against the round's
cap, its metric names against the server's own), then the tensors
themselves (decoded in a worker thread, the file's header compared with the
manifest before any tensor is read). An update of at most
``row_update_max_bytes`` is kept in its row; a larger one goes to the
artifact store under a fresh key first, then one row to Postgres; if the row
cannot be written the object is deleted again, so neither exists without the
other.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime
from typing import Any

import msgspec

from fedrpc.auth import new_id
from fedrpc.context import Context
from fedrpc.db import constraint_message, jsonb
from fedrpc.errors import BadRequest, Conflict, PayloadTooLarge, PreconditionFailed
from fedrpc.fl.metrics import SERVER_PREFIXES, reserved_names
from fedrpc.fl.tensors import (
    MAX_ABS_VALUE,
    TensorSpec,
    check_bounded,
    decode_state_dict,
    decode_update,
    manifest_from_json,
    update_norm,
)
from fedrpc.registry import DEVICE, rpc_method
from fedrpc.services.payloads import payload_bytes
from fedrpc.services.policy import check_round_device
from fedrpc.services.storage_gc import delete_unnamed
from schemas.training.weights import Update, UploadParams

ROUND_DEVICE_KEY = "training_updates_round_device_key"
constraint_message(ROUND_DEVICE_KEY, "this device has already uploaded an update for this round")

# Wire size of one element per declared dtype (bfloat16 travels as 2 bytes).
_ITEM_BYTES = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
    "bool": 1,
}
# Headers, names and (torch) zip and pickle framing on top of the raw tensor bytes.
_FRAMING_BYTES, _FRAMING_PER_TENSOR = 64 * 1024, 4 * 1024


class _Target(msgspec.Struct):
    id: str
    model_id: str
    base_version: int
    state: str
    update_format: str
    deadline_at: datetime | None
    max_sample_count: int
    max_update_norm: float | None
    base_weights_key: str | None
    open: bool
    selected: bool
    revoked: bool
    member: bool
    manifest: list[dict[str, Any]]


@rpc_method(DEVICE)
async def upload(ctx: Context, p: UploadParams) -> Update:
    """Validate the round, the device's selection, its claims and every tensor, then store the bytes and one row.

    Refusals: unknown round `not_found`; a device not selected for the round, or
    whose organization is no longer an active member of the round's federation,
    `forbidden`; a model, version or update_format other than the round's
    `bad_request`; a round that is not running or whose deadline has passed
    (by the database clock) `precondition_failed` with `data.state`: an upload
    racing `training.aggregate` either committed before the round was claimed
    (and is in the new version) or is refused so (`data.state` "aggregating"
    or later); if that aggregation gave the round back meanwhile, `conflict`
    (upload again).
    What the device claims is bounded (the offer in `devices.sync` states the
    bounds): a `sample_count` above the round's `max_sample_count` is refused
    with `bad_request` (`data.field = "sample_count"`, `data.max_sample_count`),
    not clipped; metric names the server reports itself (`dp_*`, `server_*`,
    `num_clipped`, ...) `bad_request` with `data.names`. Weights are
    safetensors: the `torch` encoding is refused for device updates with
    `bad_request` (its loader allocates before shapes can be checked).
    Tensors whose names, shapes or dtypes differ from the base version's
    manifest (checked on the file's header, before any tensor is read), or
    holding NaN, inf or values of magnitude above 1e12, `bad_request`; with a
    `max_update_norm`, an update whose delta (for update_format "weights",
    the difference to the base version) has a larger L2 norm `bad_request`
    (`data.max_update_norm`, `data.update_norm`), not clipped; bytes well
    beyond what the manifest needs `payload_too_large`; a second update from
    the same device `conflict`.
    """
    target = await _open_target(ctx, p)
    _check_claims(target, p)
    manifest = manifest_from_json(target.manifest)
    async with payload_bytes(ctx, {"weights": p.weights}, "weights") as blobs:
        data = blobs["weights"]
        if len(data) > _max_update_bytes(manifest):
            raise PayloadTooLarge(
                "weights: far larger than the tensors of the base version need", field="weights"
            )
        base = await _norm_base(ctx, target)
        await asyncio.to_thread(_check_update, data, p.encoding, manifest, target, base)
        return await _store(ctx, p, data)


def _check_claims(target: _Target, p: UploadParams) -> None:
    if p.sample_count > target.max_sample_count:
        raise BadRequest(
            f"sample_count is above the round's max_sample_count {target.max_sample_count}",
            field="sample_count",
            max_sample_count=target.max_sample_count,
        )
    reserved = reserved_names(p.metrics)
    if reserved:
        raise BadRequest(
            "metrics may not use the names of the server's own metrics",
            field="metrics",
            names=reserved,
            reserved_prefixes=list(SERVER_PREFIXES),
        )


async def _norm_base(ctx: Context, target: _Target) -> bytes | None:
    """The base version's weights, needed only to bound the norm of a full-weights update."""
    if target.max_update_norm is None or target.update_format != "weights":
        return None
    if target.base_weights_key is None:
        raise PreconditionFailed("the round's base version has no stored weights")
    return await ctx.storage.get(target.base_weights_key)


async def _find_target(ctx: Context, p: UploadParams) -> _Target:
    return await ctx.db.get(
        "training.weights.find_upload_target",
        _Target,
        round_id=p.round_id,
        device_id=ctx.device_id,
        org_id=ctx.org_id,
        missing="no round with this id",
    )


async def _open_target(ctx: Context, p: UploadParams) -> _Target:
    target = await _find_target(ctx, p)
    check_round_device(selected=target.selected, revoked=target.revoked, member=target.member)
    if (p.model_id, p.version) != (target.model_id, target.base_version):
        raise BadRequest(
            f"the round trains version {target.base_version} of model {target.model_id}",
            model_id=target.model_id,
            version=target.base_version,
        )
    if p.update_format != target.update_format:
        raise BadRequest(
            f"the round expects update_format {target.update_format!r}",
            update_format=target.update_format,
        )
    if not target.open:
        _refuse_closed(target)
    return target


def _refuse_closed(target: _Target) -> None:
    if target.state == "running":
        raise PreconditionFailed(
            "the round's deadline has passed", state=target.state, deadline_at=target.deadline_at
        )
    raise PreconditionFailed(
        f"the round is {target.state}; uploads need it running",
        state=target.state,
        allowed=["running"],
    )


def _max_update_bytes(manifest: list[TensorSpec]) -> int:
    return (
        sum(s.size * _ITEM_BYTES[s.dtype] + _FRAMING_PER_TENSOR for s in manifest) + _FRAMING_BYTES
    )


def _check_update(
    data: bytes, encoding: str, manifest: list[TensorSpec], target: _Target, base: bytes | None
) -> None:
    """Decode and check the tensors and, if the round bounds it, their norm (worker thread)."""
    state = decode_update(data, encoding, manifest, field="weights")
    check_bounded(state, MAX_ABS_VALUE)
    if target.max_update_norm is None:
        return
    base_state = None if base is None else decode_state_dict(base, "safetensors", field="base")
    norm = update_norm(state, manifest, base_state)
    if norm > target.max_update_norm:
        raise BadRequest(
            "the update's L2 norm is above the round's max_update_norm",
            field="weights",
            max_update_norm=target.max_update_norm,
            update_norm=norm,
        )


async def _store(ctx: Context, p: UploadParams, data: bytes) -> Update:
    update_id = new_id("upd")
    # A fresh key per attempt (the update id): a refused duplicate never overwrites the accepted object.
    key = f"updates/{p.round_id}/{update_id}"
    if len(data) <= ctx.settings.row_update_max_bytes:  # kept in the row (migration 0015)
        return await _insert(ctx, p, update_id, key, hashlib.sha256(data).hexdigest(), data)
    stored = await ctx.storage.put(key, data)
    try:
        return await _insert(ctx, p, update_id, stored.key, stored.sha256, None, stored.size_bytes)
    except BaseException:
        await delete_unnamed(ctx.db, ctx.storage, [stored.key])
        raise


async def _insert(
    ctx: Context,
    p: UploadParams,
    update_id: str,
    key: str,
    sha256: str,
    data: bytes | None,
    size_bytes: int | None = None,
) -> Update:
    row = await ctx.db.maybe(
        "training.weights.insert_update",
        Update,
        id=update_id,
        round_id=p.round_id,
        device_id=ctx.device_id,
        org_id=ctx.org_id,
        sample_count=p.sample_count,
        encoding=p.encoding,
        object_key=key,
        sha256=sha256,
        size_bytes=len(data) if data is not None else size_bytes,
        metrics=jsonb(p.metrics),
        loss=p.metrics.get("loss"),
        accuracy=p.metrics.get("accuracy"),
        data=data,
    )
    if row is None:  # the round closed (or the deadline passed) while the bytes were checked
        target = await _find_target(ctx, p)
        check_round_device(selected=target.selected, revoked=target.revoked, member=target.member)
        if target.open:
            # Closed for an aggregation that has given the round back since.
            raise Conflict(
                "the round was being aggregated when this update arrived and is open again; "
                "upload it again",
                state=target.state,
            )
        _refuse_closed(target)
    return row
