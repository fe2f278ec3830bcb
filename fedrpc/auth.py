"""Bearer tokens: org API keys and device tokens, stored as sha256 hashes.

Tokens are 256-bit random strings, so a plain sha256 is a safe hash: there is
nothing to brute-force. A short in-memory cache keeps authentication off the
database for hot callers; revocation through the API clears the cache at once.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from enum import Flag, auto

import msgspec

from fedrpc.db import Database
from fedrpc.errors import Forbidden, Unauthorized

ORG_KEY_PREFIX = "fk_"
DEVICE_TOKEN_PREFIX = "fd_"


class Caller(Flag):
    """Who may call a method; a registry entry names one or more."""

    PUBLIC = auto()
    ORG = auto()
    DEVICE = auto()


class Principal(msgspec.Struct, frozen=True):
    kind: str  # "org" | "device"
    org_id: str
    key_id: str | None = None
    device_id: str | None = None

    # "org:<id>" or "device:<id>", set from the fields: logs and rate limits read it per call.
    label: str = ""

    def __post_init__(self) -> None:
        label = f"device:{self.device_id}" if self.kind == "device" else f"org:{self.org_id}"
        msgspec.structs.force_setattr(self, "label", label)


def new_id(prefix: str) -> str:
    """A server-generated id: type prefix + 128 random bits."""
    return f"{prefix}_{secrets.token_hex(16)}"


def new_token(prefix: str) -> tuple[str, bytes]:
    """A fresh bearer token and the hash that is stored instead of it."""
    token = prefix + secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticator:
    """Resolves bearer tokens to principals with a short TTL cache.

    The cache is keyed by the Authorization header as received, so a hit costs
    one dict lookup (no parsing, no hashing); it holds only headers whose token
    was valid, and for ``ttl_seconds`` at most.
    """

    def __init__(self, db: Database, ttl_seconds: float) -> None:
        self.db = db
        self.ttl = ttl_seconds
        self._cache: dict[str, tuple[Principal, float]] = {}

    def cached(self, header: str | None) -> Principal | None:
        """The principal of a header authenticated less than ``ttl`` ago, else None."""
        hit = self._cache.get(header) if header is not None else None
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    async def authenticate(self, header: str | None) -> Principal | None:
        """None when no token was sent; Unauthorized when one was sent and is not valid."""
        if header is None:
            return None
        now = time.monotonic()
        hit = self._cache.get(header)
        if hit is not None and hit[1] > now:
            return hit[0]
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("expected 'Authorization: Bearer <token>'")
        principal = await self._lookup(token, hash_token(token))
        if principal is None:
            self._cache.pop(header, None)
            raise Unauthorized("the token is not valid or has been revoked")
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[header] = (principal, now + self.ttl)
        return principal

    async def _lookup(self, token: str, digest: bytes) -> Principal | None:
        if token.startswith(ORG_KEY_PREFIX):
            return await self.db.maybe("auth.find_org_key_principal", Principal, token_hash=digest)
        if token.startswith(DEVICE_TOKEN_PREFIX):
            return await self.db.maybe("auth.find_device_principal", Principal, token_hash=digest)
        return None

    def forget(self, *, key_id: str | None = None, device_id: str | None = None) -> None:
        """Drop cached principals of a revoked key or device."""
        for header, (principal, _) in list(self._cache.items()):
            if (key_id and principal.key_id == key_id) or (
                device_id and principal.device_id == device_id
            ):
                del self._cache[header]


def require_org(principal: Principal, org_id: str) -> None:
    """The caller's org must be ``org_id`` (an org sees only its own resources)."""
    if principal.org_id != org_id:
        raise Forbidden("the organization does not own this resource")


class RateLimiter:
    """A token bucket per principal (or per client address when anonymous)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, list[float]] = {}  # who -> [tokens, when], updated in place

    def take(self, who: str, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens; returns 0 when allowed, else seconds until it would be."""
        now = time.monotonic()
        bucket = self._buckets.get(who)
        if bucket is None:
            bucket = self._buckets[who] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= cost:
            bucket[0] = tokens - cost
            return 0.0
        bucket[0] = tokens
        return (cost - tokens) / self.rate
