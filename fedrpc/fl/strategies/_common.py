"""Shared plumbing of the aggregation strategies: checks, threads, sources, chunks.

Every strategy works on flat float32 vectors (one per client update, the
model's floating-point tensors in manifest order). Streaming strategies take
them one at a time; robust strategies read them through :class:`VectorSource`
a coordinate slice at a time so that their working memory is bounded by a
caller-chosen budget instead of by ``N x model size``. The budget covers the
buffers that grow with N and the chunk length; numpy's casting buffers (a
constant under 256 KiB) and the float32 result come on top.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fedrpc.fl._errors import InvalidInput

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "Selection",
    "VectorSource",
    "as_tensor",
    "check_budget",
    "check_count",
    "check_fraction",
    "check_num_samples",
    "check_positive",
    "check_sources",
    "check_threads",
    "check_vector",
    "chunk_size",
    "chunked_mean",
    "gather",
    "kernel_threads",
    "single_thread",
]

DEFAULT_MEMORY_BUDGET = 64 << 20

# Past a few MB per block, the transposes and selections fall out of L2/L3 and
# larger blocks only cost memory (measured: 8 MiB blocks were the sweet spot
# for N = 50 and N = 200 on 1M-parameter updates).
_BLOCK_TARGET_BYTES = 8 << 20


class VectorSource(Protocol):
    """One client's flat float32 vector, readable one slice at a time.

    ``numpy.ndarray`` and ``numpy.memmap`` satisfy it; so does any object whose
    ``source[a:b]`` returns the float32 values of coordinates ``a..b-1``.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class Selection:
    """The result of a selecting strategy (Krum, MultiKrum, Bulyan).

    Attributes
    ----------
    vector : numpy.ndarray
        The aggregate, flat float32.
    selected : tuple of int
        Indices of the updates that were kept, in the order they were chosen.
    """

    vector: np.ndarray
    selected: tuple[int, ...]


class kernel_threads:
    """Run torch on ``n`` intra-op threads for the duration of a ``with`` block.

    A plain class rather than ``@contextmanager``: it is entered once per
    streamed update, and the generator machinery costs a few microseconds.
    """

    __slots__ = ("_n", "_previous")

    def __init__(self, n: int = 1) -> None:
        self._n = n

    def __enter__(self) -> None:
        self._previous = torch.get_num_threads()
        if self._previous != self._n:
            torch.set_num_threads(self._n)

    def __exit__(self, *exc: object) -> None:
        if self._previous != self._n:
            torch.set_num_threads(self._previous)


def single_thread() -> kernel_threads:
    """Torch on one thread: beside other work on 2 cores its pool made axpy loops 10x slower."""
    return kernel_threads(1)


def check_threads(threads: object) -> int:
    """A kernel's thread count: a whole number >= 1."""
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise InvalidInput(f"threads must be a whole number >= 1, got {threads!r}")
    return int(threads)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of ``array`` without a copy, read-only arrays included."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    # from_numpy warns on read-only memory (memmaps opened "r", bytes); DLPack
    # shares it silently, and the kernels never write through these views.
    try:
        return torch.from_dlpack(array)
    except (BufferError, RuntimeError, TypeError):
        return torch.from_numpy(np.array(array))


def check_vector(
    vector: object, size: int | None, what: str = "update", index: int | None = None
) -> np.ndarray:
    """``vector`` as a 1-D float32 array of ``size`` values (any if None).

    ``what`` and ``index`` name the vector in messages (``update 3``).
    """
    if (
        isinstance(vector, np.ndarray)
        and vector.dtype == np.float32
        and vector.ndim == 1
        and (vector.shape[0] == size if size is not None else vector.shape[0] > 0)
    ):
        return vector
    name = what if index is None else f"{what} {index}"
    if not isinstance(vector, np.ndarray):
        raise InvalidInput(f"{name} must be a numpy float32 vector")
    if vector.dtype != np.float32:
        raise InvalidInput(f"{name} is {vector.dtype}; updates must be float32 vectors")
    if size is None:
        raise InvalidInput(f"{name} must be a non-empty flat vector, got shape {vector.shape}")
    raise InvalidInput(f"{name} has shape {vector.shape}, expected ({size},)")


