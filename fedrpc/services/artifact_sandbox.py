"""Tenant-supplied model artifacts are parsed and run in a child process, under limits.

An org admin's ONNX graph and ``torch.export`` program are untrusted: a graph
can declare an input of 10^18 elements, allocate 40 GB at run time or loop
for hours, and a crafted archive can crash a parser. So the server never
parses or runs them itself. Registration's check
(:func:`fedrpc.fl.artifacts.validate_bundle`) and the making of each new
version's ONNX model and program from its base's
(:func:`~fedrpc.fl.artifacts.export_version`) run in a child of the validator
process (:mod:`fedrpc.services.artifact_worker`), one fresh fork per job, with
an address-space limit, a CPU-time limit and a wall-clock alarm; the server
stops waiting, and the child is killed, shortly after the wall-clock limit
in any case. Inputs go to the child as files, results come back as files and
a small JSON verdict decoded strictly (never pickle). A child that is killed,
runs out of memory or crashes costs its caller a ``bad_request`` naming the
artifact and the limit (``data.reason``: ``memory_limit``, ``time_limit`` or
``check_failed``), and the server carries on. At most ``concurrency`` jobs
run at once; a job that finds no free slot within ``SLOT_WAIT`` seconds is
refused with ``rate_limited``; one organization's registrations may hold at
most ``concurrency - 1`` of them (at least one). Limits come from settings
(:meth:`SandboxLimits.from_settings`, ``docs/model-artifacts.md``).

The validator process starts on first use, or when an app starts
(:func:`configure`), and serves every app of the server process; it exits
with the server. This is a resource sandbox, not a security boundary: the
child runs as the server's user, without the server's environment.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np

from fedrpc.errors import BadRequest, InternalError, RateLimited
from fedrpc.fl.artifacts import BundleInfo
from fedrpc.fl.onnx_models import DEFAULT_MAX_INPUT_ELEMENTS
from fedrpc.fl.tensor_codecs import encode_safetensors
from fedrpc.fl.tensors import TensorSpec, manifest_to_json
from fedrpc.services import artifact_worker as worker
from fedrpc.services.artifact_worker import Job, Request, Verdict

__all__ = ["SANDBOX", "ArtifactSandbox", "MadeVersion", "SandboxLimits", "configure"]

T = TypeVar("T")
log = logging.getLogger("fedrpc.services.artifact_sandbox")

#: The validator process's imports and warm-up (about 8 s here), allowed on a slow machine.
START_TIMEOUT = 180.0
#: Seconds past a job's own limit before the server stops waiting and the child is killed.
GRACE = 5.0
#: Seconds a job waits for a free slot before it is refused with rate_limited.
SLOT_WAIT = 10.0
#: Environment the validator process keeps (no credentials: it needs none).
_ENV_KEPT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "VIRTUAL_ENV")
_FIELDS = {"weights_data": "weights", "onnx_data": "onnx", "program_data": "program"}
_BAD_EXITS = {int(signal.SIGALRM): "time_limit", int(signal.SIGXCPU): "time_limit"}
# _wait's status when the validator's connection closed without an answer.
WORKER_DIED = 255


class SandboxLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What one job may use (FEDRPC_ARTIFACT_CHECK_* and FEDRPC_ARTIFACT_MAX_INPUT_ELEMENTS)."""

    memory_bytes: int = 4 * 1024**3
    seconds: float = 60.0
    concurrency: int = 2
    max_input_elements: int = DEFAULT_MAX_INPUT_ELEMENTS

    @classmethod
    def from_settings(cls, settings: Any) -> SandboxLimits:
        return cls(
            memory_bytes=settings.artifact_check_memory_bytes,
            seconds=settings.artifact_check_seconds,
            concurrency=settings.artifact_check_concurrency,
            max_input_elements=settings.artifact_max_input_elements,
        )


class MadeVersion(msgspec.Struct, frozen=True):
    """A new version's ONNX model and program, how they were made, and the template to keep."""

    onnx: bytes
    program: bytes
    route: str
    onnx_template: bytes | None


