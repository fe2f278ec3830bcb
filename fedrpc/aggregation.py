"""Aggregating a round into a new model version, with its I/O around the pure kernels.

The round is claimed in Postgres (running -> aggregating, with a lease) so two
callers cannot both aggregate it and a crashed worker's round is taken over.
Updates are streamed from S3 for the FedAvg family (a few fetched and
checked ahead on helper threads), or spilled to memory-mapped files for the
robust strategies, which read coordinate chunks. The new version's objects
are written first, then one transaction charges the privacy ledger, stores
the version and completes the round; any failure leaves no version row and
no object behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from fedrpc.db import Database
from fedrpc.errors import (
    AppError,
    BadRequest,
    Conflict,
    NotFound,
    PreconditionFailed,
    PrivacyBudgetExhausted,
)
from fedrpc.fl import InvalidInput
from fedrpc.fl.aggregate import (
    ROBUST,
    Outcome,
    aggregate_robust,
    aggregate_streaming,
    check_strategy,
)
from fedrpc.fl.artifacts import export_version
from fedrpc.fl.metrics import weighted_means
from fedrpc.fl.privacy import RoundCharge
from fedrpc.fl.tensors import (
    check_finite,
    check_matches,
    decode_state_dict,
    encode_safetensors,
    encode_torch,
    flatten,
    manifest_from_json,
    unflatten,
)
from fedrpc.privacy_ledger import DEFAULT_DELTA, charge_round, price
from fedrpc.storage import Storage
from fedrpc.versions import publish_version
from schemas.models.versions import ModelVersion
from schemas.training import Round

log = logging.getLogger("fedrpc.aggregation")
LEASE_SECONDS = 600
MEMORY_BUDGET_BYTES = 256 << 20
# At most this many updates are fetched and checked ahead of the one being aggregated
# (measured with 1M parameters: 2 -> 4 cut the update loop by about 10%, 6 gave nothing more).
MAX_PREFETCH = 4


class UpdateRow(msgspec.Struct):
    id: str
    device_id: str
    object_key: str
    sha256: str
    sample_count: int
    encoding: str
    metrics: dict[str, Any]


class BaseArtifacts(msgspec.Struct):
    manifest: list[dict[str, Any]]
    input_shape: list[int | None]
    weights_key: str
    program_key: str


class StateRow(msgspec.Struct):
    strategy: str
    version: int
    object_key: str
    sha256: str


class RoundFailed(AppError):
    """Aggregation cannot succeed for this round; it is marked failed with this reason."""

    type, code = "precondition_failed", PreconditionFailed.code


def _read_updates(
    storage: Storage, rows: list[UpdateRow], manifest
) -> Iterator[tuple[np.ndarray, int]]:
    """Each update as a flat float32 vector with its sample count, in row order.

    The next few updates are fetched and checked on helper threads while the
    caller adds the current one: the loop waits on S3 and on sha256 far more
    than on the kernel, and both release the GIL. Updates in flight stay
    within MEMORY_BUDGET_BYTES (at least one ahead); the first failing update
    in row order raises, as without prefetching.
    """
    # An update in flight holds its raw bytes (up to 8 per value) and its float32 vector.
    per_update = 12 * sum(spec.size for spec in manifest)
    depth = max(1, min(MAX_PREFETCH, MEMORY_BUDGET_BYTES // max(per_update, 1)))

    def load(row: UpdateRow) -> np.ndarray:
        return _checked_vector(storage.get_blocking(row.object_key), row, manifest)

    with ThreadPoolExecutor(depth, thread_name_prefix="fedrpc-prefetch") as pool:
        pending: deque[tuple[Future[np.ndarray], int]] = deque()
        try:
            for row in rows:
                pending.append((pool.submit(load, row), row.sample_count))
                if len(pending) > depth:
                    future, samples = pending.popleft()
                    yield future.result(), samples
            while pending:
                future, samples = pending.popleft()
                yield future.result(), samples
        finally:
            for future, _ in pending:  # stopped early: drop what has not started
                future.cancel()


def _checked_vector(data: bytes, row: UpdateRow, manifest) -> np.ndarray:
    """The update's flat float32 vector once its bytes, tensors and values pass every check."""
    if hashlib.sha256(data).hexdigest() != row.sha256:
        raise RoundFailed(f"update {row.id} changed in storage since it was accepted")
    try:
        state = decode_state_dict(data, row.encoding, field=f"update {row.id}")
        check_matches(state, manifest)
        check_finite(state)
    except InvalidInput as exc:
        raise RoundFailed(f"update {row.id} is unusable: {exc}") from None
    return flatten(state, manifest)


