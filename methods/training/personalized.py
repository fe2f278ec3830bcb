"""training.personalized.*: per-device personalized state (Ditto, FedPer, local fine-tuning).

One state per (device, model, federation); a state outside any federation is
keyed with federation_id ''. A device writes and reads only its own state. An
organization reads (never writes) the states of its own devices only, in a
federation it owns or is an active member of or outside any; it names the
device with `device_id` in get and metrics. Another member's devices, their
states, metrics and weights are never shown: `list` gives every member of the
federation as `{org_id, devices}` (docs/design.md, "What another organization
sees").

Weights are decoded (safetensors only: devices never send torch files), checked and stored
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

from datetime import UTC, datetime, timedelta

from fedrpc.context import Context
from fedrpc.registry import DEVICE, ORG, ORG_OR_DEVICE, rpc_method
from fedrpc.services.payloads import payload_bytes
from fedrpc.services.policy import device_for_reading, federation_for_member, model_for_reading
from fedrpc.services.storage_gc import delete_unnamed
from methods.training._personalized import (
    latest_manifest,
    require_federation,
    store_weights,
    write_state,
)
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
from schemas.training.updates import OrgDevices


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
        await require_federation(ctx, model, p.federation_id)
    manifest = (
        await latest_manifest(ctx, model, p) if p.weights is not None or p.head_layers else []
    )
    async with payload_bytes(
        ctx, {} if p.weights is None else {"weights": p.weights}, "personalization"
    ) as blobs:
        stored = await store_weights(ctx, p, manifest, blobs["weights"]) if blobs else None
        try:
            old, state = await write_state(ctx, p, stored)
        except BaseException:
            await delete_unnamed(ctx.db, ctx.storage, [stored.key] if stored else [])
            raise
    if old is not None and old.weights_key not in (None, state.weights_key):
        await ctx.storage.delete_quietly([old.weights_key])
    return UpdateResult(created=old is None, state=state)


async def _readable_device(
    ctx: Context, device_id: str | None, federation_id: str | None, model_id: str
) -> str:
    """The device whose state the caller may read (see the module notes), or an error."""
    device_id = await device_for_reading(ctx, device_id)
    if federation_id is not None and ctx.principal.kind != "device":
        await federation_for_member(ctx, federation_id)
    await model_for_reading(ctx, model_id)
    return device_id


@rpc_method(ORG_OR_DEVICE)
async def get(ctx: Context, p: GetParams) -> GetResult:
    """A state (null when there is none) and a presigned URL to download its weights, if any.

    Only the device itself and its own organization read a state (another
    member's device is `forbidden`): personalized weights and metrics can
    reveal a device's data.
    """
    device_id = await _readable_device(ctx, p.device_id, p.federation_id, p.model_id)
    state = await ctx.db.maybe(
        "training.personalized.find_state",
        PersonalizedState,
        device_id=device_id,
        model_id=p.model_id,
        federation_id=p.federation_id or "",
    )
    if state is None or state.weights_key is None:
        return GetResult(state=state, has_personalized_weights=False)
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
    device_id = await _readable_device(ctx, p.device_id, p.federation_id, p.model_id)
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
    """The latest state per own device, newest first; every organization's part as a count."""
    if p.federation_id is not None:
        await federation_for_member(ctx, p.federation_id)
    args = {"federation_id": p.federation_id or "", "model_id": p.model_id, "org_id": ctx.org_id}
    items = await ctx.db.all(
        "training.personalized.list_states",
        PersonalizedState,
        limit=p.limit,
        offset=p.offset,
        **args,
    )
    return ListResult(
        items=items,
        total=await ctx.db.value("training.personalized.count_states", **args),
        participation=await ctx.db.all(
            "training.personalized.list_participation", OrgDevices, **args
        ),
    )
