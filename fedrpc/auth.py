"""Bearer tokens: org API keys and device tokens, stored as sha256 hashes.

Tokens are 256-bit random strings, so a plain sha256 is a safe hash: there is
nothing to brute-force. A short in-memory cache keeps authentication off the
database for hot callers. Revocation through the API clears the serving
process's cache at once; every other process drops the principal when its
entry expires, at most ``auth_cache_seconds`` after the revocation committed
(an entry's expiry is fixed when its lookup starts and never extended by use).
Enrollment keys are never cached: each registration reads the key anyway.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from enum import Flag, auto

import msgspec

from fedrpc.db import Database
from fedrpc.errors import Unauthorized

ORG_KEY_PREFIX = "fk_"
DEVICE_TOKEN_PREFIX = "fd_"
ENROLL_RATE_PER_SECOND = 0.5
"""Registrations with enrollment keys per organization and client address: 30 a minute..."""
ENROLL_BURST = 20
"""...after a burst of 20 (devices behind one NAT enrolling together)."""


class Caller(Flag):
    """Who may call a method; a registry entry names one or more."""

    PUBLIC = auto()
    ORG = auto()
    DEVICE = auto()
    ENROLL = auto()  # an org key with the "enroll" scope: registering devices only


class Principal(msgspec.Struct, frozen=True):
    # "org" (an admin key), "enroll" (an enrollment key) or "device": the registry's
    # Caller flag of the same name decides which methods each may call.
    kind: str
    org_id: str
    key_id: str | None = None
    device_id: str | None = None
    # A device's current token hash: devices.rotate_token replaces exactly this one.
    token_hash: bytes | None = None

    # "org:<id>", "enroll:<key id>" or "device:<id>", set from the fields: logs, rate
    # limits and idempotency scopes read it per call.
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind == "device":
            label = f"device:{self.device_id}"
        elif self.kind == "enroll":
            label = f"enroll:{self.key_id}"
        else:
            label = f"org:{self.org_id}"
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
    was valid, and for ``ttl_seconds`` at most, counted from the start of the
    lookup that found it. ``forget`` bumps an epoch: a lookup that was in flight
    when it ran answers its own call but is not cached, so a revoked principal
    cannot come back into the cache after its revocation.

    ``enroll_limiter`` bounds registrations with enrollment keys per organization
    and client address (``ENROLL_RATE_PER_SECOND``, ``ENROLL_BURST``).
    """

    def __init__(self, db: Database, ttl_seconds: float) -> None:
        self.db = db
        self.ttl = ttl_seconds
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._epoch = 0
        self.enroll_limiter = RateLimiter(ENROLL_RATE_PER_SECOND, ENROLL_BURST)

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
        epoch = self._epoch
        principal = await self._lookup(token, hash_token(token))
        if principal is None:
            self._cache.pop(header, None)
            raise Unauthorized("the token is not valid, has expired or has been revoked")
        if epoch != self._epoch or principal.kind == "enroll":
            return principal  # a revocation ran meanwhile, or a key checked on every use
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
        """Drop cached principals of a revoked key or device, and keep lookups in flight out."""
        self._epoch += 1
        for header, (principal, _) in list(self._cache.items()):
            if (key_id and principal.key_id == key_id) or (
                device_id and principal.device_id == device_id
            ):
                del self._cache[header]


def enroll_bucket(principal: Principal, address: str | None) -> str:
    """The rate-limit bucket of an enrollment call: its organization and client address."""
    return f"enroll:{principal.org_id}@{address}"


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
