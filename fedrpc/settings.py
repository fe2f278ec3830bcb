"""Settings, read once from the environment (FEDRPC_* and DATABASE_URL)."""

from __future__ import annotations

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
    # A device update of at most this many bytes is kept in its Postgres row instead of S3
    # (0: every update in S3). For small models one S3 write and one read per update were
    # most of a cross-device round's server CPU; 64 KiB is a 16k-parameter float32 model.
    row_update_max_bytes: Annotated[int, msgspec.Meta(ge=0, le=1024 * 1024)] = 64 * 1024
    rate_limit_per_second: float = 200.0
    rate_limit_burst: int = 400
    auth_cache_seconds: float = 5.0
    presign_expiry_seconds: int = 900
    sync_interval_seconds: int = 60
    background_interval_seconds: float = 5.0
    # Auto-aggregation (docs/aggregation.md): rounds taken up per pass, round-robin across
    # organizations; a round that keeps failing is retried with exponential back-off, then failed.
    aggregation_rounds_per_pass: int = 10
    aggregation_max_attempts: int = 8
    aggregation_backoff_seconds: float = 30.0
    aggregation_backoff_max_seconds: float = 3600.0
    db_pool_min: int = 2
    db_pool_max: int = 10
    log_level: str = "INFO"


ENV_NAMES = {"database_url": "DATABASE_URL"}
_AT_FIELD = re.compile(r" - at `\$\.(\w+)`$")
# A plainer reason than the constraint msgspec names.
_REASONS = {"public_url": "expected an absolute http(s) URL without query or fragment"}
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
        return msgspec.convert(raw, Settings, strict=False)
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
