"""The tensor dtypes the platform accepts, and how numpy holds each of them."""

from __future__ import annotations

import numpy as np

from fedrpc.fl._errors import InvalidInput

BFLOAT16 = np.dtype(np.float32, metadata={"fedrpc.dtype": "bfloat16"})
"""The numpy dtype that holds bfloat16 tensors (float32 values, declared bfloat16)."""

#: Declared dtype name -> the numpy dtype that holds its values.
HOLDERS: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": BFLOAT16,
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
SUPPORTED_DTYPES = frozenset(HOLDERS)
FLOATING_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


def quote_name(name: str) -> str:
    """Quote a caller-supplied tensor name for an error message, shortened."""
    return repr(name if len(name) <= 80 else name[:77] + "...")


def dtype_name(array: np.ndarray, name: str = "") -> str:
    """Declared dtype of ``array``: ``"bfloat16"`` for :data:`BFLOAT16` arrays.

    Raises
    ------
    InvalidInput
        The dtype is not one of :data:`SUPPORTED_DTYPES`.
    """
    meta = array.dtype.metadata
    if meta is not None and meta.get("fedrpc.dtype") == "bfloat16":
        return "bfloat16"
    kind = array.dtype.name
    if kind not in HOLDERS or array.dtype.byteorder == ">":
        raise InvalidInput(
            f"tensor {quote_name(name)} has unsupported dtype {kind}; supported: "
            + ", ".join(sorted(SUPPORTED_DTYPES))
        )
    return kind
