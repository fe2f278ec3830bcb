"""Model-version artifacts: validation at registration and ONNX re-export.

A model version is a state dict, an ONNX graph for the devices and, with the
base version, a ``torch.export`` program that an org admin supplies. The
server has no model code: it makes each new version's ONNX by loading the
program, swapping in the new state dict and exporting again (the recipe in
``docs/model-artifacts.md``), or, faster, by filling the new values into the
base graph where that graph provably takes them (:mod:`fedrpc.fl.reweight`).

Both functions are synchronous and CPU bound. They parse and run artifacts
an org admin supplied, so the server calls them only in its sandbox process,
under memory and time limits (:mod:`fedrpc.services.artifact_sandbox`). They
keep no state between calls (the caller keeps ONNX templates), cap the
declared input shape before building any tensor of it (``max_input_elements``,
:func:`fedrpc.fl.onnx_models.check_input_size`), and report each stage's
artifact to an optional ``on_stage`` callback, so that a sandbox whose child
was stopped can name the artifact at fault. They do not change torch's
process-wide thread count (export time is Python-bound: 1 and 2 threads
measured the same); the sandbox runs them on one thread.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrpc.fl._dtypes import SUPPORTED_DTYPES, quote_name
from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.onnx_models import (
    DEFAULT_MAX_INPUT_ELEMENTS,
    OnnxModel,
    check_input_size,
    load_onnx,
    rename_batch_dim,
)
from fedrpc.fl.program_archive import TORCH_EXPORT_LOCK, load_program, save_program
from fedrpc.fl.reweight import fill_template, make_onnx_template, reweight_program
from fedrpc.fl.tensor_codecs import decode_state_dict, to_torch_state
from fedrpc.fl.tensors import TensorSpec, check_finite, check_matches

__all__ = [
    "BundleInfo",
    "ExportDisagrees",
    "ExportedVersion",
    "export_version",
    "validate_bundle",
]

#: Relative tolerance of every ONNX-vs-torch comparison: |diff| <= RTOL * max(1, max|out|).
RTOL = 1e-4
#: Batch sizes of the registration check when the batch dimension is dynamic
#: (not 1: a graph that mixes samples would still pass at batch size 1).
_CHECK_BATCHES = (2, 3)


def _ignore(stage: str) -> None:
    """The default ``on_stage``, which receives the artifact worked on as the error messages
    name it (``weights_data``, ``onnx_data``, ``program_data``): nobody listens."""


@dataclass(frozen=True, slots=True)
class BundleInfo:
    """What registration learned about a model version's artifacts.

    ``input_shape`` is the ONNX model's input shape including the batch
    dimension, with ``None`` where the dimension is dynamic.
    """

    manifest: list[TensorSpec]
    input_shape: tuple[int | None, ...]
    onnx_input_name: str
    max_abs_diff: float


class _Quiet:
    """Silence, in this block only, the warnings torch's own exporter trips.

    The exporter deep-copies pytree specs, which raises torch's LeafSpec
    deprecation warning; pytest turns warnings into errors, and a global
    filter would hide it everywhere. ``catch_warnings`` swaps the process-wide
    filter list, so two exports in parallel threads can at worst leave this
    one narrow filter installed or lift it early.
    """

    def __enter__(self) -> None:
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _program_manifest(module: Any) -> list[TensorSpec]:
    specs = []
    for name, tensor in module.state_dict().items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in SUPPORTED_DTYPES:
            raise InvalidInput(
                f"program_data: tensor {quote_name(name)} has unsupported dtype {dtype}"
            )
        specs.append(TensorSpec(name, tuple(int(d) for d in tensor.shape), dtype))
    return specs


def _program_input(program: Any) -> tuple[tuple[int | None, ...], str]:
    """Shape (``None`` for symbolic dims) and dtype name of the program's one input."""
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise InvalidInput(
            f"program_data: the program must take exactly one input, it takes {len(user_inputs)}"
        )
    node = next(
        n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0]
    )
    value = node.meta.get("val")
    if value is None or not hasattr(value, "shape"):
        raise InvalidInput("program_data: the program's input must be a tensor")
    shape = tuple(d if isinstance(d, int) else None for d in value.shape)
    return shape, str(value.dtype).removeprefix("torch.")


