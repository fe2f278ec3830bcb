"""A new version's objects, made in a worker thread, with ONNX templates kept between rounds.

Filling new values into the base version's ONNX graph takes milliseconds where
a re-export takes about a second (:mod:`fedrpc.fl.reweight`). The graph of a
base program never changes, so its template is kept in memory under the
program's sha256: the first version made from a base whose own ONNX cannot
take new values (an exporter folded its BatchNorm, say) pays one re-export,
and the versions after it are filled. Templates hold names and shapes only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from fedrpc.fl.artifacts import export_version
from fedrpc.fl.reweight import make_onnx_template
from fedrpc.fl.tensor_codecs import encode_safetensors, encode_torch
from fedrpc.fl.tensors import TensorSpec

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
) -> dict[str, bytes]:
    """The new version's ONNX model and program (blocking: run it in a worker thread).

    ``read_base_onnx`` is called only when no template of the base program is
    kept yet.
    """
    template = TEMPLATES.get(program_sha256)
    if template is None:
        template = make_onnx_template(read_base_onnx(), manifest)
    exported = export_version(program_bytes, new_state, onnx_template=template)
    if exported.onnx_template is not None:
        TEMPLATES.put(program_sha256, exported.onnx_template)
    return {"onnx": exported.onnx, "program": exported.program}


def encode_weights(new_state: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The new version's state dict as safetensors and as a ``torch.save`` file."""
    return {"safetensors": encode_safetensors(new_state), "torch": encode_torch(new_state)}
