"""Artifact store over the S3 API (minio SDK); the SDK is blocking, so calls run in threads.

Every object written through ``put`` comes back with its sha256, which callers
record next to the object key in Postgres.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from dataclasses import dataclass
from datetime import timedelta

import urllib3
from minio import Minio
from minio.error import S3Error

from fedrpc.errors import InternalError, NotFound

log = logging.getLogger("fedrpc.storage")


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    sha256: str
    size_bytes: int


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

    def _get(self, key: str) -> bytes:
        response = self.client.get_object(self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    async def get(self, key: str) -> bytes:
        return await _call(lambda: self._get(key))

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

    def presigned_put(self, key: str, expires_seconds: int) -> str:
        return self.client.presigned_put_object(
            self.bucket, key, expires=timedelta(seconds=expires_seconds)
        )


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
