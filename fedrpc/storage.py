"""Artifact store over the S3 API (minio SDK); the SDK is blocking, so calls run in threads.

Every object written through ``put`` comes back with its sha256, which callers
record next to the object key in Postgres. The storage lifecycle (which row
owns which object, and how garbage is collected) is
:mod:`fedrpc.services.storage_gc`'s.

A presigned PUT (``presigned_put``) is signed for one body length: its
``Content-Length`` is a signed header (AWS Signature V4), so S3 itself refuses
a body of any other length (``SignatureDoesNotMatch``) and a request without
the header. The minio SDK signs only ``host`` in presigned URLs, so the URL is
signed here; minio still builds it (path or virtual-host style).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import itertools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import SplitResult, quote, urlsplit

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from fedrpc.errors import InternalError, NotFound

log = logging.getLogger("fedrpc.storage")


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Listed:
    """One object of a listing: its key and when it was last written."""

    key: str
    last_modified: datetime


class Storage:
    def __init__(
        self,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        bucket: str,
        *,
        secure: bool = False,
        region: str = "us-east-1",
    ) -> None:
        self.bucket = bucket
        self.region = region
        self._keys = None if access_key is None or secret_key is None else (access_key, secret_key)
        http = urllib3.PoolManager(
            maxsize=16,
            timeout=urllib3.Timeout(connect=5, read=120),
            retries=urllib3.Retry(
                total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)
            ),
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )

    async def ensure_bucket(self) -> None:
        def make() -> None:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)

        await _call(make)

    async def ping(self) -> bool:
        try:
            return await asyncio.to_thread(self.client.bucket_exists, self.bucket)
        except Exception:  # readiness probe: any failure means "not ready"
            return False

    async def put(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> StoredObject:
        def put() -> StoredObject:
            self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )
            return StoredObject(key, hashlib.sha256(data).hexdigest(), len(data))

        return await _call(put)

    def get_blocking(self, key: str) -> bytes:
        """For code already on a worker thread; errors are translated as for ``get``."""
        try:
            return self._get(key)
        except S3Error as exc:
            raise _translated(exc) from None
        except (urllib3.exceptions.HTTPError, OSError):
            raise InternalError("object storage is unreachable") from None

    def _get(self, key: str, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            response = self.client.get_object(self.bucket, key)
        else:
            # A range request: S3 sends at most max_bytes, and no more is read if it sends more.
            response = self.client.get_object(self.bucket, key, offset=0, length=max_bytes)
        try:
            return response.read() if max_bytes is None else response.read(max_bytes)
        finally:
            response.close()
            response.release_conn()

    async def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """The object's bytes; with ``max_bytes`` at most that many (its first ones), however
        large the object is: callers compare the length with what they expect."""
        return await _call(lambda: self._get(key, max_bytes))

    async def size(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""

        def stat() -> int | None:
            try:
                return self.client.stat_object(self.bucket, key).size
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    return None
                raise

        return await _call(stat)

    async def delete(self, *keys: str) -> None:
        def delete() -> None:
            for key in keys:
                self.client.remove_object(self.bucket, key)

        await _call(delete)

    async def delete_many(self, keys: list[str]) -> list[str]:
        """Delete objects in batches (S3 multi-object delete); the keys S3 deleted or did not
        have (deleting a missing object succeeds), so a key it refused can be tried again."""

        def delete() -> list[str]:
            failed: set[str] = set()
            for start in range(0, len(keys), 1000):  # the API's limit per request
                batch = [DeleteObject(k) for k in keys[start : start + 1000]]
                failed.update(e.name for e in self.client.remove_objects(self.bucket, batch))
            return [k for k in keys if k not in failed]

        return await _call(delete) if keys else []

    async def list_after(self, after: str, limit: int) -> list[Listed]:
        """At most ``limit`` objects whose keys sort after ``after``, in key order."""

        def listing() -> list[Listed]:
            found = self.client.list_objects(self.bucket, recursive=True, start_after=after)
            return [Listed(o.object_name, o.last_modified) for o in itertools.islice(found, limit)]

        return await _call(listing)

    async def delete_quietly(self, keys: list[str]) -> None:
        """Delete objects nobody references any more; a failure only leaves garbage, so it is logged."""
        if not keys:
            return
        try:
            await self.delete(*keys)
        except Exception:
            log.warning("could not delete %d unreferenced objects", len(keys))

    def presigned_get(self, key: str, expires_seconds: int) -> str:
        # Signing is local computation (no request), so it runs inline.
        return self.client.presigned_get_object(
            self.bucket, key, expires=timedelta(seconds=expires_seconds)
        )

    def presigned_put(self, key: str, expires_seconds: int, size_bytes: int) -> str:
        """A PUT URL S3 accepts only with a body of exactly ``size_bytes`` (see the module notes)."""
        url = urlsplit(
            self.client.presigned_put_object(
                self.bucket, key, expires=timedelta(seconds=expires_seconds)
            )
        )
        if self._keys is None:  # anonymous access: nothing is signed, nothing can be bound
            return url.geturl()
        return sign_sized_put(url, *self._keys, self.region, expires_seconds, size_bytes)


def sign_sized_put(
    url: SplitResult,
    access_key: str,
    secret_key: str,
    region: str,
    expires_seconds: int,
    size_bytes: int,
    now: datetime | None = None,
) -> str:
    """``url`` (scheme, host and path; its query is replaced) presigned for a PUT with
    ``content-length`` and ``host`` as signed headers (AWS Signature V4, query parameters)."""
    now = now or datetime.now(UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    scope = f"{day}/{region}/s3/aws4_request"
    headers = {"content-length": str(size_bytes), "host": url.netloc}
    signed = ";".join(sorted(headers))
    query = "&".join(
        f"{_uri_encode(k)}={_uri_encode(v)}"
        for k, v in sorted(
            {
                "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
                "X-Amz-Credential": f"{access_key}/{scope}",
                "X-Amz-Date": amz_date,
                "X-Amz-Expires": str(expires_seconds),
                "X-Amz-SignedHeaders": signed,
            }.items()
        )
    )
    canonical = "\n".join(
        [
            "PUT",
            url.path or "/",
            query,
            "".join(f"{k}:{v}\n" for k, v in sorted(headers.items())),
            signed,
            "UNSIGNED-PAYLOAD",
        ]
    )
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return url._replace(query=f"{query}&X-Amz-Signature={signature}").geturl()


def _uri_encode(value: str) -> str:
    return quote(value, safe="-_.~")


async def _call(fn):
    try:
        return await asyncio.to_thread(fn)
    except S3Error as exc:
        raise _translated(exc) from None
    except (urllib3.exceptions.HTTPError, OSError):
        raise InternalError("object storage is unreachable") from None


def _translated(exc: S3Error) -> Exception:
    if exc.code in ("NoSuchKey", "NoSuchObject"):
        return NotFound("a stored object is missing")
    return InternalError("object storage refused the request")
