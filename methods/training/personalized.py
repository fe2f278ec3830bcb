"""training.personalized.*: per-device personalized state (Ditto, FedPer, local fine-tuning).

One state per (device, model, federation); a state outside any federation is
keyed with federation_id ''. A device writes and reads only its own state. An
organization reads (never writes) the states of a federation it owns or is an
active member of, and, outside federations, the states of its own devices; it
names the device with `device_id` in get and metrics. Only the device and its
own organization get a download link for the weights.

Weights are decoded (safetensors or weights-only torch), checked and stored
re-encoded as safetensors under a fresh key: first the object, then the row in
one transaction; a failed write deletes the new object, a committed write
deletes the object it replaced. What the weights must hold:

- ditto and local_finetune: a whole personalized model, exactly the tensors
  (names, shapes, dtypes) of the model's latest version;
- fedper: exactly the tensors named in head_layers (the personal layers kept on
  the device; Arivazhagan et al. 2019), each as in that manifest.

Every floating value must be finite. head_layers, for every type, may only
name tensors of the latest version's manifest.

`weights_key` exists to keep the stored weights while replacing the rest of the
state, and so it must equal the state's current key: a device can never point
its state at an object it did not write for that same state (another device's
weights, a model artifact, an upload).
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta

from fedrpc.access import federation_for_member, model_for_reading
from fedrpc.context import Context
from fedrpc.db import jsonb
from fedrpc.errors import BadRequest, Forbidden, NotFound, PreconditionFailed
from fedrpc.fl.tensors import (
    TensorSpec,
    check_finite,
    check_matches,
    decode_state_dict,
    encode_safetensors,
    manifest_from_json,
)
from fedrpc.payloads import payload_bytes
from fedrpc.registry import DEVICE, ORG, ORG_OR_DEVICE, rpc_method
from fedrpc.storage import StoredObject
from schemas.models import Model
from schemas.models.versions import ModelVersion
from schemas.training.personalized import (
    GetParams,
    GetResult,
    ListParams,
    ListResult,
    MetricsParams,
    MetricsResult,
    PersonalizedState,
    UpdateParams,
    UpdateResult,
)

_SHOWN_NAMES = 20


@rpc_method(DEVICE)
async def update(ctx: Context, p: UpdateParams) -> UpdateResult:
    """Create or replace this device's state; the same result either way, with `created` telling which.

    Refusals: a model the device's organization may not read, or a federation
    it is not an active member of (or the model is not in), `forbidden`;
    weights or head_layers that do not fit the model's latest version, or
    NaN/inf values, `bad_request`; a model without versions, or a weights_key
    that is not this state's current key, `precondition_failed`.
    """
    model = await model_for_reading(ctx, p.model_id)
    if p.federation_id is not None:
        await _require_federation(ctx, model, p.federation_id)
    manifest = await _manifest(ctx, p) if p.weights is not None or p.head_layers else []
    async with payload_bytes(
        ctx, {} if p.weights is None else {"weights": p.weights}, "personalization"
    ) as blobs:
        stored = await _store_weights(ctx, p, manifest, blobs["weights"]) if blobs else None
        try:
            old, state = await _write_state(ctx, p, stored)
        except BaseException:
            await ctx.storage.delete_quietly([stored.key] if stored else [])
            raise
    if old is not None and old.weights_key not in (None, state.weights_key):
        await ctx.storage.delete_quietly([old.weights_key])
    return UpdateResult(created=old is None, state=state)


async def _require_federation(ctx: Context, model: Model, federation_id: str) -> None:
    await federation_for_member(ctx, federation_id)
    if model.org_id != ctx.org_id and not await ctx.db.value(
        "training.find_model_in_federation", model_id=model.id, federation_id=federation_id
    ):
        raise Forbidden("the model is not shared into this federation")


async def _manifest(ctx: Context, p: UpdateParams) -> list[TensorSpec]:
    """The latest version's manifest; every head layer must be one of its tensors."""
    version = await ctx.db.maybe(
        "models.versions.get_version", ModelVersion, model_id=p.model_id, version=None
    )
    if version is None:
        raise PreconditionFailed(
            "the model has no version yet; personalized weights are checked against one"
        )
    manifest = manifest_from_json(
        [{"name": s.name, "shape": s.shape, "dtype": s.dtype} for s in version.manifest]
    )
    names = {s.name for s in manifest}
    unknown = [n for n in p.head_layers if n not in names]
    if unknown:
        raise BadRequest(
            f"head_layers names tensors that version {version.version} of the model does not have",
            field="head_layers",
            names=unknown[:_SHOWN_NAMES],
        )
    return manifest


def _checked_weights(data: bytes, encoding: str, expected: list[TensorSpec]) -> bytes:
    """Decode, check and re-encode the weights (runs in a worker thread)."""
    state = decode_state_dict(data, encoding, field="weights")
    check_matches(state, expected)
    check_finite(state)
    return encode_safetensors(state)


async def _store_weights(
    ctx: Context, p: UpdateParams, manifest: list[TensorSpec], data: bytes
) -> StoredObject:
    heads = set(p.head_layers)
    expected = (
        [s for s in manifest if s.name in heads] if p.personalization_type == "fedper" else manifest
    )
    checked = await asyncio.to_thread(_checked_weights, data, p.weights_encoding, expected)
    # A fresh key per write: the replaced object stays readable until the new row commits.
    key = f"personalized/{ctx.device_id}/{p.model_id}/{p.federation_id or '-'}/{secrets.token_hex(12)}.safetensors"
    return await ctx.storage.put(key, checked)


