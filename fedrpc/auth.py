"""Bearer tokens: org API keys and device tokens, stored as sha256 hashes.

Tokens are 256-bit random strings, so a plain sha256 is a safe hash: there is
nothing to brute-force. A short in-memory cache keeps authentication off the
database for hot callers. Revocation through the API clears the serving
process's cache at once; every other process drops the principal when its
entry expires, at most ``auth_cache_seconds`` after the revocation committed
(an entry's expiry is fixed when its lookup starts and never extended by use).
Enrollment keys are never cached: each registration reads the key anyway.

A token that cannot be ours (not ``fk_``/``fd_`` and 43 URL-safe characters) is refused
without a lookup. A token that the database does not know is remembered as unknown for
``unknown_ttl`` seconds, so a client repeating it costs a dictionary lookup, not a
query. That cannot refuse a valid token: the server hands a token out only after the
transaction that stored it has committed, so every lookup a holder of the token can cause
finds it. Only a token stored outside the API (written straight into the database) could
be refused, for ``unknown_ttl`` at most. Lookups that miss both caches are limited per
client address before they run (``lookup_limiter``); one that finds its token is given
back, so valid callers behind one address spend nothing beyond the lookups in flight.
Calls that present a token while its lookup runs share that lookup. Every structure
here is bounded: the least recently used entries go first.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import math
import re
import secrets
import time
from collections import OrderedDict
from enum import Flag, auto

import msgspec

from fedrpc.db import Database
from fedrpc.errors import RateLimited, Unauthorized

ORG_KEY_PREFIX = "fk_"
DEVICE_TOKEN_PREFIX = "fd_"
ENROLL_RATE_PER_SECOND = 0.5
"""Registrations with enrollment keys per organization and client address: 30 a minute..."""
ENROLL_BURST = 20
"""...after a burst of 20 (devices behind one NAT enrolling together)."""
TOKEN_CHARS = 43
"""Characters after the prefix: ``secrets.token_urlsafe(32)``, 256 bits."""
TOKEN_SHAPE = re.compile(rf"f[kd]_[A-Za-z0-9_-]{{{TOKEN_CHARS}}}")
"""What every token we issue looks like; anything else is refused without a lookup."""
NOT_VALID = "the token is not valid, has expired or has been revoked"


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


# Valid tokens cached at once (one entry per token, whatever its spelling).
MAX_CACHED = 100_000


class Authenticator:
    """Resolves bearer tokens to principals with a short TTL cache.

    The cache is keyed by the canonical header, ``Bearer <token>``, so a hit of a
    canonical header (what every client sends) costs one dict lookup (no parsing,
    no hashing), and any other spelling of a cached token (``bEaReR``, extra
    spaces) hits after parsing: one valid token is one entry and one lookup per
    TTL however it is spelled. It holds only tokens that were valid, for
    ``ttl_seconds`` at most, counted from the start of the lookup that found
    them; past ``MAX_CACHED`` entries the oldest goes first. ``forget`` bumps an epoch: a lookup that was in flight
    when it ran answers its own call but is not cached, so a revoked principal
    cannot come back into the cache after its revocation.

    Tokens the database did not know are kept for ``unknown_ttl`` seconds (at most
    ``unknown_max`` of them, the oldest dropped first); 0 turns that off.
    ``lookup_limiter`` bounds the lookups that miss both caches per client address
    (``lookup_rate`` a second after ``lookup_burst``); a lookup that finds its token
    gives its share back. ``enroll_limiter`` bounds registrations with enrollment keys
    per organization and client address (``ENROLL_RATE_PER_SECOND``, ``ENROLL_BURST``).
    Each limiter tracks ``max_clients`` keys at most.
    """

    def __init__(
        self,
        db: Database,
        ttl_seconds: float,
        *,
        unknown_ttl: float = 30.0,
        unknown_max: int = 10_000,
        lookup_rate: float = 20.0,
        lookup_burst: int = 200,
        max_clients: int = 50_000,
    ) -> None:
        self.db = db
        self.ttl = ttl_seconds
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._epoch = 0
        self._flights: dict[str, asyncio.Future[Principal | None]] = {}
        self.unknown = UnknownTokens(unknown_ttl, unknown_max)
        self.lookup_limiter = RateLimiter(lookup_rate, lookup_burst, max_clients)
        self.enroll_limiter = RateLimiter(ENROLL_RATE_PER_SECOND, ENROLL_BURST, max_clients)

    def cached(self, header: str | None) -> Principal | None:
        """The principal of a header authenticated less than ``ttl`` ago, else None."""
        hit = self._cache.get(header) if header is not None else None
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    async def authenticate(self, header: str | None, client: str = "local") -> Principal | None:
        """None when no token was sent; Unauthorized when one was sent and is not valid.

        ``client`` is the caller's rate-limit key (``client_key``): a lookup it may not
        make now raises RateLimited, before the database is asked.
        """
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
        canonical = "Bearer " + token
        hit = self._cache.get(canonical)
        if hit is not None and hit[1] > now:
            return hit[0]
        if not TOKEN_SHAPE.fullmatch(token) or self.unknown.has(token, now):
            raise Unauthorized(NOT_VALID)
        flight = self._flights.get(token)
        if flight is None:  # else this token's lookup is running: its answer serves this call
            wait = self.lookup_limiter.take(client)
            wider = wider_key(client)
            if wait <= 0 and wider is not None:
                # An IPv6 /48 is cheap to get: its /64s together earn SITE_SHARE budgets,
                # not 65,536 of them.
                wait = self.lookup_limiter.take(wider, 1 / SITE_SHARE)
            if wait > 0:
                raise RateLimited(
                    "too many token lookups from this address; retry later",
                    retry_after=math.ceil(wait),
                )
            flight = asyncio.ensure_future(
                self._resolve(canonical, token, client, now, self._epoch)
            )
            self._flights[token] = flight
            flight.add_done_callback(functools.partial(self._landed, token))
        principal = await asyncio.shield(flight)
        if principal is None:
            raise Unauthorized(NOT_VALID)
        return principal

    async def _resolve(
        self, header: str, token: str, client: str, now: float, epoch: int
    ) -> Principal | None:
        """One token's lookup, shared by every call presenting the token while it runs."""
        principal = await self._lookup(token, hash_token(token))
        if principal is None:
            self._cache.pop(header, None)
            self.unknown.add(token, now)
            return None
        self.lookup_limiter.refund(client)
        if (wider := wider_key(client)) is not None:
            self.lookup_limiter.refund(wider, 1 / SITE_SHARE)
        if epoch != self._epoch or principal.kind == "enroll":
            return principal  # a revocation ran meanwhile, or a key checked on every use
        self._cache.pop(header, None)  # re-inserted last: the dict's order is its age
        while len(self._cache) >= MAX_CACHED:
            del self._cache[next(iter(self._cache))]
        self._cache[header] = (principal, now + self.ttl)
        return principal

    def _landed(self, token: str, flight: asyncio.Future) -> None:
        self._flights.pop(token, None)
        if not flight.cancelled():
            flight.exception()  # marked as retrieved: the calls waiting on it raise it

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


