from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from schemas._base import MutatingParams, Params, Result
from schemas._types import Description, Limit, ModelId, Offset, UploadId, Version

StateEncoding = Literal["safetensors", "torch"]
ArtifactKind = Literal["safetensors", "torch", "onnx", "program"]


class Payload(Params):
    """Bytes sent inline (base64 in JSON) or through a presigned upload from uploads.create."""

    data: bytes | None = None
    upload_id: UploadId | None = None


class CreateParams(MutatingParams, kw_only=True):
    """Register a base version: state dict, ONNX graph and torch.export program of one network."""

    model_id: ModelId
    weights: Payload
    weights_encoding: StateEncoding = "safetensors"
    onnx: Payload
    program: Payload
    description: Description = ""


class TensorSpec(Result):
    name: str
    shape: list[int]
    dtype: str


class Artifact(Result):
    kind: ArtifactKind
    sha256: str
    size_bytes: int


class ModelVersion(Result, kw_only=True):
    model_id: str
    version: int
    parent_version: int | None = None
    round_id: str | None = None
    strategy: str | None = None
    num_updates: int = 0
    total_samples: int = 0
    metrics: dict[str, Any] = {}
    manifest: list[TensorSpec]
    input_shape: list[int | None]
    description: str = ""
    created_at: datetime
    artifacts: list[Artifact] = []
    # Required, never omitted: false marks a draft (see PublishParams).
    published: bool


class ListParams(Params):
    """A model's versions, newest first (drafts only for the owning organization)."""

    model_id: ModelId
    limit: Limit = 50
    offset: Offset = 0


class ListResult(Result):
    items: list[ModelVersion]
    total: int


class GetParams(Params):
    """One version of a model (the latest when version is omitted).

    Drafts (unpublished versions) are seen by the owning organization only; for
    the members of a federation the model is shared into, a draft is not_found
    and the latest version is the latest published one.
    """

    model_id: ModelId
    version: Version | None = None


class DownloadParams(Params):
    """Presigned GET URLs, sha256 and the tensor manifest of a version's artifacts."""

    model_id: ModelId
    version: Version | None = None
    kinds: list[ArtifactKind] | None = None


class DownloadLink(Result):
    kind: str
    url: str
    sha256: str
    size_bytes: int


class DownloadResult(Result):
    model_id: str
    version: int
    manifest: list[TensorSpec]
    expires_at: datetime
    artifacts: list[DownloadLink]


class PublishParams(MutatingParams, kw_only=True):
    """Publish a draft version: rounds may then start from it and federation members see it.

    A version made by training.aggregate with publish=false is a draft: its
    organization reads and downloads it, but no round can use it as its base
    and organizations it is shared with do not see it. Publishing is for the
    owning organization's API keys only and cannot be undone; publishing a
    published version returns it unchanged.
    """

    model_id: ModelId
    version: Version
