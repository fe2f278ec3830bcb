"""training.device_jobs.*: what a device is doing, reported by the device itself.

A job moves along one path and can drop out of it at any point::

    queued -> downloading -> training -> uploading -> completed
      |           |              |            |
      +-----------+--------------+------------+------> failed

``update_status`` may also repeat the current state to report progress;
``completed`` is reached only through ``complete`` (which records the final
metrics); ``completed`` and ``failed`` are final. Every move is one guarded
UPDATE (``WHERE state = ANY(from_states)``), so two racing reports cannot both
win; a refused move is ``precondition_failed`` with the job's current state in
``data.state`` and the states it would need in ``data.allowed``.

A federated job follows its round. While the round is selected or running the
job may advance; once the round is cancelled or failed (or, for anything but
``complete``, aggregating or completed) the only move left is to ``failed``,
and any other report is ``precondition_failed`` with ``data.stop = true`` and
``data.round_state``: the device should stop working and report the job
failed. Jobs are not failed behind the device's back when a round is cancelled;
the device learns it on its next report (or from ``devices.sync``).
"""

from __future__ import annotations

import msgspec

from fedrpc.auth import new_id
from fedrpc.context import Context
from fedrpc.db import constraint_message, jsonb
from fedrpc.errors import BadRequest, Forbidden, PreconditionFailed
from fedrpc.registry import DEVICE, rpc_method
from fedrpc.services.policy import model_for_reading, version_for_reading
from schemas.training.device_jobs import CompleteParams, CreateParams, Job, UpdateStatusParams

ROUND_DEVICE_KEY = "device_jobs_round_device_key"
constraint_message(
    ROUND_DEVICE_KEY,
    "this device already has a job for this round; open another only after it failed",
)

# Where each reported state may be reached from (a state may repeat itself to report progress).
FROM_STATES: dict[str, tuple[str, ...]] = {
    "queued": ("queued",),
    "downloading": ("queued", "downloading"),
    "training": ("downloading", "training"),
    "uploading": ("training", "uploading"),
    "failed": ("queued", "downloading", "training", "uploading"),
}
COMPLETE_FROM = ("uploading",)
# Round states in which a federated job may be opened or advanced, and in which it may still complete.
WORKING_ROUND_STATES = ("selected", "running")
COMPLETE_ROUND_STATES = ("selected", "running", "aggregating", "completed")


class _RoundForDevice(msgspec.Struct):
    state: str
    model_id: str
    base_version: int
    selected: bool


class _JobState(msgspec.Struct):
    device_id: str
    state: str
    model_id: str
    round_id: str | None
    round_state: str | None


@rpc_method(DEVICE)
async def create(ctx: Context, p: CreateParams) -> Job:
    """Open a queued job for the calling device.

    A federated job needs a round the device is selected in, in state selected
    or running, and the round's own model_id and base_version (else
    `bad_request`); a device that is not selected gets `forbidden`, a round in
    another state `precondition_failed` with `data.state`, and a second live
    job for the same round `conflict` (a new one is allowed after a job failed).
    A personalization job needs a model the device's organization may read and
    an existing version (a draft only when its own organization owns the model).
    """
    if p.job_type == "personalization":
        model = await model_for_reading(ctx, p.model_id)
        await version_for_reading(
            ctx, model, p.base_version, missing="the model has no such base_version"
        )
    job = await ctx.db.maybe(
        "training.device_jobs.insert_job",
        Job,
        id=new_id("job"),
        device_id=ctx.device_id,
        job_type=p.job_type,
        round_id=p.round_id,
        model_id=p.model_id,
        base_version=p.base_version,
        round_states=list(WORKING_ROUND_STATES),
    )
    if job is None:
        await _explain_round(ctx, p)
    return job


async def _explain_round(ctx: Context, p: CreateParams) -> None:
    found = await ctx.db.get(
        "training.device_jobs.find_round_for_device",
        _RoundForDevice,
        round_id=p.round_id,
        device_id=ctx.device_id,
        missing="no round with this id",
    )
    if not found.selected:
        raise Forbidden("this device is not selected for the round")
    if (found.model_id, found.base_version) != (p.model_id, p.base_version):
        raise BadRequest(
            f"the round trains version {found.base_version} of model {found.model_id}",
            model_id=found.model_id,
            base_version=found.base_version,
        )
    raise PreconditionFailed(
        f"the round is {found.state}; a job needs it {' or '.join(WORKING_ROUND_STATES)}",
        state=found.state,
        allowed=list(WORKING_ROUND_STATES),
    )


