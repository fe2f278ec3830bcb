"""A SecAgg+ session's result: reconstruct, unmask, dequantize, store; and hand it to aggregation.

:func:`finish` runs once, in the stage-3 call that brings the last needed
share, inside that call's locked transaction; the arithmetic runs on a worker
thread so the event loop keeps serving other calls. The masked vectors are
read from S3 one at a time and summed as they arrive, so memory stays at a few
vectors whatever the cohort. The stored result is the survivors' weighted
average as safetensors (the round's update format) with their total weight:
``training.aggregate`` combines it as the FedAvg family's one input.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from fedrpc.db import Database
from fedrpc.errors import PreconditionFailed
from fedrpc.fl import InvalidInput
from fedrpc.fl.secagg import keys, masking, quantize, shamir
from fedrpc.fl.tensors import decode_state_dict, encode_safetensors, manifest_from_json, unflatten
from fedrpc.services.update_loop import UpdateRow
from fedrpc.storage import Storage

if TYPE_CHECKING:
    from fedrpc.services.secagg_session import Participant, Session, Target

log = logging.getLogger("fedrpc.secagg")

#: Masked vectors fetched from S3 ahead of the sum.
_PREFETCH = 4


def spec_of(config: dict[str, Any]) -> quantize.QuantSpec:
    return quantize.QuantSpec(
        clip=config["clip"],
        bits=config["quantization_bits"],
        max_weight=config["max_weight"],
        modulus_bits=config["modulus_bits"],
    )


class ShareRow(msgspec.Struct):
    """One stage-3 share as stored: ``holder`` gave it, of ``owner``'s secret ``kind``."""

    holder: int
    owner: int
    kind: str
    share: bytes


class _Key(msgspec.Struct):
    idx: int
    pk1: bytes
    pk2: bytes


class _Vector(msgspec.Struct):
    sender: int
    data: bytes | None
    object_key: str | None


class _Base(msgspec.Struct):
    manifest: list[dict[str, Any]]
    weights_key: str


class Failure(msgspec.Struct):
    reason: str
    may_wait: bool  # more stage-3 shares could still make it succeed


class Secrets(msgspec.Struct):
    """What unmasking needs besides the vectors: reconstructed seeds and the dropped pairs."""

    self_seeds: list[bytes]
    dropped_pairs: list[tuple[int, int, bytes]]
    wrong_holders: list[int]  # indices whose stage-3 shares disagreed with the others


def recover_secrets(
    session_id: str,
    threshold: int,
    nbrs: dict[int, tuple[int, ...]],
    survivor_pk1: dict[int, bytes],
    dropped: list[int],
    shares: dict[tuple[str, int], dict[int, bytes]],
) -> Secrets:
    """Rebuild each survivor's self-mask seed and each dropped device's pairwise seeds with its
    surviving neighbours from ``t`` Shamir shares each (pure; worker thread)."""
    alive = sorted(survivor_pk1)
    # recover_many: a wrong share among spares is outvoted, not fatal (one liar, one session).
    b_of, wrong = shamir.recover_many([shares[("self", i)] for i in alive], threshold)
    sk_of = {}
    if dropped:
        keys_of, wrong_keys = shamir.recover_many([shares[("key", j)] for j in dropped], threshold)
        sk_of = dict(zip(dropped, keys_of, strict=True))
        wrong += wrong_keys
    pairs = [
        (i, j, keys.pairwise_mask_seed(keys.agree(sk_of[j], survivor_pk1[i]), session_id, i, j))
        for j in dropped
        for i in nbrs[j]
        if i in survivor_pk1
    ]
    selfs = [keys.self_mask_seed(b, session_id, i) for i, b in zip(alive, b_of, strict=True)]
    return Secrets(selfs, pairs, sorted({x for xs in wrong for x in xs}))


def _masked_vectors(storage: Storage, rows: list[_Vector], bits: int, d: int) -> Iterator:
    with ThreadPoolExecutor(_PREFETCH, thread_name_prefix="fedrpc-secagg") as pool:
        pending = [
            pool.submit(storage.get_blocking, r.object_key) if r.data is None else None
            for r in rows
        ]
        for row, fetched in zip(rows, pending, strict=True):
            data = row.data if fetched is None else fetched.result()
            yield masking.unpack(data, bits, d + 1)