async def _write_state(
    ctx: Context, p: UpdateParams, stored: StoredObject | None
) -> tuple[PersonalizedState | None, PersonalizedState]:
    ids = {
        "device_id": ctx.device_id,
        "model_id": p.model_id,
        "federation_id": p.federation_id or "",
    }
    async with ctx.db.transaction() as tx:
        await tx.run("training.personalized.lock_state", **ids)
        old = await tx.maybe("training.personalized.find_state", PersonalizedState, **ids)
        weights = {"weights_key": None, "weights_sha256": None, "weights_size_bytes": None}
        if stored is not None:
            weights = {
                "weights_key": stored.key,
                "weights_sha256": stored.sha256,
                "weights_size_bytes": stored.size_bytes,
            }
        elif p.weights_key is not None:
            _require_kept_weights(p, old)
            weights = {
                "weights_key": old.weights_key,
                "weights_sha256": old.weights_sha256,
                "weights_size_bytes": old.weights_size_bytes,
            }
        state = await tx.get(
            "training.personalized.upsert_state",
            PersonalizedState,
            **ids,
            **weights,
            personalization_type=p.personalization_type,
            metrics=jsonb(p.metrics),
            head_layers=jsonb(p.head_layers),
            round_number=p.round_number,
        )
    return old, state


def _require_kept_weights(p: UpdateParams, old: PersonalizedState | None) -> None:
    if old is None or old.weights_key != p.weights_key:
        raise PreconditionFailed(
            "weights_key must be the key of this state's current weights",
            field="weights_key",
            weights_key=old.weights_key if old else None,
        )
    # The stored weights were checked for their type (and, for fedper, their head layers).
    if old.personalization_type != p.personalization_type or (
        p.personalization_type == "fedper" and sorted(old.head_layers) != sorted(p.head_layers)
    ):
        raise BadRequest(
            "the stored weights were checked for another personalization_type or head_layers; "
            "send new weights",
            field="weights_key",
        )


async def _readable_device(
    ctx: Context, device_id: str | None, federation_id: str | None, model_id: str
) -> tuple[str, bool]:
    """The device whose state the caller may read (see the module notes), and whether it is
    the caller's own (the device itself or its organization), or an error."""
    owner = ctx.org_id
    if ctx.principal.kind == "device":
        if device_id not in (None, ctx.principal.device_id):
            raise Forbidden("a device reads only its own personalized state")
        device_id = ctx.principal.device_id
    else:
        if device_id is None:
            raise BadRequest(
                "an organization names the device whose state it reads", field="device_id"
            )
        owner = await ctx.db.value("training.personalized.find_device_org", device_id=device_id)
        if owner is None:
            raise NotFound("no device with this id")
        if federation_id is not None:
            await federation_for_member(ctx, federation_id)
        elif owner != ctx.org_id:
            raise Forbidden(
                "outside a federation an organization reads only its own devices' states"
            )
    await model_for_reading(ctx, model_id)
    return device_id, owner == ctx.org_id


@rpc_method(ORG_OR_DEVICE)
async def get(ctx: Context, p: GetParams) -> GetResult:
    """A state (null when there is none) and a presigned URL to download its weights, if any.

    The URL is given to the device itself and to its own organization only:
    other members of a federation see the state's metadata, never the weights
    (personalized weights can reveal a device's data).
    """
    device_id, own = await _readable_device(ctx, p.device_id, p.federation_id, p.model_id)
    state = await ctx.db.maybe(
        "training.personalized.find_state",
        PersonalizedState,
        device_id=device_id,
        model_id=p.model_id,
        federation_id=p.federation_id or "",
    )
    has_weights = state is not None and state.weights_key is not None
    if not (has_weights and own):
        return GetResult(state=state, has_personalized_weights=has_weights)
    expires = ctx.settings.presign_expiry_seconds
    return GetResult(
        state=state,
        has_personalized_weights=True,
        weights_url=ctx.storage.presigned_get(state.weights_key, expires),
        weights_url_expires_at=datetime.now(UTC) + timedelta(seconds=expires),
    )


@rpc_method(ORG_OR_DEVICE)
async def metrics(ctx: Context, p: MetricsParams) -> MetricsResult:
    """The metrics, type and round number of a state; `metrics` is null when there is no state."""
    device_id, _ = await _readable_device(ctx, p.device_id, p.federation_id, p.model_id)
    state = await ctx.db.maybe(
        "training.personalized.find_state",
        PersonalizedState,
        device_id=device_id,
        model_id=p.model_id,
        federation_id=p.federation_id or "",
    )
    if state is None:
        return MetricsResult(
            device_id=device_id,
            model_id=p.model_id,
            federation_id=p.federation_id,
            personalization_type=None,
            metrics=None,
            round_number=None,
            updated_at=None,
        )
    return MetricsResult(
        device_id=device_id,
        model_id=p.model_id,
        federation_id=p.federation_id,
        personalization_type=state.personalization_type,
        metrics=state.metrics,
        round_number=state.round_number,
        updated_at=state.updated_at,
    )


@rpc_method(ORG)
async def list_(ctx: Context, p: ListParams) -> ListResult:
    """The latest state per device, newest first: of a federation's devices, or without one of the caller's own."""
    if p.federation_id is not None:
        await federation_for_member(ctx, p.federation_id)
    args = {
        "federation_id": p.federation_id or "",
        "model_id": p.model_id,
        "org_id": None if p.federation_id is not None else ctx.org_id,
    }
    items = await ctx.db.all(
        "training.personalized.list_states",
        PersonalizedState,
        limit=p.limit,
        offset=p.offset,
        **args,
    )
    return ListResult(
        items=items, total=await ctx.db.value("training.personalized.count_states", **args)
    )