class _Worker:
    """The validator process (:mod:`fedrpc.services.artifact_worker`), started on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._folder: Path | None = None

    def ensure(self) -> tuple[Path, bool]:
        """Its folder (socket and job folders) and whether it finished warming up."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert self._folder is not None
            return self._folder, (self._folder / worker.READY).exists()

    def restart(self) -> None:
        with self._lock:
            self._stop()
            self._start()

    def _start(self) -> None:
        self._stop()
        folder = Path(tempfile.mkdtemp(prefix="fedrpc-artifacts-"))
        env = {k: os.environ[k] for k in _ENV_KEPT if k in os.environ}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        # One thread each: BLAS and OpenMP pools would be forked half-alive.
        env |= {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(folder / "socket"))
            listener.listen(64)
            self._proc = subprocess.Popen(
                [sys.executable, "-m", worker.__name__, str(listener.fileno()), worker.READY],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                pass_fds=(listener.fileno(),),
                cwd=folder,
                env=env,
                start_new_session=True,  # the terminal's ^C is the server's, not the worker's
            )
        self._folder = folder

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            ready = self._folder is not None and (self._folder / worker.READY).exists()
            if proc.stdin is not None:
                proc.stdin.close()  # once serving, it kills its children and exits
            try:
                proc.wait(2 if ready else 0)  # still warming up, it would not notice
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _mib(n: int) -> str:
    return f"{n / 1024**2:,.0f} MiB"


def _refusal(reason: str, stage: str, limits: SandboxLimits, prefix: str) -> BadRequest:
    what = stage or "the model artifacts"
    details: dict[str, Any] = {"reason": reason}
    if stage:
        details["field"] = _FIELDS[stage]
    if reason == "memory_limit":
        text = f"{what}: checking it needed more memory than the {_mib(limits.memory_bytes)} a check may use"
        details["memory_limit_bytes"] = limits.memory_bytes
    elif reason == "time_limit":
        text = f"{what}: checking it took longer than the {limits.seconds:g} s a check may take"
        details["time_limit_seconds"] = limits.seconds
    elif reason == "export_failed":
        text = "the ONNX model exported from program_data disagrees with the program"
        details.pop("field", None)
    else:
        text = f"{what}: the check stopped unexpectedly; the artifact cannot be used"
    return BadRequest(prefix + text, **details)


