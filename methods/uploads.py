"""uploads.create: presigned PUT URLs for payloads too large to send inline."""

from __future__ import annotations

from fedrpc.auth import new_id
from fedrpc.context import Context
from fedrpc.errors import BadRequest
from fedrpc.registry import ORG_OR_DEVICE, rpc_method
from fedrpc.services.payloads import upload_key
from schemas.uploads import CreateParams, CreateResult


@rpc_method(ORG_OR_DEVICE)
async def create(ctx: Context, p: CreateParams) -> CreateResult:
    """Hand out a presigned PUT URL; the size and sha256 declared here are checked when the upload is used."""
    if p.size_bytes > ctx.settings.max_upload_bytes:
        raise BadRequest(f"size_bytes may be at most {ctx.settings.max_upload_bytes}")
    upload_id = new_id("upl")
    key = upload_key(ctx.org_id, upload_id)
    expires = ctx.settings.presign_expiry_seconds
    expires_at = await ctx.db.value(
        "uploads.insert_upload",
        id=upload_id,
        org_id=ctx.org_id,
        device_id=ctx.principal.device_id,
        object_key=key,
        size_bytes=p.size_bytes,
        sha256=p.sha256,
        purpose=p.purpose,
        expires_seconds=expires,
    )
    return CreateResult(
        upload_id=upload_id,
        url=ctx.storage.presigned_put(key, expires),
        method="PUT",
        size_bytes=p.size_bytes,
        sha256=p.sha256,
        expires_at=expires_at,
    )
