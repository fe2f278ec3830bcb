"""Settings, read once from the environment (FEDRPC_* and DATABASE_URL)."""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Annotated

import msgspec

# An absolute http(s) URL, with an optional path prefix, no query or fragment.
PublicUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s/?#@]+(/[^\s?#]*)?$")]
# A TCP port to listen on (0, "any free port", is refused: the URL printed and published
# must name the port clients reach).
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Server configuration. Every field maps to an environment variable (see README)."""

    database_url: str | None = None
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_bucket: str = "fedrpc"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    host: str = "127.0.0.1"
    port: Port = 8080
    # Where clients reach the server (e.g. https://fl.example.com behind a proxy): rpc.discover's
    # servers[0].url is this plus /rpc. Unset: the address the server listens on (host, or for
    # 0.0.0.0 and :: the local address of the connection), never the request's Host header.
    public_url: PublicUrl | None = None
    data_dir: str = ".data"
    # 32 MB of raw weights is about 43 MB of base64; leave room for the envelope.
    max_body_bytes: int = 48 * 1024 * 1024
    max_batch: int = 100
    # analytics.report: the most observations one call may carry.
    analytics_max_observations: int = 10_000
    max_upload_bytes: int = 512 * 1024 * 1024
    # uploads.create: how many uploads one device (or one org's keys together) may hold
    # pending, created but neither used nor expired; each reserves up to max_upload_bytes.
    max_pending_uploads: Annotated[int, msgspec.Meta(ge=1)] = 16
    # A device update of at most this many bytes is kept in its Postgres row instead of S3
    # (0: every update in S3). For small models one S3 write and one read per update were
    # most of a cross-device round's server CPU; 64 KiB is a 16k-parameter float32 model.
    row_update_max_bytes: Annotated[int, msgspec.Meta(ge=0, le=1024 * 1024)] = 64 * 1024
    rate_limit_per_second: float = 200.0
    rate_limit_burst: int = 400
    auth_cache_seconds: float = 5.0
    # What a caller without a valid token may cost (README, "Resource limits"): the body a
    # request without a token may send (public calls are small; a larger one is refused
    # before it is read), token lookups per client address (a lookup that finds its token is
    # given back), how long and how many unknown tokens are remembered, and how many clients
    # each rate limiter tracks (the least recently seen are dropped).
    unauthenticated_max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024
    token_lookups_per_second: Annotated[float, msgspec.Meta(gt=0)] = 20.0
    token_lookup_burst: Annotated[int, msgspec.Meta(ge=1)] = 200
    unknown_token_cache_seconds: Annotated[float, msgspec.Meta(ge=0, le=300)] = 30.0
    unknown_token_cache_size: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    rate_limit_max_clients: Annotated[int, msgspec.Meta(ge=1)] = 50_000
    # Comma-separated proxy addresses or networks whose X-Forwarded-For is believed; empty:
    # the client address is the TCP peer (behind a proxy, the proxy's address).
    trusted_proxies: str = ""
    # When set, GET /metrics needs 'Authorization: Bearer <it>'; unset, /metrics is open.
    metrics_token: str | None = None
    presign_expiry_seconds: int = 900
    sync_interval_seconds: int = 60
    background_interval_seconds: float = 5.0
    # Auto-aggregation (docs/aggregation.md): rounds taken up per pass, round-robin across
    # organizations; a round that keeps failing is retried with exponential back-off, then failed.
    aggregation_rounds_per_pass: int = 10
    aggregation_max_attempts: int = 8
    aggregation_backoff_seconds: float = 30.0
    aggregation_backoff_max_seconds: float = 3600.0
    # Storage lifecycle (docs/design.md, "Storage"): raw device updates (their bytes; the row
    # stays as a tombstone) are kept this long after their round ended, 7 days by default.
    update_retention_seconds: Annotated[int, msgspec.Meta(ge=0)] = 7 * 24 * 3600
    # An object no row names is deleted once it is this old and was seen unnamed this long ago;
    # an upload row this long after it expired. Longer than any call between object and row.
    storage_gc_grace_seconds: Annotated[int, msgspec.Meta(ge=0)] = 3600
    # Work of one collector pass: objects listed, upload rows and doomed objects taken up.
    storage_gc_batch: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    # An aggregation's claim on its round lasts this long unless renewed (every third of it,
    # while the aggregation works); a round whose worker vanished is taken over after it.
    aggregation_lease_seconds: Annotated[float, msgspec.Meta(ge=0.1)] = 600.0
    # Heavy math (privacy accounting: PLD estimates, new RDP curves) runs in this many worker
    # processes, at most math_queue more calls wait for one (beyond: rate_limited), and a call
    # running longer than the limit is refused as too_expensive (docs/privacy.md).
    math_workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    math_queue: Annotated[int, msgspec.Meta(ge=0)] = 32
    math_time_limit_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    # Org-supplied ONNX graphs and torch.export programs are parsed and run only in a sandbox
    # child process (docs/model-artifacts.md, "The sandbox"): the memory (address space) a check
    # or export may add, its wall-clock and CPU seconds, how many run at once, and the most
    # elements a model's declared input may have (a dynamic batch dimension counts as 1).
    artifact_check_memory_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024 * 1024)] = 4 * 1024**3
    # At most 5 minutes, as the math pool's limit: a call must end well inside the ten
    # minutes after which its idempotency claim may be taken over (fedrpc/idempotency.py).
    artifact_check_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 60.0
    artifact_check_concurrency: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    artifact_max_input_elements: Annotated[int, msgspec.Meta(ge=1)] = 1_000_000
    db_pool_min: int = 2
    db_pool_max: int = 10
    log_level: str = "INFO"


ENV_NAMES = {"database_url": "DATABASE_URL"}
_AT_FIELD = re.compile(r" - at `\$\.(\w+)`$")
# A plainer reason than the constraint msgspec names.
_REASONS = {
    "public_url": "expected an absolute http(s) URL without query or fragment",
    "trusted_proxies": "expected comma-separated IP addresses or networks",
}
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


class SettingsError(ValueError):
    """A setting that cannot be used; ``str()`` is one line naming its environment variable."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field, self.env, self.value, self.reason = field, env_name(field), value, reason
        # Only constrained fields fail, and none of them holds a secret (DATABASE_URL and the
        # S3 keys take any string), so the value can be shown.
        super().__init__(f"{self.env}={str(value)[:100]!r} is invalid: {reason}")


