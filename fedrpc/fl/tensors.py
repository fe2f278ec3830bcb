"""State dicts as values: manifests, checks and the flat-vector layout.

A *state dict* is a ``dict[str, numpy.ndarray]`` in this package. Every
update a device sends is decoded by :func:`decode_update` (its safetensors
header compared with the manifest before any tensor is read), passes
:func:`check_bounded` and then :func:`flatten`, so these functions make one
pass over the data and allocate nothing the size of a tensor beyond their
result. The byte codecs
(safetensors and weights-only torch files) live in
:mod:`fedrpc.fl.tensor_codecs` and are re-exported here.

bfloat16 has no numpy dtype. A bfloat16 tensor is held as a float32 array
whose dtype carries the metadata ``{"fedrpc.dtype": "bfloat16"}``
(:data:`BFLOAT16`): its values are exact, :func:`dtype_name` reports
``"bfloat16"`` so manifests and :func:`check_matches` keep the declared dtype,
and the encoders round it back to bfloat16 (to nearest, ties to even).
Numpy keeps the metadata through views, copies and arithmetic on the array;
``astype`` to a plain dtype drops it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np

from fedrpc.fl._dtypes import (
    BFLOAT16,
    FLOATING_DTYPES,
    HOLDERS,
    SUPPORTED_DTYPES,
    dtype_name,
    quote_name,
)
from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.tensor_codecs import (
    decode_state_dict,
    encode_safetensors,
    encode_torch,
    safetensors_layout,
)

#: Largest magnitude a device's tensor value may have. With it, a FedAvg sum
#: of 100,000 updates weighted by up to 10^9 samples each stays below 1e26,
#: squares (FedAdam, FedYogi, Krum distances over 10^13 coordinates) below
#: 1e38: the float32 accumulators cannot overflow, whatever devices send.
#: No trained network comes near it; it is also the bound on reported metrics.
MAX_ABS_VALUE = 1e12

# Bounded temporaries for check_finite: 256 Ki elements is a 256 KB bool
# array, small enough for L2 and large enough that the Python loop costs
# nothing (measured as fast as one np.isfinite over the whole tensor).
_FINITE_CHUNK = 1 << 18

__all__ = [
    "BFLOAT16",
    "FLOATING_DTYPES",
    "SUPPORTED_DTYPES",
    "TensorSpec",
    "MAX_ABS_VALUE",
    "check_bounded",
    "check_finite",
    "check_matches",
    "decode_state_dict",
    "decode_update",
    "dtype_name",
    "encode_safetensors",
    "encode_torch",
    "flatten",
    "manifest_from_json",
    "manifest_of",
    "manifest_to_json",
    "quote_name",
    "unflatten",
    "update_norm",
]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, shape and declared dtype of one tensor of a state dict."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of elements."""
        return prod(self.shape)


def manifest_of(state: Mapping[str, np.ndarray]) -> list[TensorSpec]:
    """The manifest of a state dict, in its iteration order."""
    return [
        TensorSpec(n, tuple(int(d) for d in a.shape), dtype_name(a, n)) for n, a in state.items()
    ]


def manifest_to_json(manifest: Iterable[TensorSpec]) -> list[dict[str, Any]]:
    """Plain JSON values: ``[{"name", "shape", "dtype"}, ...]``."""
    return [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in manifest]


def manifest_from_json(value: Any) -> list[TensorSpec]:
    """Inverse of :func:`manifest_to_json`, validating every entry."""
    if not isinstance(value, list):
        raise InvalidInput("a manifest must be a list of {name, shape, dtype} objects")
    specs: list[TensorSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"name", "shape", "dtype"}:
            raise InvalidInput(f"manifest entry {i} must have exactly the keys name, shape, dtype")
        name, shape, dtype = item["name"], item["shape"], item["dtype"]
        if not isinstance(name, str) or name in seen:
            raise InvalidInput(f"manifest entry {i} needs a unique string name")
        if not isinstance(shape, list) or not all(
            type(d) is int and d >= 0
            for d in shape  # bool is an int subclass: refuse it
        ):
            raise InvalidInput(
                f"shape of {quote_name(name)} must be a list of non-negative integers"
            )
        if dtype not in HOLDERS:
            raise InvalidInput(
                f"dtype of {quote_name(name)} must be one of {sorted(SUPPORTED_DTYPES)}"
            )
        seen.add(name)
        specs.append(TensorSpec(name, tuple(shape), dtype))
    return specs


