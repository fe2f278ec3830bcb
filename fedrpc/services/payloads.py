"""Large payloads: inline base64, or an upload made earlier through a presigned PUT.

An upload is claimed when a call reads it, so two calls cannot both use it; a
call that fails releases its claims, a call that succeeds deletes the uploaded
objects (their bytes now live under the caller's own keys).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import msgspec

from fedrpc.context import Context
from fedrpc.errors import BadRequest, Conflict, Forbidden, NotFound, PreconditionFailed
from schemas.models.versions import Payload


class Upload(msgspec.Struct):
    id: str
    org_id: str
    device_id: str | None
    object_key: str
    size_bytes: int
    sha256: str
    purpose: str
    expires_at: datetime
    consumed_at: datetime | None


def upload_key(org_id: str, upload_id: str) -> str:
    return f"uploads/{org_id}/{upload_id}"


async def _claim(ctx: Context, field: str, upload_id: str, purpose: str) -> Upload:
    upload = await ctx.db.maybe("uploads.find_upload", Upload, upload_id=upload_id)
    if upload is None:
        raise NotFound(f"{field}: no upload with this id", field=field)
    if upload.org_id != ctx.org_id or (ctx.principal.device_id not in (None, upload.device_id)):
        raise Forbidden(f"{field}: the upload belongs to another caller", field=field)
    if upload.purpose != purpose:
        raise BadRequest(
            f"{field}: the upload was made for {upload.purpose}, not {purpose}", field=field
        )
    if upload.consumed_at is not None:
        raise Conflict(f"{field}: the upload has already been used", field=field)
    if upload.expires_at <= datetime.now(UTC):
        raise PreconditionFailed(f"{field}: the upload has expired", field=field)
    if not await ctx.db.run("uploads.claim_upload", upload_id=upload_id):
        raise Conflict(f"{field}: the upload has already been used", field=field)
    return upload


async def used_upload_sha256(ctx: Context, upload_id: str) -> str | None:
    """The declared sha256 of an upload this caller has already used, else None: a replayed
    call that names it can be recognised by that digest though its bytes are gone."""
    upload = await ctx.db.maybe("uploads.find_upload", Upload, upload_id=upload_id)
    if (
        upload is None
        or upload.consumed_at is None
        or upload.org_id != ctx.org_id
        or upload.device_id != ctx.principal.device_id
    ):
        return None
    return upload.sha256


async def _read(ctx: Context, field: str, upload: Upload) -> bytes:
    size = await ctx.storage.size(upload.object_key)
    if size is None:
        raise PreconditionFailed(
            f"{field}: nothing has been uploaded to this upload_id yet", field=field
        )
    if size != upload.size_bytes:
        raise BadRequest(
            f"{field}: uploaded {size} bytes but declared {upload.size_bytes}", field=field
        )
    # Never more than declared: the object could be written again between the stat and the
    # read (the URL stays valid until it expires; S3 holds it to the declared length too).
    data = await ctx.storage.get(upload.object_key, max_bytes=upload.size_bytes)
    if len(data) != upload.size_bytes:
        raise BadRequest(
            f"{field}: uploaded {len(data)} bytes but declared {upload.size_bytes}", field=field
        )
    if hashlib.sha256(data).hexdigest() != upload.sha256:
        raise BadRequest(
            f"{field}: the uploaded bytes do not match the declared sha256", field=field
        )
    return data


def _check_size(field: str, size: int, expected: int | None) -> None:
    if expected is not None and size != expected:
        raise BadRequest(
            f"{field}: {size} bytes where {expected} are expected", field=field, size_bytes=expected
        )


@asynccontextmanager
async def payload_bytes(
    ctx: Context,
    payloads: dict[str, Payload],
    purpose: str,
    sizes: dict[str, int] | None = None,
) -> AsyncIterator[dict[str, bytes]]:
    """The bytes of each named payload; uploads are claimed for the duration of the block.

    ``sizes``: the exact length a payload must have, checked against an upload's
    declared size before a byte of it is read."""
    claimed: list[Upload] = []
    sizes = sizes or {}
    try:
        blobs: dict[str, bytes] = {}
        for field, payload in payloads.items():
            if (payload.data is None) == (payload.upload_id is None):
                raise BadRequest(f"{field}: give exactly one of data or upload_id", field=field)
            if payload.data is not None:
                if not payload.data:
                    raise BadRequest(f"{field}: data is empty", field=field)
                _check_size(field, len(payload.data), sizes.get(field))
                blobs[field] = payload.data
                continue
            claimed.append(await _claim(ctx, field, payload.upload_id, purpose))
            _check_size(field, claimed[-1].size_bytes, sizes.get(field))
            blobs[field] = await _read(ctx, field, claimed[-1])
        yield blobs
    except BaseException:
        for upload in claimed:
            await ctx.db.run("uploads.release_upload", upload_id=upload.id)
        raise
    await ctx.storage.delete_quietly([u.object_key for u in claimed])
