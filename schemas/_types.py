"""Reusable constraint aliases; their constraints show up in rpc.discover."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from msgspec import Meta

Name = Annotated[str, Meta(min_length=1, max_length=128)]
Description = Annotated[str, Meta(max_length=512)]
ShortText = Annotated[str, Meta(min_length=1, max_length=64)]
Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z]+_[0-9a-f]{32}$")]
OrgId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^org_[0-9a-f]{32}$")]
DeviceId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^dev_[0-9a-f]{32}$")]
ModelId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^mdl_[0-9a-f]{32}$")]
GroupId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^grp_[0-9a-f]{32}$")]
UploadId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^upl_[0-9a-f]{32}$")]
FederationId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^fed_[0-9a-f]{32}$")]
RoundId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^rnd_[0-9a-f]{32}$")]
KeyId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^key_[0-9a-f]{32}$")]
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$", description="lower-case hex sha256")]
Limit = Annotated[int, Meta(ge=1, le=500)]
Offset = Annotated[int, Meta(ge=0, le=1_000_000)]
Version = Annotated[int, Meta(ge=1)]
Percent = Annotated[int, Meta(ge=0, le=100)]
Timestamp = datetime
# Finite by construction: JSON has no NaN, and an upper bound keeps 1e999 (inf) out.
Epsilon = Annotated[float, Meta(gt=0, le=1e6, description="privacy loss epsilon")]
Delta = Annotated[float, Meta(gt=0, lt=1, description="privacy failure probability delta")]
# Below 1e-3 one step costs about 5e5 epsilon or more at any delta (half the largest budget
# accepted), the PLD accountant's grid overflows (near 1e-5) and the RDP series divide by
# zero (near 1e-160): docs/privacy.md, "Mechanism and neighbouring relation".
NoiseMultiplier = Annotated[
    float,
    Meta(
        ge=1e-3,
        le=1e6,
        description="Gaussian noise standard deviation over the L2 sensitivity (>= 1e-3)",
    ),
]
# A round may run with less noise than an estimate may ask about: with a budget such a
# round is refused by its charge, without one it still has a price (RDP), and an exactness
# test needs it. 1e-9 keeps the RDP series clear of underflow (near 1e-160).
RoundNoiseMultiplier = Annotated[
    float,
    Meta(
        ge=1e-9,
        le=1e6,
        description="Gaussian noise standard deviation over the L2 sensitivity (>= 1e-9)",
    ),
]
SampleRate = Annotated[float, Meta(gt=0, le=1)]
Steps = Annotated[int, Meta(ge=1, le=100_000_000)]