def env_name(field: str) -> str:
    return ENV_NAMES.get(field, "FEDRPC_" + field.upper())


def settings_from_env(environ: dict[str, str] | None = None, **overrides) -> Settings:
    """Build Settings from the environment; explicit keyword overrides win.

    Raises SettingsError, naming the first invalid variable, when one cannot be used.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for field in msgspec.structs.fields(Settings):
        value = environ.get(env_name(field.name))
        if value not in (None, ""):
            raw[field.name] = value
    raw.update(overrides)
    try:
        # str_values lets "8080" and "true" from the environment become int and bool.
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT_FIELD.search(text)
        if match is None:
            raise
        field = match.group(1)
        reason = _REASONS.get(field) or re.sub(
            r"Expected `(\w+)`(, got `str`)?",
            lambda m: "expected " + _KINDS.get(m.group(1), m.group(1)),
            _AT_FIELD.sub("", text),
        )
        raise SettingsError(field, raw[field], reason) from None
    if not _are_networks(settings.trusted_proxies):
        field = "trusted_proxies"
        raise SettingsError(field, settings.trusted_proxies, _REASONS[field])
    return settings


def _are_networks(text: str) -> bool:
    """Whether ``text`` is comma-separated IP addresses or networks (or empty)."""
    try:
        [ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip()]
    except ValueError:
        return False
    return True
