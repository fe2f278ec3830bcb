"""models.versions.*: register base versions, list, read, download and publish them.

A draft (unpublished) version is visible to its own organization only: the
readers of a shared model see its published versions.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from fedrpc.context import Context
from fedrpc.errors import NotFound
from fedrpc.fl.tensors import (
    TensorSpec,
    check_matches,
    decode_state_dict,
    encode_safetensors,
    encode_torch,
    manifest_to_json,
)
from fedrpc.registry import ORG, ORG_OR_DEVICE, rpc_method
from fedrpc.services.artifact_sandbox import SANDBOX, SandboxLimits
from fedrpc.services.payloads import payload_bytes
from fedrpc.services.policy import (
    model_for_reading,
    model_for_writing,
    sees_drafts,
    version_for_reading,
)
from fedrpc.services.versions import publish_version
from schemas.models.versions import (
    CreateParams,
    DownloadLink,
    DownloadParams,
    DownloadResult,
    GetParams,
    ListParams,
    ListResult,
    ModelVersion,
    PublishParams,
)


def _weights_objects(weights: bytes, encoding: str, manifest: list[TensorSpec]) -> dict:
    """The weights in both encodings (runs in a worker thread), again checked against the
    manifest the sandbox reported: its child handled untrusted bytes."""
    state = decode_state_dict(weights, encoding, field="weights")
    check_matches(state, manifest)
    return {"safetensors": encode_safetensors(state), "torch": encode_torch(state)}


@rpc_method(ORG)
async def create(ctx: Context, p: CreateParams) -> ModelVersion:
    """Register a version from a state dict, its ONNX graph and its torch.export program."""
    await model_for_writing(ctx, p.model_id)
    payloads = {"weights": p.weights, "onnx": p.onnx, "program": p.program}
    async with payload_bytes(ctx, payloads, "model_artifact") as blobs:
        # Parsed and run in a child process under the settings' limits, never in the server.
        info = await SANDBOX.check_bundle_async(
            blobs["weights"],
            p.weights_encoding,
            blobs["onnx"],
            blobs["program"],
            SandboxLimits.from_settings(ctx.settings),
            owner=ctx.org_id,
        )
        weights = await asyncio.to_thread(
            _weights_objects, blobs["weights"], p.weights_encoding, info.manifest
        )
        return await publish_version(
            ctx.db,
            ctx.storage,
            p.model_id,
            {**weights, "onnx": blobs["onnx"], "program": blobs["program"]},
            manifest=manifest_to_json(info.manifest),
            input_shape=list(info.input_shape),
            description=p.description,
        )


@rpc_method(ORG_OR_DEVICE)
async def list_(ctx: Context, p: ListParams) -> ListResult:
    """A model's versions, newest first (drafts only for the owning organization)."""
    model = await model_for_reading(ctx, p.model_id)
    args = {"model_id": p.model_id, "with_drafts": sees_drafts(ctx, model)}
    items = await ctx.db.all(
        "models.versions.list_versions", ModelVersion, limit=p.limit, offset=p.offset, **args
    )
    return ListResult(
        items=items, total=await ctx.db.value("models.versions.count_versions", **args)
    )


@rpc_method(ORG_OR_DEVICE)
async def get(ctx: Context, p: GetParams) -> ModelVersion:
    """One version (the latest when none is named); drafts only for the owning organization."""
    model = await model_for_reading(ctx, p.model_id)
    return await version_for_reading(ctx, model, p.version)


@rpc_method(ORG)
async def publish(ctx: Context, p: PublishParams) -> ModelVersion:
    """Publish a draft version (a published one is returned unchanged); it cannot be undone."""
    await model_for_writing(ctx, p.model_id)
    key = {"model_id": p.model_id, "version": p.version}
    if await ctx.db.value("models.versions.update_version_published", **key) is None:
        raise NotFound("no such version of this model")
    return await ctx.db.get("models.versions.get_version", ModelVersion, **key, with_drafts=True)


@rpc_method(ORG_OR_DEVICE)
async def download(ctx: Context, p: DownloadParams) -> DownloadResult:
    """Presigned GET URLs for a version's artifacts, with their sha256 and the tensor manifest."""
    version = await get(ctx, GetParams(model_id=p.model_id, version=p.version))
    objects = await ctx.db.all(
        "models.versions.list_artifact_objects",
        _Object,
        model_id=p.model_id,
        version=version.version,
    )
    wanted = [o for o in objects if p.kinds is None or o.kind in p.kinds]
    if not wanted:
        raise NotFound("the version has none of the requested artifacts")
    expires = ctx.settings.presign_expiry_seconds
    links = [
        DownloadLink(
            kind=o.kind,
            url=ctx.storage.presigned_get(o.object_key, expires),
            sha256=o.sha256,
            size_bytes=o.size_bytes,
        )
        for o in wanted
    ]
    return DownloadResult(
        model_id=p.model_id,
        version=version.version,
        manifest=version.manifest,
        expires_at=datetime.now(UTC) + timedelta(seconds=expires),
        artifacts=links,
    )


class _Object(DownloadLink, kw_only=True):
    object_key: str
    url: str = ""