def _check_input_layout(name: str, shape: tuple[int | None, ...]) -> None:
    if len(shape) < 1 or any(d is None for d in shape[1:]):
        raise InvalidInput(f"{name}: only the first (batch) input dimension may be dynamic")


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _max_abs_diff(
    module: Any,
    onnx: OnnxModel,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    on_stage: Callable[[str], None] = _ignore,
) -> float:
    """Run both graphs on one random input; the largest |difference|, or raise."""
    import torch

    x = rng.standard_normal(shape).astype(onnx.input_dtype)
    on_stage("program_data")
    try:
        with torch.no_grad():
            expected = [t.detach().double().numpy() for t in _leaves(module(torch.from_numpy(x)))]
    except Exception as exc:
        raise InvalidInput(
            f"program_data: the program failed to run on an input of shape {list(shape)}"
        ) from exc
    on_stage("onnx_data")
    actual = onnx.run(x)
    if len(actual) != len(expected):
        raise InvalidInput(f"onnx_data has {len(actual)} outputs, program_data {len(expected)}")
    scale, diff = 1.0, 0.0
    for want, got in zip(expected, actual, strict=True):
        if want.shape != got.shape:
            raise InvalidInput(
                f"onnx_data output shape {list(got.shape)} differs from program_data's {list(want.shape)}"
            )
        if not np.isfinite(want).all():
            raise InvalidInput("program_data produces NaN or inf outputs with these weights")
        if want.size:
            scale = max(scale, float(np.abs(want).max()))
            diff = max(diff, float(np.abs(got.astype(np.float64) - want).max()))
    if not diff <= RTOL * scale:  # written so that NaN fails too
        raise InvalidInput(
            f"onnx_data and program_data disagree: max |difference| {diff:.3g} "
            f"exceeds {RTOL:g} x {scale:.3g} on an input of shape {list(shape)}"
        )
    return diff


def validate_bundle(
    state_bytes: bytes,
    state_encoding: str,
    onnx_bytes: bytes,
    program_bytes: bytes,
    rng: np.random.Generator,
    *,
    max_input_elements: int = DEFAULT_MAX_INPUT_ELEMENTS,
    on_stage: Callable[[str], None] = _ignore,
) -> BundleInfo:
    """Check that a state dict, an ONNX model and an exported program agree.

    The ONNX model must pass ``onnx.checker`` and load in onnxruntime (CPU),
    with no external data; the program must be a plain ``torch.export.save``
    archive whose only input has a dynamic first (batch) dimension; the state
    dict must have exactly the program's tensor names, shapes and dtypes and
    hold no NaN/inf; and the program, with the state dict loaded
    (``strict=True``), and the ONNX model must give the same outputs on random
    inputs within ``RTOL * max(1, max|output|)``. Both declared input shapes
    must stay within ``max_input_elements`` (a dynamic batch counts as 1);
    the ONNX one is checked before onnxruntime opens the model.

    Raises
    ------
    InvalidInput
        Naming the artifact at fault.
    """
    on_stage("weights_data")
    state = decode_state_dict(state_bytes, state_encoding, field="weights_data")
    check_finite(state)
    on_stage("onnx_data")
    onnx = load_onnx(onnx_bytes, max_input_elements=max_input_elements)
    on_stage("program_data")
    program = load_program(program_bytes)
    with _Quiet():
        module = program.module()
    manifest = _program_manifest(module)
    try:
        check_matches(state, manifest)
    except InvalidInput as exc:
        raise InvalidInput(f"weights_data does not match program_data: {exc}") from None
    module.load_state_dict(to_torch_state(state), strict=True)

    program_shape, program_dtype = _program_input(program)
    _check_input_layout("program_data", program_shape)
    check_input_size("program_data", program_shape, max_input_elements)
    _check_input_layout("onnx_data", onnx.input_shape)
    if program_shape[0] is not None:
        raise InvalidInput(
            "program_data must have a dynamic batch dimension: "
            "torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))"
        )
    if program_shape[1:] != onnx.input_shape[1:] or program_dtype != onnx.input_dtype.name:
        raise InvalidInput(
            f"onnx_data input {list(onnx.input_shape)} {onnx.input_dtype.name} differs from "
            f"program_data's input {list(program_shape)} {program_dtype}"
        )
    batches = _CHECK_BATCHES if onnx.input_shape[0] is None else (onnx.input_shape[0],)
    diff = max(
        _max_abs_diff(module, onnx, (b, *onnx.input_shape[1:]), rng, on_stage) for b in batches
    )
    return BundleInfo(manifest, onnx.input_shape, onnx.input_name, diff)


class ExportDisagrees(RuntimeError):
    """A re-exported ONNX model disagrees with its program (an exporter fault, not the caller's).

    Its ``__cause__`` is the failed check (an :class:`InvalidInput`).
    """


@dataclass(frozen=True, slots=True)
class ExportedVersion:
    """A new version's program and ONNX model, and how the ONNX model was made.

    ``route`` is ``"filled"`` when the new values went into the template's
    graph, ``"exported"`` after a full re-export. ``onnx_template`` is the
    template to keep for the next version made from the same base program
    (:func:`fedrpc.fl.reweight.make_onnx_template` of the result), or ``None``.
    """

    program: bytes
    onnx: bytes
    route: str
    onnx_template: bytes | None