def _compute(
    storage: Storage,
    rnd: Round,
    strategy: str,
    params: dict,
    rows: list[UpdateRow],
    manifest,
    base_bytes: bytes,
    server_state: dict[str, np.ndarray],
) -> tuple[Outcome, dict[str, np.ndarray]]:
    """The aggregate and the new state dict; CPU and blocking I/O, so it runs in a worker thread."""
    base_state = decode_state_dict(base_bytes, "safetensors", field="base weights")
    base = flatten(base_state, manifest)
    updates = _read_updates(storage, rows, manifest)
    if strategy in ROBUST:
        with tempfile.TemporaryDirectory(prefix="fedrpc-agg-") as spill:
            sources = []
            for i, (vector, _) in enumerate(updates):
                path = Path(spill) / f"{i}.f32"
                vector.tofile(path)
                sources.append(np.memmap(path, dtype=np.float32, mode="r", shape=vector.shape))
            outcome = aggregate_robust(
                strategy,
                params,
                base,
                sources,
                [r.sample_count for r in rows],
                update_format=rnd.update_format,
                memory_budget_bytes=MEMORY_BUDGET_BYTES,
            )
    else:
        dp = (
            (rnd.dp_config["noise_multiplier"], rnd.dp_config["clipping_norm"])
            if rnd.dp_config
            else None
        )
        # DP noise must be unpredictable: the generator is seeded from the OS's cryptographic source.
        rng = np.random.default_rng(secrets.randbits(128))
        outcome = aggregate_streaming(
            strategy,
            params,
            base,
            updates,
            update_format=rnd.update_format,
            server_state=server_state,
            dp=dp,
            rng=rng,
        )
    new_state = unflatten(outcome.vector, manifest, base_state)
    try:
        check_finite(new_state)
    except InvalidInput:
        raise RoundFailed("the aggregate holds NaN or infinite values") from None
    return outcome, new_state


