"""A new version's objects, with ONNX templates kept between rounds.

The base version's program and ONNX graph came from an org admin, so the new
version's graphs are made in the artifact sandbox
(:mod:`fedrpc.services.artifact_sandbox`: a child process under memory and
time limits), never in the server process; this module only passes bytes.
Filling new values into the base version's ONNX graph takes milliseconds where
a re-export takes about a second (:mod:`fedrpc.fl.reweight`). The graph of a
base program never changes, so its template is kept in memory under the
program's sha256: the first version made from a base whose own ONNX cannot
take new values (an exporter folded its BatchNorm, say) pays one re-export,
and the versions after it are filled. Templates hold names and shapes only;
the server never parses them (the sandbox's child makes and fills them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from fedrpc.fl.tensor_codecs import encode_safetensors, encode_torch
from fedrpc.fl.tensors import TensorSpec
from fedrpc.services.artifact_sandbox import SANDBOX, SandboxLimits

__all__ = ["TEMPLATES", "OnnxTemplates", "encode_weights", "export_graphs"]


class OnnxTemplates:
    """The most recently used ONNX templates, by base program sha256 (thread-safe)."""

    def __init__(self, capacity: int = 64) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, program_sha256: str) -> bytes | None:
        with self._lock:
            template = self._items.get(program_sha256)
            if template is not None:
                self._items.move_to_end(program_sha256)
            return template

    def put(self, program_sha256: str, template: bytes) -> None:
        with self._lock:
            self._items[program_sha256] = template
            self._items.move_to_end(program_sha256)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


TEMPLATES = OnnxTemplates()


def export_graphs(
    program_bytes: bytes,
    program_sha256: str,
    read_base_onnx: Callable[[], bytes],
    manifest: list[TensorSpec],
    new_state: dict[str, np.ndarray],
    *,
    limits: SandboxLimits | None = None,
    owner: str | None = None,
) -> dict[str, bytes]:
    """The new version's ONNX model and program (blocking: run it in a worker thread).

    ``read_base_onnx`` is called only when no template of the base program is
    kept yet. ``limits`` default to the app's settings
    (:func:`fedrpc.services.artifact_sandbox.configure`); ``owner`` is the organization
    whose share of the sandbox's slots the job takes.

    Raises
    ------
    BadRequest
        The base artifacts cannot make a new version within the sandbox's
        limits, or the re-exported graph disagrees with the program
        (``data.reason``); nothing of the new version exists yet.
    """
    template = TEMPLATES.get(program_sha256)
    made = SANDBOX.make_version(
        program_bytes,
        new_state,
        manifest,
        template=template,
        base_onnx=read_base_onnx() if template is None else None,
        limits=limits,
        owner=owner,
    )
    if made.onnx_template is not None:
        TEMPLATES.put(program_sha256, made.onnx_template)
    return {"onnx": made.onnx, "program": made.program}


def encode_weights(new_state: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The new version's state dict as safetensors and as a ``torch.save`` file."""
    return {"safetensors": encode_safetensors(new_state), "torch": encode_torch(new_state)}
