"""The validator process: a warm parent that forks one child per artifact job, under limits.

Started by :mod:`fedrpc.services.artifact_sandbox` as ``python -m
fedrpc.services.artifact_worker LISTENER_FD READY_PATH``. It imports torch,
onnx and onnxruntime once and runs one check and one export of a tiny
network it builds itself (trusted bytes), so that torch's lazy imports and
first-call set-up are paid once here, not in every job (a fresh process pays
about 4 s before its first check; a fork of this one about 25 ms). It never
reads an artifact itself. For each connection on the listening socket (one
line of JSON naming a job folder and its limits) it forks a child that:

1. sets its limits: address space (``RLIMIT_AS``, the limit added to what the
   process already maps), CPU seconds (``RLIMIT_CPU``), a wall-clock alarm
   (``SIGALRM`` with its default action, which ends the process even inside
   native code), no core files, output files no larger than the memory limit;
2. reads the job's inputs from files in the folder, runs the kernel
   (:func:`fedrpc.fl.artifacts.validate_bundle` or ``export_version``) on one
   thread, writing the artifact it works on to ``stage`` as it goes;
3. writes its outputs as files and a small JSON verdict, then exits.

The forking process reaps each child and answers the connection with its raw
wait status; if the connection closes first (the server gave up waiting), it
kills the child. It exits, killing its children, when its stdin (a pipe from
the server) closes. Each child is used for one job only: a crafted artifact
cannot leave anything behind for the next one. Nothing here is pickled: jobs
and verdicts are JSON and raw bytes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

__all__ = ["JOB", "READY", "STAGE", "VERDICT", "Job", "Request", "Spec", "Verdict"]

JOB, VERDICT, STAGE, READY = "job.json", "verdict.json", "stage", "ready"
#: Output files of an export job.
ONNX_OUT, PROGRAM_OUT, TEMPLATE_OUT = "out.onnx", "out.pt2", "out.template"
_STAGE_WIDTH = 16
_MESSAGE_MAX = 2000


class Request(msgspec.Struct, forbid_unknown_fields=True):
    """What the server sends the forking process for one job (one JSON line)."""

    folder: str
    memory_bytes: int
    seconds: float


class Job(msgspec.Struct, forbid_unknown_fields=True):
    """The job file the server writes into the job folder, beside the input files."""

    kind: Literal["check", "export"]
    max_input_elements: int
    weights_encoding: str = "safetensors"  # check: the encoding of file "weights"
    manifest: list[dict[str, Any]] | None = None  # export: the base version's manifest


class Spec(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """One manifest entry of a verdict: name, shape, dtype."""

    name: Annotated[str, msgspec.Meta(max_length=1024)]
    shape: list[Annotated[int, msgspec.Meta(ge=0)]]
    dtype: Annotated[str, msgspec.Meta(max_length=16)]


class Verdict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What a child reports. The server decodes it strictly: the child handled untrusted bytes.

    ``outcome``: ``ok``; ``refused`` (the kernel's :class:`~fedrpc.fl.InvalidInput`,
    ``message`` in our words); ``memory`` (an allocation failed under the limit);
    ``mismatch`` (a re-exported graph disagrees with the program); ``failed``
    (anything else). ``stage`` is the artifact being worked on.
    """

    outcome: Literal["ok", "refused", "memory", "mismatch", "failed"]
    stage: Literal["", "weights_data", "onnx_data", "program_data"] = ""
    message: Annotated[str, msgspec.Meta(max_length=_MESSAGE_MAX)] = ""
    # check
    manifest: list[Spec] | None = None
    input_shape: list[Annotated[int, msgspec.Meta(ge=1)] | None] | None = None
    onnx_input_name: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    max_abs_diff: float = 0.0
    # export
    route: Literal["", "filled", "exported"] = ""
    has_template: bool = False