def check_matches(state: Mapping[str, np.ndarray], manifest: Iterable[TensorSpec]) -> None:
    """Require the same tensor names, shapes and dtypes as ``manifest``.

    The order of ``state`` does not matter (safetensors files are sorted).

    Raises
    ------
    InvalidInput
        Naming the first difference in manifest order.
    """
    _compare(
        {n: tuple(a.shape) for n, a in state.items()},
        lambda name: dtype_name(state[name], name),
        manifest,
    )


def _compare(
    shapes: Mapping[str, tuple[int, ...]],
    dtype_of: Callable[[str], str],
    manifest: Iterable[TensorSpec],
) -> None:
    """Names, then shapes and dtypes against the manifest, in manifest order."""
    specs = list(manifest)
    expected = {s.name for s in specs}
    for spec in specs:
        if spec.name not in shapes:
            raise InvalidInput(f"missing tensor {quote_name(spec.name)}")
    for name in shapes:
        if name not in expected:
            raise InvalidInput(f"unexpected tensor {quote_name(name)}")
    for spec in specs:
        shape = shapes[spec.name]
        if shape != spec.shape:
            raise InvalidInput(
                f"shape of {quote_name(spec.name)} is {list(shape)}, expected {list(spec.shape)}"
            )
        actual = dtype_of(spec.name)
        if actual != spec.dtype:
            raise InvalidInput(
                f"dtype of {quote_name(spec.name)} is {actual}, expected {spec.dtype}"
            )


def decode_update(
    data: bytes, encoding: str, manifest: Iterable[TensorSpec], *, field: str = "weights"
) -> dict[str, np.ndarray]:
    """Decode a device's tensors, refusing a file that differs from ``manifest`` before reading it.

    Devices send safetensors only. The file's header (names, dtypes, shapes,
    offsets; see :func:`~fedrpc.fl.tensor_codecs.safetensors_layout`) is
    compared with the manifest first, so a header declaring a huge shape is
    refused without allocating anything; then the tensors are read, at most
    ``len(data)`` bytes of them. The torch encoding is refused: its loader
    builds tensors (and their storages) from a pickle before any shape can
    be compared, so its cost cannot be bounded by the manifest up front.

    Raises
    ------
    InvalidInput
        Another encoding, a malformed file, or tensors whose names, shapes or
        dtypes differ from the manifest.
    """
    if encoding != "safetensors":
        raise InvalidInput(
            f"{field}: devices send safetensors; the {encoding!r} encoding is not accepted "
            "from devices"
        )
    specs = list(manifest)
    layout = safetensors_layout(data, field=field)
    _compare({n: shape for n, (_, shape) in layout.items()}, lambda n: layout[n][0], specs)
    state = decode_state_dict(data, "safetensors", field=field)
    check_matches(state, specs)
    return state


def check_finite(state: Mapping[str, np.ndarray]) -> None:
    """Refuse NaN or infinite values in any floating tensor.

    Checks in chunks of :data:`_FINITE_CHUNK` elements so the temporary mask
    stays small; unlike a ``sum``-based shortcut it cannot be fooled by finite
    values whose sum overflows.

    Raises
    ------
    InvalidInput
        Naming the first tensor (in iteration order) holding NaN or inf.
    """
    for name, array in state.items():
        if array.dtype.kind != "f":
            continue
        flat = array.reshape(-1)
        for start in range(0, flat.size, _FINITE_CHUNK):
            if not np.isfinite(flat[start : start + _FINITE_CHUNK]).all():
                raise InvalidInput(f"tensor {quote_name(name)} contains NaN or infinite values")


def check_bounded(state: Mapping[str, np.ndarray], max_abs: float = MAX_ABS_VALUE) -> None:
    """Refuse NaN, infinite, or finite values of magnitude above ``max_abs`` in any floating tensor.

    One pass in chunks of :data:`_FINITE_CHUNK` elements (a min and a max,
    no temporary array): NaN fails both comparisons, so it is caught too.

    Raises
    ------
    InvalidInput
        Naming the first tensor (in iteration order) with such a value.
    """
    for name, array in state.items():
        if array.dtype.kind != "f":
            continue
        flat = array.reshape(-1)
        for start in range(0, flat.size, _FINITE_CHUNK):
            chunk = flat[start : start + _FINITE_CHUNK]
            # As Python floats: comparing a float16 array's values with 1e12 would cast 1e12.
            if -max_abs <= float(chunk.min()) and float(chunk.max()) <= max_abs:
                continue
            if not np.isfinite(chunk).all():
                raise InvalidInput(f"tensor {quote_name(name)} contains NaN or infinite values")
            raise InvalidInput(
                f"tensor {quote_name(name)} has values of magnitude above {max_abs:g}"
            )


