"""SecAgg+ stages (docs/secagg.md): setup (0), share_keys (1), masked_vectors (2), unmask (3), status.

Devices name each other by their session index (1..n), never by device id: a
device of one organization never learns another organization's device ids.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta

from schemas._base import MutatingParams, Params, Result
from schemas._types import RoundId, UploadId

PublicKey = Annotated[
    bytes, Meta(min_length=32, max_length=32, description="Raw X25519 public key (base64).")
]
SessionId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^sag_[0-9a-f]{32}$")]
Index = Annotated[int, Meta(ge=1, le=1_000_000)]
SessionStage = Literal["setup", "share_keys", "masked_vectors", "unmask", "completed", "failed"]
# 4 GiB of words is far beyond any model a round accepts; the length is checked exactly.
MaskedVector = Annotated[bytes, Meta(min_length=8, max_length=1 << 31)]


class SetupParams(MutatingParams, kw_only=True):
    """Stage 0 of SecAgg+: advertise this device's two X25519 public keys for a secure round."""

    round_id: RoundId
    pk1: Annotated[PublicKey, Meta(description="Mask key: pairwise mask agreements.")]
    pk2: Annotated[PublicKey, Meta(description="Encryption key: share bundle agreements.")]


class TensorShape(Result, kw_only=True):
    name: str
    shape: list[int]
    dtype: str


class SessionConfig(Result, kw_only=True):
    """What a device needs to mask its update (docs/secagg.md)."""

    session_id: str
    protocol: str
    key_agreement: str
    kdf: str
    aead: str
    prg: str
    field: str
    update_format: str
    clip: float
    l2_norm_bound: Annotated[
        float | None,
        Meta(
            description="With differential privacy: the L2 norm each device clips its delta to "
            "before quantizing (its weight is then 1)."
        ),
    ] = None
    quantization_bits: int
    max_weight: int
    modulus_bits: int
    dimension: Annotated[int, Meta(description="d: parameters masked (plus one weight word).")]
    tensors: list[TensorShape]
    threshold: int | None = None  # t: given with the round, or chosen when stage 0 closes
    devices: int | None = None  # n, once stage 0 closed
    neighbours: int | None = None  # k, once stage 0 closed


class Neighbour(Result, kw_only=True):
    index: int
    pk1: bytes
    pk2: bytes


class SetupResult(Result, kw_only=True):
    session_id: str
    stage: SessionStage
    stage_deadline: datetime
    config: SessionConfig
    index: int | None = None  # once stage 0 closed
    neighbours: list[Neighbour] | None = None  # once stage 0 closed


class Ciphertext(Params, kw_only=True):
    receiver: Index
    bundle: Annotated[bytes, Meta(min_length=160, max_length=160)]


class ShareKeysParams(MutatingParams, kw_only=True):
    """Stage 1 of SecAgg+: hand in one sealed share bundle per neighbour."""

    round_id: RoundId
    session_id: SessionId
    ciphertexts: Annotated[list[Ciphertext], Meta(max_length=100_000)]


class Forwarded(Result, kw_only=True):
    sender: int
    bundle: bytes


class ShareKeysResult(Result, kw_only=True):
    session_id: str
    stage: SessionStage
    status: Literal["waiting", "ready"]
    stage_deadline: datetime
    ciphertexts: list[Forwarded] | None = None  # once stage 1 closed: the bundles addressed to it


class MaskedVectorsParams(MutatingParams, kw_only=True):
    """Stage 2 of SecAgg+: hand in the masked, quantized, weighted update."""

    round_id: RoundId
    session_id: SessionId
    masked_vector: Annotated[
        MaskedVector | None,
        Meta(description="The d + 1 words little-endian at the modulus width (base64)."),
    ] = None
    upload_id: Annotated[
        UploadId | None,
        Meta(
            description="Instead of masked_vector: an upload (purpose secagg_vector) of those bytes."
        ),
    ] = None


class MaskedVectorsResult(Result, kw_only=True):
    session_id: str
    stage: SessionStage
    status: Literal["accepted"]
    stage_deadline: datetime
    # Once stage 2 closed: the unmask request (neighbour indices), never one index in both.
    survivors: list[int] | None = None
    dropped: list[int] | None = None


class Share(Params, kw_only=True):
    owner: Index
    kind: Literal["self", "key"]
    share: Annotated[bytes, Meta(min_length=66, max_length=66)]


class UnmaskParams(MutatingParams, kw_only=True):
    """Stage 3 of SecAgg+: answer the unmask request with the shares asked for."""

    round_id: RoundId
    session_id: SessionId
    shares: Annotated[list[Share], Meta(max_length=100_000)]


class UnmaskResult(Result, kw_only=True):
    session_id: str
    stage: SessionStage
    status: Literal["waiting", "completed", "failed"]
    shares_received: int
    threshold: int
    failure_reason: str | None = None


class StatusParams(Params, kw_only=True):
    """The stage, counts, survivors and dropouts of a secure round's SecAgg+ session."""

    round_id: RoundId


class StageCounts(Result, kw_only=True):
    setup: int
    share_keys: int
    masked_vectors: int
    unmask: int


class Status(Result, kw_only=True):
    round_id: str
    # not_started until the first training.secagg.setup call starts the session.
    stage: SessionStage | Literal["not_started"]
    threshold: int | None = None  # None until stage 0 closes, when it is the default
    session_id: str | None = None
    stage_deadline: datetime | None = None
    # Counts are left out on a round with differential_privacy (who was drawn stays secret).
    devices: int | None = None
    neighbours: int | None = None
    counts: StageCounts | None = None
    survivors_count: int | None = None
    dropped_count: int | None = None
    # Device ids of the caller's own organization only (docs/design.md).
    survivors: list[str]
    dropped: list[str]
    total_weight: int | None = None
    failure_reason: str | None = None
