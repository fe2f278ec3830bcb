"""uploads.create: presigned PUT URLs for payloads too large to send inline.

The row is written before the URL is handed out: it reserves the key, and the
storage collector deletes the object (if any) with the row once the upload
expired unused, or a day after it was used (docs/design.md, "Storage").
"""

from __future__ import annotations

from fedrpc.auth import new_id
from fedrpc.context import Context
from fedrpc.errors import BadRequest, RateLimited
from fedrpc.registry import ORG_OR_DEVICE, rpc_method
from fedrpc.services.payloads import upload_key
from schemas.uploads import CreateParams, CreateResult


@rpc_method(ORG_OR_DEVICE)
async def create(ctx: Context, p: CreateParams) -> CreateResult:
    """Hand out a presigned PUT URL for exactly size_bytes; the sha256 declared here is checked when the upload is used.

    The URL is signed for a body of `size_bytes` (its Content-Length is a signed
    header), so S3 itself refuses a PUT of another length; the call that uses
    the upload checks the stored size again and reads no more than declared.
    """
    if p.size_bytes > ctx.settings.max_upload_bytes:
        raise BadRequest(f"size_bytes may be at most {ctx.settings.max_upload_bytes}")
    upload_id = new_id("upl")
    key = upload_key(ctx.org_id, upload_id)
    expires = ctx.settings.presign_expiry_seconds
    device_id = ctx.principal.device_id
    async with ctx.db.transaction() as tx:
        # Each pending upload reserves up to max_upload_bytes of S3: bound how many one
        # device (or one org's keys) may hold at once.
        await tx.value("uploads.lock_uploader", uploader=f"{ctx.org_id}/{device_id}")
        pending = await tx.value(
            "uploads.count_pending_uploads", org_id=ctx.org_id, device_id=device_id
        )
        limit = ctx.settings.max_pending_uploads
        if pending >= limit:
            raise RateLimited(
                f"at most {limit} uploads may be pending (created, neither used nor expired) "
                "at once; use or let expire one first",
                reason="pending_uploads",
                retry_after=expires,
            )
        expires_at = await tx.value(
            "uploads.insert_upload",
            id=upload_id,
            org_id=ctx.org_id,
            device_id=device_id,
            object_key=key,
            size_bytes=p.size_bytes,
            sha256=p.sha256,
            purpose=p.purpose,
            expires_seconds=expires,
        )
    return CreateResult(
        upload_id=upload_id,
        url=ctx.storage.presigned_put(key, expires, p.size_bytes),
        method="PUT",
        size_bytes=p.size_bytes,
        sha256=p.sha256,
        expires_at=expires_at,
    )