def _unmasked_average(
    storage: Storage,
    config: dict[str, Any],
    vectors: list[_Vector],
    found: Secrets,
    base: _Base,
    base_bytes: bytes,
) -> tuple[bytes, int]:
    """The survivors' weighted average as safetensors and their total weight (worker thread)."""
    bits, d = config["modulus_bits"], config["dimension"]
    total = masking.sum_vectors(_masked_vectors(storage, vectors, bits, d), bits)
    plain = masking.unmask(total, found.self_seeds, found.dropped_pairs, bits)
    spec = spec_of(config)
    if config.get("l2_norm_bound") is None:
        mean, weight = quantize.dequantize(plain, spec)
    else:
        # Central DP: the folded sum of weight-1 updates, over the survivors the server counted.
        weight = len(vectors)
        mean = quantize.dp_sum(plain, weight, spec) / weight
    manifest = manifest_from_json(base.manifest)
    base_state = decode_state_dict(base_bytes, "safetensors", field="base weights")
    state = unflatten(mean.astype(np.float32), manifest, base_state)
    return encode_safetensors(state), weight


async def finish(
    db: Database,
    storage: Storage,
    s: Session,
    nbrs: dict[int, tuple[int, ...]],
    completers: dict[int, Participant],
    survivors: dict[int, Participant],
    target: Target,
) -> Failure | None:
    """Every needed secret has ``t`` shares: compute, store and record the session's result.

    Returns why it could not instead: shares that do not add up (``may_wait``:
    more shares may outvote a wrong one), or vectors that do not.
    """
    rows = await db.all("training.secagg.list_shares", ShareRow, session_id=s.id)
    shares: dict[tuple[str, int], dict[int, bytes]] = {}
    for r in rows:
        shares.setdefault((r.kind, r.owner), {})[r.holder] = r.share
    survivor_keys = await db.all(
        "training.secagg.list_participant_keys", _Key, session_id=s.id, indices=sorted(survivors)
    )
    vectors = await db.all("training.secagg.list_vectors", _Vector, session_id=s.id)
    base = await db.get(
        "training.aggregate.find_base_artifacts",
        _Base,
        model_id=target.model_id,
        version=target.base_version,
        missing="the base version is gone",
    )
    dropped = sorted(set(completers) - set(survivors))
    try:
        found = await asyncio.to_thread(
            recover_secrets,
            s.id,
            s.config["threshold"],
            nbrs,
            {k.idx: k.pk1 for k in survivor_keys},
            dropped,
            shares,
        )
    except InvalidInput as exc:
        return Failure(f"unmasking failed: {exc}", may_wait=True)
    base_bytes = await storage.get(base.weights_key)
    try:
        data, weight = await asyncio.to_thread(
            _unmasked_average, storage, s.config, vectors, found, base, base_bytes
        )
    except InvalidInput as exc:
        return Failure(f"unmasking failed: {exc}", may_wait=False)
    if found.wrong_holders:
        log.warning(
            "SecAgg+ session %s: stage-3 shares of device indices %s disagreed with the others "
            "and were outvoted",
            s.id,
            found.wrong_holders,
        )
    # A fresh key per write (a retried unmask after a crash writes again): the earlier
    # object, named by no row, is the storage collector's to delete.
    stored = await storage.put(
        f"secagg/{s.round_id}/{s.id}/mean-{secrets.token_hex(6)}.safetensors", data
    )
    completed = await db.run(
        "training.secagg.update_session_completed",
        session_id=s.id,
        result_key=stored.key,
        result_sha256=stored.sha256,
        total_weight=weight,
        survivors=len(vectors),
    )
    if not completed:
        # Another call completed (or failed) the session first: its result stands, and the
        # object written here is named by no row.
        await storage.delete_quietly([stored.key])
        return None
    await db.run("training.secagg.update_round_due_now", round_id=s.round_id)
    return None


class Outcome(msgspec.Struct):
    id: str
    stage: str
    failure_reason: str | None
    result_key: str | None
    result_sha256: str | None
    total_weight: int | None
    survivors: int | None
    survivor_orgs: list[str]
    participant_orgs: list[str]


async def session_result(db: Database, round_id: str, state: str) -> tuple[UpdateRow, Outcome]:
    """A secure round's aggregate input: its completed session's weighted average as the one
    'update' the FedAvg family combines (weighted by the survivors' total weight)."""
    found = await db.maybe("training.secagg.find_session_result", Outcome, round_id=round_id)
    if found is None or found.stage != "completed":
        stage = "none" if found is None else found.stage
        raise PreconditionFailed(
            "a secure-aggregation round is aggregated from its completed SecAgg+ session; "
            f"the session is {'not started' if found is None else stage}",
            state=state,
            session_stage=stage,
        )
    row = UpdateRow(
        id=found.id,
        device_id="",
        object_key=found.result_key,
        sha256=found.result_sha256,
        sample_count=found.total_weight,
        encoding="safetensors",
        metrics={},
    )
    return row, found