def check_num_samples(num_samples: object, what: str = "num_samples") -> int:
    """A whole number of training examples, at least 1."""
    if type(num_samples) is int and num_samples >= 1:
        return num_samples
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, numbers.Integral)
        or num_samples < 1
    ):
        raise InvalidInput(f"{what} must be a whole number >= 1, got {num_samples!r}")
    return int(num_samples)


def check_positive(name: str, value: object) -> float:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInput(f"{name} must be a number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise InvalidInput(f"{name} must be > 0, got {value!r}")
    return float(value)


def check_fraction(name: str, value: object, *, low: float, high: float) -> float:
    """A number in the half-open range ``[low, high)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInput(f"{name} must be a number in [{low:g}, {high:g}), got {value!r}")
    if not low <= value < high:
        raise InvalidInput(f"{name} must be in [{low:g}, {high:g}), got {value!r}")
    return float(value)


def check_count(name: str, value: object, *, minimum: int = 0) -> int:
    """A whole number >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InvalidInput(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def check_sources(sources: Sequence[VectorSource]) -> tuple[int, int]:
    """Return ``(number of updates, vector size)``; all sizes must agree."""
    if len(sources) == 0:
        raise InvalidInput("no updates to aggregate")
    size = len(sources[0])
    for i, source in enumerate(sources):
        if len(source) != size:
            raise InvalidInput(f"update {i} has {len(source)} values, expected {size}")
    if size == 0:
        raise InvalidInput("updates are empty vectors")
    return len(sources), size


def check_budget(memory_budget_bytes: object) -> int:
    """The caller's working-memory budget in bytes."""
    return check_count("memory_budget_bytes", memory_budget_bytes, minimum=1)


def chunk_size(size: int, bytes_per_coordinate: int, budget: int, *, block_rows: int) -> int:
    """Coordinates per chunk so that the working buffers fit in ``budget``."""
    most = budget // bytes_per_coordinate
    if most < 1:
        raise InvalidInput(
            f"memory_budget_bytes must be at least {bytes_per_coordinate} for "
            f"{block_rows} updates, got {budget}"
        )
    preferred = max(1024, _BLOCK_TARGET_BYTES // (4 * block_rows))
    return max(1, min(size, most, preferred))


def gather(
    sources: Sequence[VectorSource], indices: Sequence[int], a: int, b: int, out: np.ndarray
) -> np.ndarray:
    """Copy slice ``[a:b)`` of the chosen sources into the rows of ``out``.

    ``out`` may be float32 or float64 (the copy converts exactly). Non-float32
    slices and non-finite values are refused: one NaN sent by a Byzantine
    client would otherwise win a Krum selection or poison a median.
    """
    rows = out[: len(indices), : b - a]
    for row, i in enumerate(indices):
        piece = sources[i][a:b]
        if not isinstance(piece, np.ndarray) or piece.dtype != np.float32:
            raise InvalidInput(f"update {i} must give float32 slices")
        if piece.shape != (b - a,):
            raise InvalidInput(f"update {i} gave {piece.shape[0]} values for a slice of {b - a}")
        rows[row] = piece
    # One cheap pass: NaN and inf survive a sum. A finite block whose sum
    # overflows takes the exact (allocating) check instead.
    if not np.isfinite(rows.sum()):
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InvalidInput(f"update {indices[row]} holds NaN or infinite values")
    return rows


def chunked_mean(
    sources: Sequence[VectorSource],
    indices: Sequence[int],
    weights: Sequence[float],
    budget: int,
) -> np.ndarray:
    """``sum_k weights[k] * sources[indices[k]] / sum(weights)`` chunk by chunk.

    Accumulates in float64 (the selections averaged here are small next to the
    distance or selection pass before them, so exactness costs nothing).
    """
    size = len(sources[indices[0]])
    step = chunk_size(size, 16, budget, block_rows=1)
    total = float(sum(weights))
    out = np.empty(size, dtype=np.float32)
    acc = np.empty(step, dtype=np.float64)
    tmp = np.empty((1, step), dtype=np.float64)
    for a in range(0, size, step):
        b = min(a + step, size)
        part = acc[: b - a]
        part.fill(0.0)
        for i, w in zip(indices, weights, strict=True):
            row = gather(sources, [i], a, b, tmp)[0]
            row *= w
            part += row
        np.divide(part, total, out=out[a:b], casting="same_kind")
    return out