def export_version(
    program_bytes: bytes,
    new_state: Mapping[str, np.ndarray],
    *,
    onnx_template: bytes | None = None,
    batch_sizes: Sequence[int] = (5, 7),
    max_input_elements: int = DEFAULT_MAX_INPUT_ELEMENTS,
    on_stage: Callable[[str], None] = _ignore,
) -> ExportedVersion:
    """Make a new version's program and ONNX model from the base program.

    With an ``onnx_template`` (the base graph, see
    :func:`fedrpc.fl.reweight.make_onnx_template`) the new values are filled into
    it and into the base program. Otherwise, or when that graph then
    disagrees with the program, the ONNX model is exported again:
    ``torch.export.load`` -> ``.module()`` -> ``load_state_dict(new,
    strict=True)`` -> ``torch.export.export`` with a dynamic batch dimension
    (example batch ``batch_sizes[0]``) -> ``torch.onnx.export(dynamo=True,
    optimize=False, external_data=False)``. Without the exporter's constant
    folding every tensor stays an initializer under its own name, so the
    result is itself a template for the next version (onnxruntime folds at
    load time anyway). Either way the result is checked before it is
    returned: onnxruntime and the program agree on a fixed pseudo-random
    input at every size in ``batch_sizes``. The program's declared input
    must stay within ``max_input_elements`` (a dynamic batch counts as 1).

    Raises
    ------
    InvalidInput
        ``new_state`` does not match the program or holds NaN/inf, or the
        program's input is over the cap.
    ExportDisagrees
        A RuntimeError: the exporter produced an ONNX model that disagrees
        with the program (an exporter fault, not the caller's); its cause is
        the failed check.
    """
    import torch

    if not batch_sizes or min(batch_sizes) < 2:
        raise InvalidInput("batch_sizes must be at least 2 (torch specializes size 1)")
    on_stage("program_data")
    program = load_program(program_bytes)
    shape, dtype = _program_input(program)
    _check_input_layout("program_data", shape)
    check_input_size("program_data", shape, max_input_elements)
    with _Quiet():
        module = program.module()
        manifest = _program_manifest(module)
        check_matches(new_state, manifest)
        check_finite(new_state)
        torch_state = to_torch_state(new_state)
        module.load_state_dict(torch_state, strict=True)
    if onnx_template is not None:
        reweight_program(program, torch_state)
        on_stage("onnx_data")
        onnx_bytes = fill_template(onnx_template, torch_state)
        if _agrees(module, onnx_bytes, shape, batch_sizes, max_input_elements, on_stage):
            return ExportedVersion(save_program(program), onnx_bytes, "filled", onnx_template)
    on_stage("program_data")
    with _Quiet(), TORCH_EXPORT_LOCK:
        example = torch.zeros((batch_sizes[0], *shape[1:]), dtype=getattr(torch, dtype))
        batch = torch.export.Dim("batch", min=1)
        exported = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        onnx_program = torch.onnx.export(
            exported, dynamo=True, optimize=False, external_data=False, verbose=False
        )
    onnx_bytes = rename_batch_dim(onnx_program.model_proto).SerializeToString()
    try:
        _check_agreement(module, onnx_bytes, shape, batch_sizes, max_input_elements, on_stage)
    except InvalidInput as exc:  # kept as the cause: it tells a failed run from a disagreement
        raise ExportDisagrees("the re-exported ONNX model disagrees with the program") from exc
    return ExportedVersion(
        save_program(exported), onnx_bytes, "exported", make_onnx_template(onnx_bytes, manifest)
    )


def _check_agreement(
    module: Any,
    onnx_bytes: bytes,
    shape: tuple[int | None, ...],
    batch_sizes: Sequence[int],
    max_input_elements: int,
    on_stage: Callable[[str], None],
) -> None:
    """Raise unless onnxruntime and ``module`` agree within RTOL at every batch size."""
    rng = np.random.default_rng(0)  # a local, fixed stream: the check must be reproducible
    on_stage("onnx_data")
    onnx = load_onnx(onnx_bytes, max_input_elements=max_input_elements)
    for b in batch_sizes:
        _max_abs_diff(module, onnx, (b, *shape[1:]), rng, on_stage)


def _agrees(
    module: Any,
    onnx_bytes: bytes,
    shape: tuple[int | None, ...],
    batch_sizes: Sequence[int],
    max_input_elements: int,
    on_stage: Callable[[str], None],
) -> bool:
    """Whether onnxruntime and ``module`` agree within RTOL at every batch size."""
    try:
        _check_agreement(module, onnx_bytes, shape, batch_sizes, max_input_elements, on_stage)
    except InvalidInput:
        return False
    return True
