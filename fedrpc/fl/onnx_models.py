"""ONNX models as bytes: strict loading for checks, and batch-dim naming.

A model is accepted only if it is self-contained (no external data: a path
inside an untrusted model must never make the server read a file), declares
an input no larger than the caller's cap (checked on the parsed graph, before
onnxruntime or any tensor sees it), passes ``onnx.checker`` and loads in
onnxruntime's CPU provider. Sessions run on one thread each: they are short
checks on a shared 2-core server, and ORT's thread count is per session, so
nothing global changes. The server calls this only inside its sandbox
process (:mod:`fedrpc.services.artifact_sandbox`), which bounds what a model
can cost while it is parsed, loaded and run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrpc.fl._errors import InvalidInput

__all__ = [
    "DEFAULT_MAX_INPUT_ELEMENTS",
    "OnnxModel",
    "check_input_size",
    "load_onnx",
    "rename_batch_dim",
]

#: The most elements a model's declared input may have, a dynamic batch dimension counted
#: as 1 (FEDRPC_ARTIFACT_MAX_INPUT_ELEMENTS's default).
DEFAULT_MAX_INPUT_ELEMENTS = 1_000_000

_INPUT_DTYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
}


@dataclass(frozen=True, slots=True)
class OnnxModel:
    """An onnxruntime session and its single floating input."""

    session: Any
    input_name: str
    input_shape: tuple[int | None, ...]
    input_dtype: np.dtype

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """All outputs for input ``x``."""
        try:
            return list(self.session.run(None, {self.input_name: x}))
        except Exception as exc:  # onnxruntime reports shape and kernel errors alike
            raise InvalidInput(
                f"onnx_data: the model failed to run on an input of shape {list(x.shape)}"
            ) from exc


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


def _all_tensors(model: Any) -> Iterator[Any]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _uses_external_data(model: Any) -> bool:
    import onnx

    return any(
        t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data)
        for t in _all_tensors(model)
    )


def check_input_size(field: str, shape: Sequence[int | None], max_elements: int) -> None:
    """Refuse a declared input shape whose validation tensors would be too large.

    ``None`` marks a dynamic dimension and counts as 1 (the checks fill it with
    a small batch size). Every fixed dimension must be at least 1 and their
    product at most ``max_elements``, so no single dimension exceeds it either.
    Runs before any tensor of that shape is built.

    Raises
    ------
    InvalidInput
        Naming ``field`` and the cap.
    """
    shown = [*shape[:8], *(["..."] if len(shape) > 8 else [])]
    elements = 1
    for dim in shape:
        if dim is None:
            continue
        if dim < 1:
            raise InvalidInput(f"{field}: the declared input shape {shown} has a dimension below 1")
        elements *= dim
        if elements > max_elements:
            raise InvalidInput(
                f"{field}: the declared input shape {shown} has more than {max_elements:,} "
                "elements per sample (a dynamic batch dimension counts as 1); "
                "the server does not check models with larger inputs"
            )


def _declared_inputs(model: Any) -> list[tuple[int | None, ...]]:
    """The declared shapes of the main graph's inputs that are not initializers."""
    initializers = {init.name for init in model.graph.initializer}
    shapes = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes.append(tuple(d.dim_value if d.HasField("dim_value") else None for d in dims))
    return shapes


def load_onnx(data: bytes, *, max_input_elements: int = DEFAULT_MAX_INPUT_ELEMENTS) -> OnnxModel:
    """Parse, check and open an ONNX model with exactly one floating input.

    The declared input shapes are checked against ``max_input_elements``
    (:func:`check_input_size`) right after parsing, before ``onnx.checker``
    and onnxruntime see the model.

    Raises
    ------
    InvalidInput
        The bytes are not an ONNX model, use external data, declare an input
        over the cap, fail the checker, cannot be loaded by onnxruntime, or
        the model has other than one float16/float32/float64 input.
    """
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise InvalidInput("onnx_data is not a valid ONNX model") from exc
    if _uses_external_data(model):
        raise InvalidInput(
            "onnx_data refers to external data files; export with external_data=False"
        )
    for shape in _declared_inputs(model):
        check_input_size("onnx_data", shape, max_input_elements)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise InvalidInput("onnx_data is not a valid ONNX model (onnx.checker refuses it)") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            data, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise InvalidInput("onnx_data cannot be loaded by onnxruntime on CPU") from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InvalidInput(
            f"onnx_data: the model must take exactly one input, it takes {len(inputs)}"
        )
    dtype = _INPUT_DTYPES.get(inputs[0].type)
    if dtype is None:
        raise InvalidInput(
            f"onnx_data: the model input must be a float tensor, not {inputs[0].type}"
        )
    shape = tuple(d if isinstance(d, int) else None for d in inputs[0].shape)
    return OnnxModel(session, inputs[0].name, shape, dtype)


def rename_batch_dim(model: Any, name: str = "batch") -> Any:
    """Call the symbolic first dimension of the first input ``name`` everywhere.

    The exporter names it after torch's symbol (``s77``); devices read the
    shape, so a stable name is kinder. Changes ``model`` in place and
    returns it.
    """
    dims = model.graph.input[0].type.tensor_type.shape.dim
    symbol = dims[0].dim_param if len(dims) else ""
    if not symbol or symbol == name:
        return model
    for info in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = name
    return model
