"""Masking and unmasking of quantized vectors modulo 2^b (Bonawitz et al. 2017, §4).

A device adds its self mask ``prg(r_i)`` and, for each neighbour ``j`` in the
SecAgg+ graph (Bell et al. 2020), ``+prg(s_ij)`` if ``j > i`` and
``-prg(s_ij)`` if ``j < i``. Summed over survivors, the pairwise masks between
survivors cancel; the server removes the survivors' self masks and the masks
survivors share with dropped devices once it has reconstructed those seeds.
numpy ``uint32``/``uint64`` arithmetic wraps modulo ``2^b`` by itself.

The wire format is the ``d + 1`` words little-endian at the modulus width
(4 bytes per element at ``b = 32``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.secagg.prg import expand_into, word_dtype

__all__ = ["mask", "pack", "sum_vectors", "unmask", "unpack"]


def _words(vector: np.ndarray, bits: int, what: str) -> np.ndarray:
    dtype = word_dtype(bits)
    if not isinstance(vector, np.ndarray) or vector.ndim != 1 or vector.dtype != dtype:
        raise InvalidInput(f"{what} must be a 1-d {dtype} vector for a {bits}-bit modulus")
    return vector


def mask(
    vector: np.ndarray,
    index: int,
    self_seed: bytes,
    pairwise_seeds: Mapping[int, bytes],
    bits: int,
) -> np.ndarray:
    """Device ``index``'s masked vector ``y_i`` (a new array).

    Parameters
    ----------
    vector
        The quantized vector ``v_i`` (``quantize.quantize``), ``uint32`` or ``uint64``.
    index
        The device's index ``i``.
    self_seed
        ``r_i`` (``keys.self_mask_seed``).
    pairwise_seeds
        ``{j: s_ij}`` for every current neighbour ``j`` (``keys.pairwise_mask_seed``).
    bits
        Modulus bit width ``b``.
    """
    out = _words(vector, bits, "vector").copy()
    scratch = np.empty_like(out)
    out += expand_into(self_seed, scratch)
    for j, seed in pairwise_seeds.items():
        if j == index:
            raise InvalidInput("a device is not its own neighbour")
        expand_into(seed, scratch)
        if j > index:
            out += scratch
        else:
            out -= scratch
    return out


def sum_vectors(vectors: Iterable[np.ndarray], bits: int) -> np.ndarray:
    """Sum of equally long vectors modulo ``2^b``."""
    total = None
    for v in vectors:
        v = _words(v, bits, "masked vector")
        if total is None:
            total = v.copy()
        elif v.shape != total.shape:
            raise InvalidInput("masked vectors differ in length")
        else:
            total += v
    if total is None:
        raise InvalidInput("no vectors to sum")
    return total


def unmask(
    total: np.ndarray,
    self_seeds: Iterable[bytes],
    dropped_pairs: Iterable[tuple[int, int, bytes]],
    bits: int,
) -> np.ndarray:
    """The survivors' plain sum ``sum v_i`` from the sum of their masked vectors (a new array).

    Parameters
    ----------
    total
        ``sum y_i`` over the survivors (:func:`sum_vectors`).
    self_seeds
        ``r_i`` of every survivor, derived from the reconstructed ``b_i``.
    dropped_pairs
        ``(i, j, s_ij)`` for every survivor ``i`` and dropped neighbour ``j``,
        ``s_ij`` derived from the reconstructed ``sk1_j`` and ``pk1_i``. The
        mask ``i`` added (``j > i``) is subtracted, the one it subtracted
        (``j < i``) added back.
    bits
        Modulus bit width ``b``.
    """
    out = _words(total, bits, "sum").copy()
    scratch = np.empty_like(out)
    for seed in self_seeds:
        out -= expand_into(seed, scratch)
    for i, j, seed in dropped_pairs:
        if i == j:
            raise InvalidInput("a device is not its own neighbour")
        expand_into(seed, scratch)
        if j > i:
            out -= scratch
        else:
            out += scratch
    return out


def pack(words: np.ndarray, bits: int) -> bytes:
    """Wire bytes of a vector: each word little-endian, ``b / 8`` bytes."""
    return _words(words, bits, "vector").astype(word_dtype(bits), copy=False).tobytes()


def unpack(data: bytes, bits: int, count: int | None = None) -> np.ndarray:
    """A vector from its wire bytes (read-only, no copy); ``count`` checks the length."""
    dtype = word_dtype(bits)
    if len(data) % dtype.itemsize:
        raise InvalidInput(f"masked vector length is not a multiple of {dtype.itemsize} bytes")
    if count is not None and len(data) != count * dtype.itemsize:
        raise InvalidInput(f"masked vector must be {count * dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype)
