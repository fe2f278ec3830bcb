"""Writing a model version: its objects in S3 and its rows in Postgres, all or nothing.

Objects go first under a fresh prefix; the rows follow in one transaction that
locks the model to number the version. If the transaction fails, the objects
are deleted again, so no row points at a missing object and no object stays
without a row.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fedrpc.db import Database, jsonb
from fedrpc.services.storage_gc import delete_unnamed
from fedrpc.storage import Storage, StoredObject
from schemas.models.versions import ModelVersion

# Runs inside the version's transaction with the new version number: whatever
# must commit together with the version (a privacy charge, the round's state).
AlongWith = Callable[[Database, int], Awaitable[None]]

FILENAMES = {
    "safetensors": "weights.safetensors",
    "torch": "weights.pt",
    "onnx": "model.onnx",
    "program": "program.pt2",
}


async def _put(storage: Storage, key: str, data: bytes | Awaitable[bytes]) -> StoredObject:
    return await storage.put(key, data if isinstance(data, bytes) else await data)


async def publish_version(
    db: Database,
    storage: Storage,
    model_id: str,
    artifacts: Mapping[str, bytes | Awaitable[bytes]],
    *,
    manifest: list[dict[str, Any]],
    input_shape: list[int | None],
    parent_version: int | None = None,
    round_id: str | None = None,
    strategy: str | None = None,
    num_updates: int = 0,
    total_samples: int = 0,
    metrics: dict[str, Any] | None = None,
    description: str = "",
    published: bool = True,
    along_with: AlongWith | None = None,
) -> ModelVersion:
    """Write a version's objects, then its rows, and return it (a draft unless published).

    An artifact may be given as an awaitable of its bytes (made on a worker
    thread, say): the others are written while it is being made.
    """
    prefix = f"models/{model_id}/{secrets.token_hex(12)}"
    stored: list[tuple[str, StoredObject]] = []
    try:
        # The objects are written side by side (the S3 server is the bottleneck, not us);
        # every one that made it is recorded so a failure can delete them all.
        puts = [
            _put(storage, f"{prefix}/{FILENAMES[kind]}", data) for kind, data in artifacts.items()
        ]
        results = await asyncio.gather(*puts, return_exceptions=True)
        stored = [
            (k, r) for k, r in zip(artifacts, results, strict=True) if isinstance(r, StoredObject)
        ]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        async with db.transaction() as tx:
            version = await tx.value("models.versions.lock_next_version", model_id=model_id)
            await tx.run(
                "models.versions.insert_version",
                model_id=model_id,
                version=version,
                parent_version=parent_version,
                round_id=round_id,
                strategy=strategy,
                num_updates=num_updates,
                total_samples=total_samples,
                metrics=jsonb(metrics or {}),
                manifest=jsonb(manifest),
                input_shape=jsonb(input_shape),
                description=description,
                published=published,
            )
            for kind, obj in stored:
                await tx.run(
                    "models.versions.insert_artifact",
                    model_id=model_id,
                    version=version,
                    kind=kind,
                    object_key=obj.key,
                    sha256=obj.sha256,
                    size_bytes=obj.size_bytes,
                )
            if along_with is not None:
                await along_with(tx, version)
            return await tx.get(
                "models.versions.get_version",
                ModelVersion,
                model_id=model_id,
                version=version,
                with_drafts=True,
            )
    except BaseException:
        await delete_unnamed(db, storage, [obj.key for _, obj in stored])
        raise