@rpc_method(DEVICE)
async def update_status(ctx: Context, p: UpdateStatusParams) -> Job:
    """Report progress or move the job one step; only the job's own device may.

    `progress` (if given) replaces the stored progress map; `last_error` (if
    given) replaces the stored error text. Reporting `completed` here is
    `bad_request`: use training.device_jobs.complete. See the module notes for
    the transition graph and what happens once the round is cancelled.
    """
    if p.state == "completed":
        raise BadRequest("a job is completed through training.device_jobs.complete", field="state")
    from_states = FROM_STATES[p.state]
    round_states = None if p.state == "failed" else list(WORKING_ROUND_STATES)
    job = await ctx.db.maybe(
        "training.device_jobs.update_job_status",
        Job,
        job_id=p.job_id,
        device_id=ctx.device_id,
        state=p.state,
        from_states=list(from_states),
        round_states=round_states,
        last_error=p.last_error,
        progress=None if p.progress is None else jsonb(p.progress),
    )
    if job is None:
        await _explain_refusal(ctx, p.job_id, p.state, from_states, WORKING_ROUND_STATES)
    return job


@rpc_method(DEVICE)
async def complete(ctx: Context, p: CompleteParams) -> Job:
    """Finish an uploading job: state completed, with its final metrics; completing twice is refused.

    `adapter_key` may only name an object the server stored for this device
    and job: the weights_key of its personalized state for the job's model, or
    its accepted update in the job's round (anything else is `forbidden`, so a
    device cannot point at another device's object). `adapter_sha256`, when
    given, must equal the stored digest; when left out the stored one is used.
    A replay with the same idempotency_key returns the first result.
    """
    adapter_sha256 = None if p.adapter_key is None else await _adapter_digest(ctx, p)
    job = await ctx.db.maybe(
        "training.device_jobs.complete_job",
        Job,
        job_id=p.job_id,
        device_id=ctx.device_id,
        from_states=list(COMPLETE_FROM),
        round_states=list(COMPLETE_ROUND_STATES),
        metrics=jsonb(p.metrics),
        adapter_key=p.adapter_key,
        adapter_sha256=adapter_sha256,
    )
    if job is None:
        await _explain_refusal(ctx, p.job_id, "completed", COMPLETE_FROM, COMPLETE_ROUND_STATES)
    return job


async def _own_job(ctx: Context, job_id: str) -> _JobState:
    found = await ctx.db.get(
        "training.device_jobs.find_job", _JobState, job_id=job_id, missing="no job with this id"
    )
    if found.device_id != ctx.device_id:
        raise Forbidden("the job belongs to another device")
    return found


async def _adapter_digest(ctx: Context, p: CompleteParams) -> str:
    job = await _own_job(ctx, p.job_id)
    stored = await ctx.db.value(
        "training.device_jobs.find_job_object",
        device_id=ctx.device_id,
        model_id=job.model_id,
        round_id=job.round_id,
        object_key=p.adapter_key,
    )
    if stored is None:
        raise Forbidden(
            "adapter_key must name an object stored for this device and this job",
            field="adapter_key",
        )
    if p.adapter_sha256 is not None and p.adapter_sha256 != stored:
        raise BadRequest("adapter_sha256 does not match the stored object", field="adapter_sha256")
    return stored


async def _explain_refusal(
    ctx: Context,
    job_id: str,
    target: str,
    from_states: tuple[str, ...],
    round_states: tuple[str, ...],
) -> None:
    """Why a guarded UPDATE touched no row: unknown job, someone else's, wrong state, or a stopped round."""
    found = await _own_job(ctx, job_id)
    if found.state not in from_states:
        raise PreconditionFailed(
            f"the job is {found.state}; {target} needs it {' or '.join(from_states)}",
            state=found.state,
            allowed=list(from_states),
        )
    raise PreconditionFailed(
        f"the round is {found.round_state} and this needs it {' or '.join(round_states)}: "
        "stop working on this job and report it failed",
        state=found.state,
        round_state=found.round_state,
        stop=True,
    )