def _artifacts(program_bytes: bytes, new_state: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The new version's four objects (worker thread: the ONNX re-export takes seconds)."""
    program, onnx = export_version(program_bytes, new_state)
    return {
        "safetensors": encode_safetensors(new_state),
        "torch": encode_torch(new_state),
        "onnx": onnx,
        "program": program,
    }


async def _claim(db: Database, round_id: str) -> None:
    if await db.value(
        "training.aggregate.claim_round_for_aggregation",
        round_id=round_id,
        lease_seconds=LEASE_SECONDS,
    ):
        return
    state = await db.value("training.find_round_state", round_id=round_id)
    if state is None:
        raise NotFound("no round with this id")
    if state == "aggregating":
        raise Conflict("the round is being aggregated by another call", state=state)
    raise PreconditionFailed(
        f"the round is {state}; aggregation needs it running", state=state, allowed=["running"]
    )


async def _server_state(
    db: Database, storage: Storage, model_id: str, strategy: str
) -> dict[str, np.ndarray]:
    row = await db.maybe("training.aggregate.find_server_state", StateRow, model_id=model_id)
    if row is None or row.strategy != strategy:
        return {}
    return decode_state_dict(await storage.get(row.object_key), "safetensors", field="server state")


async def aggregate_round(
    db: Database,
    storage: Storage,
    round_id: str,
    *,
    strategy: str | None = None,
    params: dict[str, float] | None = None,
    min_updates: int | None = None,
) -> ModelVersion:
    """Aggregate a running round into a new version of its model, or explain why not."""
    rnd = await db.get(
        "training.aggregate.get_round", Round, round_id=round_id, missing="no round with this id"
    )
    if rnd.secagg_config is not None:
        raise PreconditionFailed(
            "a secure-aggregation round is aggregated by its SecAgg+ session", state=rnd.state
        )
    name = strategy or rnd.strategy
    try:
        full_params = check_strategy(
            name,
            params if params is not None else rnd.strategy_params,
            dp=rnd.dp_config is not None,
        )
    except InvalidInput as exc:
        raise BadRequest(str(exc)) from None
    rows = await db.all("training.aggregate.list_round_updates", UpdateRow, round_id=round_id)
    needed = min_updates or rnd.min_updates
    if len(rows) < needed:
        raise PreconditionFailed(
            f"the round has {len(rows)} updates and needs {needed}",
            state=rnd.state,
            received=len(rows),
            min_updates=needed,
        )
    await _claim(db, round_id)
    try:
        return await _aggregate_claimed(db, storage, rnd, name, full_params, rows)
    except (RoundFailed, PrivacyBudgetExhausted, NotFound) as exc:
        # These will not pass by retrying: the round fails with the reason.
        await db.run(
            "training.aggregate.update_round_failed", round_id=round_id, reason=exc.message
        )
        raise
    except InvalidInput as exc:
        # Strategy parameters impossible for this many updates: retry with others.
        await db.run("training.aggregate.update_round_running_again", round_id=round_id)
        raise BadRequest(str(exc)) from None
    except BaseException:
        # Storage down, a lost connection, a bug: leave the round retryable.
        await db.run("training.aggregate.update_round_running_again", round_id=round_id)
        raise


async def _aggregate_claimed(
    db: Database, storage: Storage, rnd: Round, strategy: str, params: dict, rows: list[UpdateRow]
) -> ModelVersion:
    base = await db.get(
        "training.aggregate.find_base_artifacts",
        BaseArtifacts,
        model_id=rnd.model_id,
        version=rnd.base_version,
        missing="the base version is gone",
    )
    manifest = manifest_from_json(base.manifest)
    charge = None
    if rnd.dp_config is not None:
        selected = await db.value("training.aggregate.count_round_devices", round_id=rnd.id)
        charge = RoundCharge(
            rnd.dp_config["noise_multiplier"],
            min(1.0, selected / (rnd.eligible_count or selected)),
            1,
        )
        budget = await db.get(
            "training.aggregate.get_federation_budget", _Budget, federation_id=rnd.federation_id
        )
        check = await price(
            db,
            rnd.federation_id,
            charge,
            delta=budget.total_delta_budget or DEFAULT_DELTA,
            epsilon_budget=budget.total_epsilon_budget,
        )
        if check.exceeds_budget:
            raise PrivacyBudgetExhausted(
                "this round would exceed the federation's privacy budget",
                projected_epsilon=check.projected_epsilon,
                budget_epsilon=budget.total_epsilon_budget,
            )
    base_bytes, program_bytes = (
        await storage.get(base.weights_key),
        await storage.get(base.program_key),
    )
    server_state = await _server_state(db, storage, rnd.model_id, strategy)
    outcome, new_state = await asyncio.to_thread(
        _compute, storage, rnd, strategy, params, rows, manifest, base_bytes, server_state
    )
    artifacts = await asyncio.to_thread(_artifacts, program_bytes, new_state)
    metrics = {**weighted_means([(r.metrics, r.sample_count) for r in rows]), **outcome.metrics}
    state_object = None
    if outcome.server_state:
        key = f"models/{rnd.model_id}/server-state/{secrets.token_hex(12)}.safetensors"
        state_object = await storage.put(key, encode_safetensors(outcome.server_state))

    async def along_with(tx: Database, version: int) -> None:
        if charge is not None:
            await charge_round(tx, rnd.federation_id, rnd.id, charge)
        if state_object is not None:
            await tx.run(
                "training.aggregate.upsert_server_state",
                model_id=rnd.model_id,
                strategy=strategy,
                version=version,
                object_key=state_object.key,
                sha256=state_object.sha256,
            )
        await tx.run("training.aggregate.update_round_completed", round_id=rnd.id, version=version)

    try:
        return await publish_version(
            db,
            storage,
            rnd.model_id,
            artifacts,
            manifest=base.manifest,
            input_shape=base.input_shape,
            parent_version=rnd.base_version,
            round_id=rnd.id,
            strategy=strategy,
            num_updates=len(rows),
            total_samples=sum(r.sample_count for r in rows),
            metrics=metrics,
            along_with=along_with,
        )
    except BaseException:
        await storage.delete_quietly([state_object.key] if state_object else [])
        raise


class _Budget(msgspec.Struct):
    total_epsilon_budget: float | None
    total_delta_budget: float | None
