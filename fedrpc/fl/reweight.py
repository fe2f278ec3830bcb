"""New weights into existing graphs: the fast route to a new version's artifacts.

Re-exporting a version's ONNX model (``torch.export`` + ``torch.onnx.export``)
costs about 0.8 s of Python whatever the model's size, most of it the exporter
rebuilding its operator table on every call. A new version has the graph of
its base version and only new tensor values, so where the base's ONNX graph
holds every floating state-dict tensor as an initializer under its own name,
shape and dtype, the new graph is that graph with the new values filled in
(about 10 ms at 1M parameters), and the new program is the base program with
its state dict overwritten.

That name check is necessary, not sufficient: an exporter may keep a tensor
under its name and still fold a copy of it into another constant (BatchNorm
statistics are the known case, see ``docs/model-artifacts.md``). So a filled
graph is used only after it agrees with the re-weighted program on random
inputs, the same check as every export (:func:`fedrpc.fl.artifacts.export_version`
does both and falls back to a full export when the check fails).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedrpc.fl._dtypes import FLOATING_DTYPES
from fedrpc.fl.tensors import TensorSpec

__all__ = ["fill_template", "make_onnx_template", "reweight_program"]

# Declared dtype -> onnx.TensorProto data type.
_ONNX_TYPES = {
    "float32": 1,
    "uint8": 2,
    "int32": 6,
    "int64": 7,
    "bool": 9,
    "float16": 10,
    "float64": 11,
    "bfloat16": 16,
}


def make_onnx_template(onnx_bytes: bytes, manifest: Sequence[TensorSpec]) -> bytes | None:
    """The graph with the values of its state-dict initializers dropped, if it can take new ones.

    Every floating tensor of ``manifest`` must be an initializer of the main
    graph with the same name, shape and dtype, and every initializer named
    after a manifest tensor must match it; otherwise ``None``. The template
    keeps names and shapes only (a few KB however large the model), so it is
    cheap to keep between rounds; :func:`fill_template` puts values back.
    """
    import onnx

    model = onnx.load_model_from_string(onnx_bytes)
    specs = {spec.name: spec for spec in manifest}
    seen = set()
    for init in model.graph.initializer:
        spec = specs.get(init.name)
        if spec is None:
            continue
        if tuple(init.dims) != spec.shape or init.data_type != _ONNX_TYPES.get(spec.dtype):
            return None
        if init.data_location == onnx.TensorProto.EXTERNAL:
            return None
        seen.add(init.name)
        dims = list(init.dims)
        init.Clear()
        init.name, init.data_type = spec.name, _ONNX_TYPES[spec.dtype]
        init.dims.extend(dims)
    floating = {spec.name for spec in manifest if spec.dtype in FLOATING_DTYPES}
    if not floating or not floating <= seen:
        return None
    return model.SerializeToString()


def fill_template(template: bytes, torch_state: Mapping[str, Any]) -> bytes:
    """The ONNX model of ``template`` with ``torch_state``'s values in its emptied initializers.

    ``torch_state`` maps names to torch tensors in their declared dtypes
    (:func:`fedrpc.fl.tensor_codecs.to_torch_state`); every initializer named
    after one of them gets its value.
    """
    import onnx
    import torch

    model = onnx.load_model_from_string(template)
    for init in model.graph.initializer:
        tensor = torch_state.get(init.name)
        if tensor is not None:
            # ONNX raw data is little-endian bytes in row-major order, as torch holds them here.
            init.raw_data = tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()
    return model.SerializeToString()


def reweight_program(program: Any, torch_state: Mapping[str, Any]) -> None:
    """Overwrite an ``ExportedProgram``'s state dict in place (same names, shapes, dtypes)."""
    import torch

    with torch.no_grad():
        for name, tensor in program.state_dict.items():
            tensor.copy_(torch_state[name])
