"""Byte codecs for state dicts: safetensors and weights-only torch files.

Uploaded weights are untrusted. They are parsed only by the safetensors
parser (a JSON header and raw little-endian buffers, no code) or by
``torch.load(..., weights_only=True)``, whose restricted unpickler builds
tensors and plain containers and nothing else. Nothing here unpickles by any
other route.

Devices send safetensors only: :func:`safetensors_layout` reads a file's
header (names, dtypes, shapes, offsets) without touching the tensors, so the
caller compares it with the manifest before anything is allocated
(:func:`fedrpc.fl.tensors.decode_update`). The torch encoding is kept for
organization admins registering a version; even there a tensor may not be a
view larger than its storage (a stride-0 ``expand`` of one element declaring
64 GB), and the copies made for non-contiguous tensors together stay within
the bytes of the storages in the file, so decoding never holds more than
about twice the file. Every failure becomes :class:`~fedrpc.fl.InvalidInput` with a
message of our own; the library's exception is kept only as ``__cause__``
for the server log.

Decoded safetensors arrays are views of the buffers the parser copies each
tensor into (one copy of the payload, no more); decoded torch arrays share
memory with the loaded tensors. Both are writable. bfloat16 tensors decode to :data:`~fedrpc.fl.tensors.BFLOAT16`
arrays (float32 values, declared bfloat16); see :mod:`fedrpc.fl.tensors`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedrpc.fl._dtypes import BFLOAT16, HOLDERS, SUPPORTED_DTYPES, dtype_name, quote_name
from fedrpc.fl._errors import InvalidInput

__all__ = [
    "decode_state_dict",
    "encode_safetensors",
    "encode_torch",
    "safetensors_layout",
    "to_torch_state",
]

ENCODINGS = ("safetensors", "torch")
#: Bytes per element of each safetensors dtype we accept.
_SAFETENSORS_ITEM_BYTES = {
    "F16": 2,
    "BF16": 2,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "U8": 1,
    "BOOL": 1,
}

#: safetensors header dtype -> declared dtype name.
_SAFETENSORS_DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "U8": "uint8",
    "BOOL": "bool",
}

#: Names for the safetensors dtypes we refuse, so messages use one vocabulary.
_SAFETENSORS_OTHER = {
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "C64": "complex64",
}


def decode_state_dict(
    data: bytes, encoding: str, *, field: str = "weights_data"
) -> dict[str, np.ndarray]:
    """Decode untrusted bytes into a state dict of numpy arrays.

    Parameters
    ----------
    data
        A safetensors file, or a file written by ``torch.save`` of a flat
        ``dict[str, Tensor]``.
    encoding
        ``"safetensors"`` or ``"torch"``.
    field
        The request field the bytes came from, used in error messages.

    Raises
    ------
    InvalidInput
        Unknown encoding, bytes that do not parse, a structure other than a
        flat mapping of names to dense tensors, or an unsupported dtype.
    """
    if encoding == "safetensors":
        return _decode_safetensors(data, field)
    if encoding == "torch":
        return _decode_torch(data, field)
    raise InvalidInput(f"unknown weights encoding {encoding!r}: expected one of {list(ENCODINGS)}")


def _unsupported(field: str, name: str, dtype: str) -> InvalidInput:
    return InvalidInput(
        f"{field}: tensor {quote_name(name)} has unsupported dtype {dtype}; supported: "
        + ", ".join(sorted(SUPPORTED_DTYPES))
    )


def _invalid_safetensors(field: str) -> InvalidInput:
    return InvalidInput(f"{field} is not a valid safetensors file")


def _header_of(data: bytes, field: str) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the length of the data section after it."""
    if len(data) < 8:
        raise _invalid_safetensors(field)
    length = int.from_bytes(data[:8], "little")
    if not 2 <= length <= len(data) - 8:
        raise _invalid_safetensors(field)
    try:
        header = json.loads(data[8 : 8 + length])
    except (ValueError, RecursionError):  # bad JSON or UTF-8, or absurd nesting
        raise _invalid_safetensors(field) from None
    if not isinstance(header, dict):
        raise _invalid_safetensors(field)
    return header, len(data) - 8 - length


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0  # bool is an int subclass: refuse it