# -- the child --------------------------------------------------------------------------------


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _set_limits(request: Request) -> None:
    # RLIMIT_AS counts the address space already mapped (torch's libraries, ~0.8 GB), so the
    # limit is what a job may add to it.
    address_space = _vm_size() + request.memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    cpu = max(1, int(request.seconds + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (request.memory_bytes, request.memory_bytes))
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # its default action ends the process
    signal.setitimer(signal.ITIMER_REAL, request.seconds)


_ALLOCATION_FAILED = ("allocate memory", "bad_alloc", "not enough memory", "out of memory")


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether an allocation failure is anywhere in the exception's chain.

    numpy raises MemoryError; torch's CPU allocator a RuntimeError ("can't
    allocate memory"); onnxruntime its own exception ("Failed to allocate
    memory"). The text is only matched here, never passed on; our own
    refusals are skipped, since they may quote the artifact's tensor names.
    """
    from fedrpc.fl import InvalidInput
    from fedrpc.fl.artifacts import ExportDisagrees

    seen = 0
    while exc is not None and seen < 32:
        if isinstance(exc, MemoryError):
            return True
        if not isinstance(exc, InvalidInput | ExportDisagrees):
            text = str(exc).lower()
            if any(marker in text for marker in _ALLOCATION_FAILED):
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _spec_list(manifest: list[Any]) -> list[Spec]:
    return [Spec(s.name, list(s.shape), s.dtype) for s in manifest]


def _check(folder: Path, job: Job, on_stage: Any) -> Verdict:
    import numpy as np

    from fedrpc.fl.artifacts import validate_bundle

    info = validate_bundle(
        (folder / "weights").read_bytes(),
        job.weights_encoding,
        (folder / "onnx").read_bytes(),
        (folder / "program").read_bytes(),
        np.random.default_rng(),
        max_input_elements=job.max_input_elements,
        on_stage=on_stage,
    )
    return Verdict(
        "ok",
        manifest=_spec_list(info.manifest),
        input_shape=list(info.input_shape),
        onnx_input_name=info.onnx_input_name,
        max_abs_diff=info.max_abs_diff,
    )


def _export(folder: Path, job: Job, on_stage: Any) -> Verdict:
    from fedrpc.fl.artifacts import export_version
    from fedrpc.fl.reweight import make_onnx_template
    from fedrpc.fl.tensor_codecs import decode_state_dict
    from fedrpc.fl.tensors import manifest_from_json

    template_path, base_path = folder / "template", folder / "base.onnx"
    template = template_path.read_bytes() if template_path.exists() else None
    if template is None and base_path.exists():
        on_stage("onnx_data")
        template = make_onnx_template(base_path.read_bytes(), manifest_from_json(job.manifest))
    new_state = decode_state_dict((folder / "state").read_bytes(), "safetensors")
    exported = export_version(
        (folder / "program").read_bytes(),
        new_state,
        onnx_template=template,
        max_input_elements=job.max_input_elements,
        on_stage=on_stage,
    )
    (folder / ONNX_OUT).write_bytes(exported.onnx)
    (folder / PROGRAM_OUT).write_bytes(exported.program)
    if exported.onnx_template is not None:
        (folder / TEMPLATE_OUT).write_bytes(exported.onnx_template)
    return Verdict("ok", route=exported.route, has_template=exported.onnx_template is not None)


def _run_job(folder: Path) -> None:
    """The child's work: one job, one verdict file (the server trusts nothing else it writes)."""
    from fedrpc.fl import InvalidInput
    from fedrpc.fl.artifacts import ExportDisagrees

    stage_fd = os.open(folder / STAGE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    current = [""]

    def on_stage(name: str) -> None:
        current[0] = name
        os.pwrite(stage_fd, name.encode().ljust(_STAGE_WIDTH), 0)

    try:
        job = msgspec.json.decode((folder / JOB).read_bytes(), type=Job)
        verdict = (_check if job.kind == "check" else _export)(folder, job, on_stage)
    except InvalidInput as exc:
        outcome = "memory" if _out_of_memory(exc) else "refused"
        verdict = Verdict(outcome, message=str(exc)[:_MESSAGE_MAX])
    except ExportDisagrees as exc:
        # After a re-export; its cause tells a run that failed for want of memory.
        verdict = Verdict("memory" if _out_of_memory(exc) else "mismatch")
    except BaseException as exc:  # the child reports every failure; the server decides
        verdict = Verdict("memory" if _out_of_memory(exc) else "failed")
    verdict.stage = current[0]  # type: ignore[assignment]
    partial = folder / (VERDICT + ".part")
    partial.write_bytes(msgspec.json.encode(verdict))
    partial.rename(folder / VERDICT)


def _child(request: Request) -> None:
    """In the forked child: limits, quiet output, the job, exit (never returns)."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        _set_limits(request)
        _run_job(Path(request.folder))
        code = 0
    finally:
        os._exit(code)


# -- the forking process ----------------------------------------------------------------------


def _quiet() -> None:
    """No warnings or library logs on the server's stderr (after torch set up its logging)."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    # torch's ONNX exporter logs a warning per missing optional package on every export.
    for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _warm_up() -> None:
    """One check and two exports of a tiny trusted network: torch's lazy set-up, paid once."""
    import io

    import numpy as np
    import onnxruntime
    import torch

    from fedrpc.fl.artifacts import export_version, validate_bundle
    from fedrpc.fl.tensor_codecs import encode_safetensors

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    onnxruntime.set_default_logger_severity(4)
    _quiet()
    net = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(net, (torch.zeros(2, 3),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    first = export_version(buffer.getvalue(), state)
    validate_bundle(
        encode_safetensors(state),
        "safetensors",
        first.onnx,
        first.program,
        np.random.default_rng(0),
    )
    export_version(first.program, state, onnx_template=first.onnx_template)


def _read_request(conn: socket.socket) -> Request:
    conn.settimeout(10.0)
    data = b""
    while not data.endswith(b"\n") and len(data) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return msgspec.json.decode(data.strip(), type=Request)


def serve(listener: socket.socket) -> None:
    """Fork a child per connection; answer each with its wait status; stop when stdin closes."""
    sig_r, sig_w = os.pipe()
    os.set_blocking(sig_r, False)
    os.set_blocking(sig_w, False)
    signal.set_wakeup_fd(sig_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "parent")
    selector.register(sig_r, selectors.EVENT_READ, "child")
    children: dict[int, socket.socket] = {}
    by_conn: dict[socket.socket, int] = {}
    while True:
        for key, _ in selector.select():
            if key.data == "parent":
                if not os.read(sys.stdin.fileno(), 4096):
                    for pid in children:
                        os.kill(pid, signal.SIGKILL)
                    # Its folder (the socket, the ready mark) goes too, even if the server died.
                    if Path.cwd().name.startswith("fedrpc-artifacts-"):
                        shutil.rmtree(Path.cwd(), ignore_errors=True)
                    return
            elif key.data == "accept":
                conn, _ = listener.accept()
                try:
                    request = _read_request(conn)
                except (OSError, msgspec.DecodeError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    conn.close()
                    for other in by_conn:
                        other.close()
                    _child(request)
                children[pid] = conn
                by_conn[conn] = pid
                conn.setblocking(True)
                selector.register(conn, selectors.EVENT_READ, "conn")
            elif key.data == "conn":
                # The server closed the connection before the child ended: it gave up waiting.
                pid = by_conn.get(key.fileobj)  # type: ignore[arg-type]
                if pid is not None and pid in children:
                    os.kill(pid, signal.SIGKILL)
                    selector.unregister(key.fileobj)
            else:
                while True:
                    try:
                        os.read(sig_r, 4096)
                    except BlockingIOError:
                        break
                while children:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                    if pid == 0:
                        break
                    conn = children.pop(pid)
                    del by_conn[conn]
                    try:
                        selector.unregister(conn)
                    except KeyError:
                        pass
                    try:
                        conn.sendall(b'{"status": %d}\n' % status)
                    except OSError:
                        pass
                    conn.close()


def main(argv: list[str]) -> None:
    # Checks and exports are background work: the server's event loop comes first. (No
    # PR_SET_PDEATHSIG: it follows the thread that started this process, not the server.)
    with contextlib.suppress(OSError):
        os.nice(10)
    listener = socket.socket(fileno=int(argv[1]))
    _quiet()
    try:
        _warm_up()
    except Exception:  # a cold child still works, only slower
        print("fedrpc artifact worker: warm-up failed; jobs will start cold", file=sys.stderr)
    Path(argv[2]).touch()
    serve(listener)


if __name__ == "__main__":
    main(sys.argv)
