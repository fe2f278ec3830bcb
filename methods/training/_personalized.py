"""The write path of training.personalized.update: check, store and record a device's state.

The rules it enforces are the notes of methods/training/personalized.py.
"""

from __future__ import annotations

import asyncio
import secrets

from fedrpc.context import Context
from fedrpc.db import jsonb
from fedrpc.errors import BadRequest, PreconditionFailed
from fedrpc.fl.tensors import (
    MAX_ABS_VALUE,
    TensorSpec,
    check_bounded,
    decode_update,
    encode_safetensors,
    manifest_from_json,
)
from fedrpc.services.policy import federation_for_model, version_for_reading
from fedrpc.storage import StoredObject
from schemas.models import Model
from schemas.training.personalized import PersonalizedState, UpdateParams

__all__ = ["latest_manifest", "require_federation", "store_weights", "write_state"]

_SHOWN_NAMES = 20


async def require_federation(ctx: Context, model: Model, federation_id: str) -> None:
    await federation_for_model(ctx, model, federation_id, own_model_ok=True)


async def latest_manifest(ctx: Context, model: Model, p: UpdateParams) -> list[TensorSpec]:
    """The latest version's manifest; every head layer must be one of its tensors."""
    if model.latest_version is None:
        raise PreconditionFailed(
            "the model has no version yet; personalized weights are checked against one"
        )
    version = await version_for_reading(ctx, model, model.latest_version)
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
    """Decode, check and re-encode the weights (runs in a worker thread).

    Safetensors only, its header compared with the manifest before any tensor
    is read (the torch encoding is refused from devices: ``decode_update``).
    """
    state = decode_update(data, encoding, expected, field="weights")
    check_bounded(state, MAX_ABS_VALUE)
    return encode_safetensors(state)


async def store_weights(
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


async def write_state(
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
