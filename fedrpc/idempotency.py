"""Replays of mutating calls: the first result is stored and returned again.

The key is claimed before the handler runs, so two concurrent calls with one
key cannot both run it; a failed call releases its claim so it can be retried.
A claim left behind by a crashed process expires after ten minutes.

A claim belongs to the call that made it: completing or releasing it needs the
random ``claim`` value only that call holds, so a call that outlived its claim
cannot overwrite or delete the record of the call that took it over.

The scope is the principal (one API key, one device token holder), never the
whole organization: two keys of one org never see each other's results.

Neither the key nor the result is stored in plaintext. The row holds sha256 of
the key and the result sealed with AES-256-GCM under a key derived (HKDF) from
the idempotency key, the scope and the method: a replay, which presents the
key, can open it; the rows alone (a backup, a read-only database role) cannot,
so the token a replay of ``devices.register`` returns is not readable at rest.
That protection is as strong as the key is unguessable: the SDK sends 122
random bits (uuid4); docs/design.md tells clients to do the same.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedrpc.auth import Principal
from fedrpc.db import Database
from fedrpc.errors import Conflict

log = logging.getLogger("fedrpc.idempotency")

_NONCE_BYTES = 12
IN_PROGRESS = "a call with this idempotency_key is in progress; retry shortly"


class StoredCall(msgspec.Struct):
    params_hash: bytes
    sealed_result: bytes | None


def scope_of(principal: Principal) -> str:
    """The principal a key belongs to: one API key or one device, not its organization."""
    if principal.kind == "device":
        return f"device:{principal.device_id}"
    return f"key:{principal.key_id}"


def _sealing_key(key: str, scope: str, method: str) -> bytes:
    # The scope and method are the HKDF info, so a sealed result cannot be moved to another
    # principal's or method's row and still open.
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=f"fedrpc idempotency result\x00{scope}\x00{method}".encode(),
    ).derive(key.encode())


def seal(result: bytes, key: str, scope: str, method: str) -> bytes:
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + AESGCM(_sealing_key(key, scope, method)).encrypt(nonce, result, None)


def unseal(sealed: bytes, key: str, scope: str, method: str) -> bytes:
    nonce, body = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
    return AESGCM(_sealing_key(key, scope, method)).decrypt(nonce, body, None)


async def run_once(
    db: Database,
    principal: Principal,
    method: str,
    key: str,
    params_hash: bytes,
    call: Callable[[], Awaitable[bytes]],
) -> bytes:
    scope = scope_of(principal)
    ids = {"scope": scope, "method": method, "key_hash": hashlib.sha256(key.encode()).digest()}
    claim = secrets.token_bytes(16)
    claimed = await db.value("idempotency.claim_key", params_hash=params_hash, claim=claim, **ids)
    if not claimed:
        stored = await db.maybe("idempotency.find_key", StoredCall, **ids)
        if stored is None or stored.sealed_result is None:
            raise Conflict(IN_PROGRESS)
        if stored.params_hash != params_hash:
            raise Conflict("this idempotency_key was already used with different params")
        try:
            return unseal(stored.sealed_result, key, scope, method)
        except InvalidTag:
            # Only a row altered at rest gets here (the key hash matched): refuse the replay
            # rather than run the call a second time.
            log.error("idempotency record of %s for %s does not open", method, scope)
            raise Conflict("the stored result of this idempotency_key is unreadable") from None
    try:
        result = await call()
    except BaseException:
        await db.run("idempotency.release_key", claim=claim, **ids)
        raise
    sealed = seal(result, key, scope, method)
    if not await db.run("idempotency.complete_key", sealed_result=sealed, claim=claim, **ids):
        # The claim was taken over after the stale limit while this call still ran: the
        # effect happened, the caller gets its answer, but the record is the new owner's.
        log.warning(
            "idempotency claim of %s for %s was taken over before completion", method, scope
        )
    return result