def safetensors_layout(data: bytes, *, field: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors a safetensors file declares, read from its header alone.

    Nothing the size of a tensor is allocated: the header is JSON, at most
    ``len(data)`` bytes. Each tensor's ``data_offsets`` must span exactly its
    declared shape times its dtype's width, and the tensors together must
    tile the data section with no gap, overlap or byte left over, which is
    what the safetensors format requires (Hugging Face, safetensors 0.4).

    Returns
    -------
    dict
        Tensor name -> (declared dtype name, shape), in header order.

    Raises
    ------
    InvalidInput
        A malformed header, an unsupported dtype, or offsets that do not
        match the shapes and the file's length.
    """
    header, data_bytes = _header_of(data, field)
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _invalid_safetensors(field)
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str):
            raise _invalid_safetensors(field)
        width = _SAFETENSORS_ITEM_BYTES.get(code)
        if width is None:
            raise _unsupported(field, name, _SAFETENSORS_OTHER.get(code, code))
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _invalid_safetensors(field)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
            raise _invalid_safetensors(field)
        # Python integers: a declared 64 GB tensor is a number here, never memory.
        if offsets[1] - offsets[0] != width * _product(shape):
            raise _invalid_safetensors(field)
        spans.append((offsets[0], offsets[1]))
        layout[name] = (_SAFETENSORS_DTYPES[code], tuple(shape))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise _invalid_safetensors(field)
        end = stop
    if end != data_bytes:
        raise _invalid_safetensors(field)
    return layout


def _product(shape: list[int]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def _bfloat16_from_bits(bits: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32: widen the 16-bit pattern and
    # shift it into place; exact for every value including NaN and inf.
    wide = bits.astype(np.uint32)
    wide <<= 16
    return wide.view(BFLOAT16)


def _decode_safetensors(data: bytes, field: str) -> dict[str, np.ndarray]:
    import safetensors

    try:
        items = safetensors.deserialize(data)
    except Exception as exc:  # the Rust parser raises SafetensorError, or others on odd headers
        raise InvalidInput(f"{field} is not a valid safetensors file") from exc
    state: dict[str, np.ndarray] = {}
    for name, view in items:
        dtype = _SAFETENSORS_DTYPES.get(view["dtype"])
        if dtype is None:
            code = str(view["dtype"])
            raise _unsupported(field, name, _SAFETENSORS_OTHER.get(code, code))
        shape = tuple(view["shape"])
        raw = view["data"]
        if dtype == "bfloat16":
            array = _bfloat16_from_bits(np.frombuffer(raw, dtype="<u2"))
        else:
            array = np.frombuffer(raw, dtype=HOLDERS[dtype].newbyteorder("<"))
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise InvalidInput(f"{field} is not a valid safetensors file")
        state[name] = array.reshape(shape)
    return state


def _torch_dtypes() -> dict[Any, str]:
    import torch

    return {
        torch.float16: "float16",
        torch.bfloat16: "bfloat16",
        torch.float32: "float32",
        torch.float64: "float64",
        torch.int64: "int64",
        torch.int32: "int32",
        torch.uint8: "uint8",
        torch.bool: "bool",
    }


def _decode_torch(data: bytes, field: str) -> dict[str, np.ndarray]:
    # torch is imported on first use: importing it costs about a second and
    # most uploads are safetensors.
    import torch

    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, zip errors...
        raise InvalidInput(
            f"{field} is not a valid torch weights file (torch.save of a dict of tensors)"
        ) from exc
    if not isinstance(obj, Mapping):
        raise InvalidInput(f"{field} must hold a flat mapping of tensor names to tensors")
    dtypes = _torch_dtypes()
    _check_torch_views(obj, field)
    state: dict[str, np.ndarray] = {}
    for name, tensor in obj.items():
        if not isinstance(name, str):
            raise InvalidInput(f"{field} must hold a flat mapping of tensor names to tensors")
        if not isinstance(tensor, torch.Tensor):
            raise InvalidInput(f"{field}: entry {quote_name(name)} is not a tensor")
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise InvalidInput(
                f"{field}: tensor {quote_name(name)} is sparse or quantized; send dense tensors"
            )
        dtype = dtypes.get(tensor.dtype)
        if dtype is None:
            raise _unsupported(field, name, str(tensor.dtype).removeprefix("torch."))
        tensor = tensor.detach().contiguous()
        if dtype == "bfloat16":
            state[name] = _bfloat16_from_bits(tensor.view(torch.int16).numpy().view(np.uint16))
        else:
            state[name] = tensor.numpy()
    return state


def _check_torch_views(obj: Mapping[Any, Any], field: str) -> None:
    """Bound what decoding can allocate before any tensor is made contiguous.

    ``torch.load`` makes each tensor a view (sizes, strides, offset) of a
    storage read from the file, so storages hold at most the file's bytes.
    A view may not span more elements than its storage holds from its offset
    (an expanded stride-0 view of one element can declare any size), and
    the non-contiguous views, the only ones copied, together need no more
    bytes than the distinct storages: the decoded state is at most twice the
    file.
    """
    import torch

    storages: dict[int, int] = {}
    copied = 0
    for name, tensor in obj.items():
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            continue  # refused with its own message by the caller
        if tensor.is_quantized:
            continue
        storage = tensor.untyped_storage()
        needed = tensor.numel() * tensor.element_size()
        if needed > storage.nbytes() - tensor.storage_offset() * tensor.element_size():
            raise InvalidInput(
                f"{field}: tensor {quote_name(str(name))} is a view larger than its storage "
                "(an expanded or strided view); save contiguous tensors"
            )
        storages[storage.data_ptr()] = storage.nbytes()
        if not tensor.is_contiguous():
            copied += needed
    if copied > sum(storages.values()):
        raise InvalidInput(
            f"{field}: its tensors are views that would copy more bytes than the file holds; "
            "save contiguous tensors"
        )


def _to_torch(name: str, array: np.ndarray) -> Any:
    import torch

    dtype = dtype_name(array, name)
    # torch.tensor copies: the result owns its memory, so views of one flat
    # vector (or read-only decoded buffers) encode without aliasing trouble.
    tensor = torch.tensor(array)
    return tensor.to(torch.bfloat16) if dtype == "bfloat16" else tensor


def to_torch_state(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Torch tensors (copies) of a state dict, in their declared dtypes."""
    return {name: _to_torch(name, array) for name, array in state.items()}


def encode_safetensors(state: Mapping[str, np.ndarray]) -> bytes:
    """Encode a state dict as a safetensors file.

    :data:`~fedrpc.fl.tensors.BFLOAT16` arrays are rounded to bfloat16 (to
    nearest, ties to even); every other array is written bit for bit.
    """
    import safetensors.torch

    return safetensors.torch.save(to_torch_state(state))


def encode_torch(state: Mapping[str, np.ndarray]) -> bytes:
    """Encode a state dict with ``torch.save``; loadable with ``weights_only=True``."""
    import torch

    buffer = io.BytesIO()
    torch.save(to_torch_state(state), buffer)
    return buffer.getvalue()