class UnknownTokens:
    """Tokens the database did not know, each for ``ttl`` seconds, ``max_size`` at most.

    Entries are kept in the order they were added, which is the order they expire in:
    expired ones are dropped from the front as new ones come, and past ``max_size`` the
    oldest goes first (a flood of distinct tokens only shortens how long each is kept).
    """

    def __init__(self, ttl: float, max_size: int) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def has(self, token: str, now: float) -> bool:
        expiry = self._expiry.get(token)
        return expiry is not None and expiry > now

    def add(self, token: str, now: float) -> None:
        if self.ttl <= 0:
            return
        entries = self._expiry
        entries.pop(token, None)
        entries[token] = now + self.ttl
        while entries and (len(entries) > self.max_size or next(iter(entries.values())) <= now):
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._expiry)


def enroll_bucket(principal: Principal, address: str | None) -> str:
    """The rate-limit bucket of an enrollment call: its organization and client address."""
    return f"enroll:{principal.org_id}@{address}"


class RateLimiter:
    """A token bucket per key (a principal, or a client address), ``max_keys`` keys at most.

    Buckets are kept in least-recently-used order and the least recently used is dropped
    when a new key would pass ``max_keys``. A bucket idle for ``burst / rate`` seconds has
    refilled, and dropping it changes nothing; only when more than ``max_keys`` keys are
    active within that time do the oldest get a fresh burst: memory stays bounded, at the
    price of leniency toward a flood of distinct keys.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 50_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        # who -> [tokens, when], updated in place; least recently used first.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def take(self, who: str, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens; returns 0 when allowed, else seconds until it would be."""
        now = time.monotonic()
        buckets = self._buckets
        bucket = buckets.get(who)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
            bucket = buckets[who] = [self.burst, now]
        else:
            buckets.move_to_end(who)
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= cost:
            bucket[0] = tokens - cost
            return 0.0
        bucket[0] = tokens
        return (cost - tokens) / self.rate

    def refund(self, who: str, cost: float = 1.0) -> None:
        """Give back ``cost`` tokens taken for work that turned out not to need limiting."""
        bucket = self._buckets.get(who)
        if bucket is not None:
            bucket[0] = min(self.burst, bucket[0] + cost)

    def __len__(self) -> int:
        return len(self._buckets)


def client_key(address: str | None) -> str:
    """The rate-limit key of a client address: IPv4 as is, IPv6 by its /64.

    A /64 is what one subscriber gets; keying by the full address would give a caller
    2^64 buckets. An IPv4-mapped IPv6 address is its IPv4 address; anything that is not
    an address (a Unix socket) is itself.
    """
    if not address or ":" not in address:
        return address or "local"
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"


# How many /64 budgets of lookups one IPv6 /48 (a site) may use together.
SITE_SHARE = 8


def wider_key(key: str) -> str | None:
    """The /48 an IPv6 client key (a /64, from ``client_key``) belongs to; None otherwise."""
    if not key.endswith("/64"):
        return None
    ip = ipaddress.IPv6Address(key[:-3])
    return f"{ipaddress.IPv6Address(int(ip) >> 80 << 80)}/48"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """``FEDRPC_TRUSTED_PROXIES``: comma-separated addresses or networks (ValueError if not)."""
    return tuple(
        ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip()
    )


def client_address(
    peer: str | None, forwarded_for: list[str], proxies: tuple[Network, ...]
) -> str | None:
    """The client's address: the TCP peer, unless the peer is a trusted proxy.

    Then it is the right-most ``X-Forwarded-For`` hop that is not a trusted proxy
    (the hops to its left are whatever the client wrote), or the peer when there is no
    such hop or it is not an address.
    """
    if not proxies or not _within(peer, proxies):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",")]
    for hop in reversed(hops):
        if not _within(hop, proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer
    return peer


def _within(address: str | None, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in net for net in networks)