class ArtifactSandbox:
    """Runs artifact jobs in the validator process's children (see the module doc)."""

    def __init__(self) -> None:
        self.limits = SandboxLimits()
        self._worker = _Worker()
        self._slots = threading.Condition()
        self._running = 0
        self._by_owner: dict[str, int] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(16, "artifact-sandbox")
        atexit.register(self._worker.stop)

    def configure(self, limits: SandboxLimits, *, start: bool = True) -> None:
        """Set the limits of calls that name none; start the validator process now."""
        self.limits = limits
        if start:
            self._worker.ensure()

    # -- the two jobs -------------------------------------------------------------------------

    def check_bundle(
        self,
        weights: bytes,
        encoding: str,
        onnx: bytes,
        program: bytes,
        limits: SandboxLimits | None = None,
        owner: str | None = None,
    ) -> BundleInfo:
        """:func:`fedrpc.fl.artifacts.validate_bundle`, in a child (blocking).

        ``owner`` (an organization) may hold at most ``concurrency - 1`` slots
        (at least 1), so one tenant's checks cannot take every slot.

        Raises ``InvalidInput``'s message as ``BadRequest``, and ``BadRequest``
        (``data.reason``) when the child hit a limit or failed.
        """
        limits = limits or self.limits
        job = Job("check", limits.max_input_elements, weights_encoding=encoding)
        inputs = {"weights": weights, "onnx": onnx, "program": program}
        verdict, _ = self._run(job, inputs, (), limits, prefix="", owner=owner)
        assert verdict.manifest is not None and verdict.input_shape is not None  # _complete
        return BundleInfo(
            [TensorSpec(s.name, tuple(s.shape), s.dtype) for s in verdict.manifest],
            tuple(verdict.input_shape),
            verdict.onnx_input_name,
            verdict.max_abs_diff,
        )

    async def check_bundle_async(
        self,
        weights: bytes,
        encoding: str,
        onnx: bytes,
        program: bytes,
        limits: SandboxLimits,
        owner: str | None = None,
    ) -> BundleInfo:
        """:meth:`check_bundle` on the sandbox's own threads (the default pool stays free)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.check_bundle, weights, encoding, onnx, program, limits, owner
        )

    async def in_own_threads(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn`` (which waits for a sandbox job) on the sandbox's threads: a job may wait up
        to its limit and more, and the default pool carries every S3 call."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def make_version(
        self,
        program: bytes,
        new_state: Mapping[str, np.ndarray],
        manifest: list[TensorSpec],
        *,
        template: bytes | None,
        base_onnx: bytes | None,
        limits: SandboxLimits | None = None,
        owner: str | None = None,
    ) -> MadeVersion:
        """:func:`fedrpc.fl.artifacts.export_version`, in a child (blocking).

        Without a ``template``, the child makes one from ``base_onnx`` when it
        can. A re-export that disagrees with its program is a ``BadRequest``
        too (``data.reason = "export_failed"``): the same program would fail
        again. ``owner`` (the round's organization) holds at most all but one slot, as
        for checks: one tenant's slow exports cannot stall every other tenant's.
        """
        limits = limits or self.limits
        job = Job("export", limits.max_input_elements, manifest=manifest_to_json(manifest))
        inputs = {"program": program, "state": encode_safetensors(dict(new_state))}
        if template is not None:
            inputs["template"] = template
        elif base_onnx is not None:
            inputs["base.onnx"] = base_onnx
        prefix = "the new version's ONNX model and program could not be made: "
        outputs = (worker.ONNX_OUT, worker.PROGRAM_OUT, worker.TEMPLATE_OUT)
        verdict, files = self._run(job, inputs, outputs, limits, prefix=prefix, owner=owner)
        if worker.ONNX_OUT not in files or worker.PROGRAM_OUT not in files:
            raise _refusal("check_failed", "", limits, prefix)
        return MadeVersion(
            files[worker.ONNX_OUT],
            files[worker.PROGRAM_OUT],
            verdict.route,
            files.get(worker.TEMPLATE_OUT) if verdict.has_template else None,
        )

    # -- running a job ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _slot(self, limits: SandboxLimits, owner: str | None) -> Iterator[None]:
        share = max(1, limits.concurrency - 1)

        def free() -> bool:
            mine = self._by_owner.get(owner, 0) if owner is not None else 0
            return self._running < limits.concurrency and mine < share

        with self._slots:
            if not self._slots.wait_for(free, SLOT_WAIT):
                raise RateLimited(
                    "every model-artifact check slot open to this caller is busy; retry later",
                    retry_after=int(SLOT_WAIT),
                    reason="artifact_checks_busy",
                )
            self._running += 1
            if owner is not None:
                self._by_owner[owner] = self._by_owner.get(owner, 0) + 1
        try:
            yield
        finally:
            with self._slots:
                self._running -= 1
                if owner is not None:
                    self._by_owner[owner] -= 1
                    if not self._by_owner[owner]:
                        del self._by_owner[owner]
                self._slots.notify_all()

    def _run(
        self,
        job: Job,
        inputs: dict[str, bytes],
        outputs: tuple[str, ...],
        limits: SandboxLimits,
        *,
        prefix: str,
        owner: str | None = None,
    ) -> tuple[Verdict, dict[str, bytes]]:
        with self._slot(limits, owner):
            root, ready = self._worker.ensure()
            with tempfile.TemporaryDirectory(prefix="fedrpc-artifact-job-") as name:
                folder = Path(name)
                for file, data in inputs.items():
                    (folder / file).write_bytes(data)
                (folder / worker.JOB).write_bytes(msgspec.json.encode(job))
                started = time.monotonic()
                status = self._wait(root, folder, limits, ready)
                stage = _read_stage(folder)
                verdict = _read_verdict(folder) if status == 0 else None
                files = {}
                if verdict is not None and verdict.outcome == "ok":
                    files = _read_outputs(folder, outputs, limits.memory_bytes)
        if verdict is not None and verdict.stage:
            stage = verdict.stage
        reason = _reason(status, verdict)
        if reason is None and verdict is not None and _complete(job, verdict):
            return verdict, files
        if reason == "refused" and verdict is not None:
            raise BadRequest(prefix + verdict.message)
        if reason == "unknown":
            # Nothing says the artifact did it: the validator died, the kernel's OOM killer
            # chose the child (maybe for another job's memory), or the server stopped waiting.
            # Retryable, so an automatic round is not failed for good by a passing fault.
            log.warning(
                "artifact %s job ended without a verdict (wait status %s)", job.kind, status
            )
            raise InternalError(
                "the artifact check stopped without a verdict; retry", reason="checker_unavailable"
            )
        reason = reason or "check_failed"
        log.warning(
            "artifact %s job stopped after %.1f s: %s at %s (wait status %s)",
            job.kind,
            time.monotonic() - started,
            reason,
            stage or "start",
            status,
        )
        raise _refusal(reason, stage, limits, prefix)

    def _wait(self, root: Path, folder: Path, limits: SandboxLimits, ready: bool) -> int | None:
        """The child's wait status, or None when the server stopped waiting (it is killed)."""
        request = msgspec.json.encode(Request(str(folder), limits.memory_bytes, limits.seconds))
        deadline = time.monotonic() + limits.seconds + GRACE + (0 if ready else START_TIMEOUT)
        for attempt in range(2):
            with socket.socket(socket.AF_UNIX) as conn:
                try:
                    conn.connect(str(root / "socket"))
                except OSError:
                    if attempt:
                        raise
                    self._worker.restart()  # it died; start another and try once more
                    root, _ = self._worker.ensure()
                    deadline += START_TIMEOUT
                    continue
                conn.sendall(request + b"\n")
                answer = b""
                while not answer.endswith(b"\n"):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None  # closing the connection makes the worker kill the child
                    conn.settimeout(remaining)
                    try:
                        chunk = conn.recv(256)
                    except TimeoutError:
                        return None
                    if not chunk:
                        return WORKER_DIED  # the worker itself died: the job's end is unknown
                    answer += chunk
                raw = msgspec.json.decode(answer, type=dict[str, int])["status"]
                return os.waitstatus_to_exitcode(raw)
        raise AssertionError("unreachable")


def _read_stage(folder: Path) -> str:
    try:
        stage = (folder / worker.STAGE).read_bytes()[:64].decode("ascii", "replace").strip()
    except OSError:
        return ""
    return stage if stage in _FIELDS else ""


def _read_verdict(folder: Path) -> Verdict | None:
    path = folder / worker.VERDICT
    try:
        if path.stat().st_size > 1024 * 1024:
            return None
        return msgspec.json.decode(path.read_bytes(), type=Verdict)
    except (OSError, msgspec.DecodeError):
        return None


def _read_outputs(folder: Path, names: tuple[str, ...], cap: int) -> dict[str, bytes]:
    files = {}
    for name in names:
        path = folder / name
        if path.is_file() and path.stat().st_size <= cap:
            files[name] = path.read_bytes()
    return files


def _complete(job: Job, verdict: Verdict) -> bool:
    """Whether a successful verdict carries what its job returns (the child is not trusted)."""
    if job.kind == "check":
        return verdict.manifest is not None and verdict.input_shape is not None
    return verdict.route != ""


def _reason(status: int | None, verdict: Verdict | None) -> str | None:
    """None for success, else what stopped the job."""
    if status is None or status == WORKER_DIED or status == -signal.SIGKILL:
        # The server gave up past the limit and its grace (the child's own alarm should have
        # fired first), the validator died, or a SIGKILL that none of our limits sends.
        return "unknown"
    if status < 0:
        return _BAD_EXITS.get(-status, "check_failed")
    if status != 0 or verdict is None:
        return "check_failed"
    return {
        "ok": None,
        "refused": "refused",
        "memory": "memory_limit",
        "mismatch": "export_failed",
        "failed": "check_failed",
    }[verdict.outcome]


SANDBOX = ArtifactSandbox()


def configure(limits: SandboxLimits, *, start: bool = True) -> None:
    """Set the process-wide default limits (an app's settings) and start the validator."""
    SANDBOX.configure(limits, start=start)