def update_norm(
    state: Mapping[str, np.ndarray],
    manifest: Iterable[TensorSpec],
    base: Mapping[str, np.ndarray] | None = None,
) -> float:
    """The L2 norm of an update's delta over its floating tensors, in float64.

    With ``base`` (an update of full weights) the delta is ``state - base``;
    without it ``state`` is the delta itself. Chunked, so the float64
    temporaries stay small; the sum of squares cannot overflow float64 for
    values within :data:`MAX_ABS_VALUE`.
    """
    total = 0.0
    for spec in _floating(manifest):
        flat = state[spec.name].reshape(-1)
        ref = None if base is None else base[spec.name].reshape(-1)
        for start in range(0, flat.size, _FINITE_CHUNK):
            chunk = flat[start : start + _FINITE_CHUNK].astype(np.float64)
            if ref is not None:
                chunk -= ref[start : start + _FINITE_CHUNK]
            total += float(np.dot(chunk, chunk))
    return float(np.sqrt(total))


def _floating(manifest: Iterable[TensorSpec]) -> list[TensorSpec]:
    return [s for s in manifest if s.dtype in FLOATING_DTYPES]


def flatten(state: Mapping[str, np.ndarray], manifest: Iterable[TensorSpec]) -> np.ndarray:
    """Concatenate the floating tensors, in manifest order, into one float32 vector.

    This is the layout of every aggregation kernel; integer and bool tensors
    (``num_batches_tracked``) are left out and restored by :func:`unflatten`.

    Raises
    ------
    InvalidInput
        A tensor is missing or has the wrong size, or a float64 value does not
        fit float32.
    """
    specs = _floating(manifest)
    out = np.empty(sum(s.size for s in specs), dtype=np.float32)
    offset = 0
    with np.errstate(over="raise"):
        for spec in specs:
            array = state.get(spec.name)
            if array is None or array.size != spec.size:
                raise InvalidInput(
                    f"tensor {quote_name(spec.name)} is missing or has the wrong size"
                )
            try:
                out[offset : offset + spec.size] = array.reshape(-1)
            except FloatingPointError:
                raise InvalidInput(
                    f"tensor {quote_name(spec.name)} has values beyond the float32 range"
                ) from None
            offset += spec.size
    return out


def unflatten(
    vector: np.ndarray,
    manifest: Iterable[TensorSpec],
    template_state: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`: a state dict in manifest order.

    Floating tensors are cut from ``vector`` and cast to their declared dtype
    (always a copy); the other tensors are copied from ``template_state``
    (the base version), which must match the manifest for them.

    Raises
    ------
    InvalidInput
        ``vector`` has the wrong length, a template tensor is missing or
        differs from the manifest, or a value does not fit the declared dtype.
    """
    specs = list(manifest)
    total = sum(s.size for s in specs if s.dtype in FLOATING_DTYPES)
    if vector.ndim != 1 or vector.size != total:
        raise InvalidInput(f"flat vector has {vector.size} values, the manifest needs {total}")
    state: dict[str, np.ndarray] = {}
    offset = 0
    with np.errstate(over="raise"):
        for spec in specs:
            if spec.dtype in FLOATING_DTYPES:
                piece = vector[offset : offset + spec.size].reshape(spec.shape)
                offset += spec.size
                try:
                    state[spec.name] = piece.astype(HOLDERS[spec.dtype])
                except FloatingPointError:
                    raise InvalidInput(
                        f"tensor {quote_name(spec.name)} has values beyond the {spec.dtype} range"
                    ) from None
                continue
            base = template_state.get(spec.name)
            if base is None:
                raise InvalidInput(f"template state has no tensor {quote_name(spec.name)}")
            if tuple(base.shape) != spec.shape or dtype_name(base, spec.name) != spec.dtype:
                raise InvalidInput(
                    f"template tensor {quote_name(spec.name)} differs from the manifest"
                )
            state[spec.name] = base.copy()
    return state
