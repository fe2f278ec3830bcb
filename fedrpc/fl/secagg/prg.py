"""The SecAgg+ pseudorandom generator: a 32-byte seed to mask words with ChaCha20.

Bonawitz et al. 2017 (§3) expand each agreed or self-chosen seed into a mask
vector with a PRG. Ours is the ChaCha20 keystream (RFC 8439 block function,
256-bit key = the seed, 96-bit nonce all zero, block counter from 0; in
``cryptography``'s 16-byte nonce, 16 zero bytes) read as little-endian
``uint32`` or ``uint64`` words. Every seed is an HKDF output bound to one
session and one use (``keys``), so the fixed nonce never repeats under a key.
About 1 ms per million ``uint32`` words here.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedrpc.fl._errors import InvalidInput

__all__ = ["NONCE", "SEED_BYTES", "expand", "expand_into", "word_dtype"]

SEED_BYTES = 32
#: cryptography's ChaCha20 nonce: 4-byte little-endian block counter 0 || 12-byte nonce 0.
NONCE = bytes(16)

# Zero plaintext for the keystream, grown on demand. Encrypting a buffer that
# is already mapped costs a third of encrypting freshly allocated zeros.
_zeros = bytes(0)


def word_dtype(bits: int) -> np.dtype:
    """``<u4`` for a 2^32 modulus, ``<u8`` for 2^64; refuses other widths."""
    if bits == 32:
        return np.dtype("<u4")
    if bits == 64:
        return np.dtype("<u8")
    raise InvalidInput("modulus bit width must be 32 or 64")


def _zero_view(nbytes: int) -> memoryview:
    global _zeros
    if len(_zeros) < nbytes:
        _zeros = bytes(max(nbytes, 2 * len(_zeros)))
    return memoryview(_zeros)[:nbytes]


def expand_into(seed: bytes, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (contiguous ``uint32`` or ``uint64``) with the seed's keystream words.

    Word ``e`` is keystream bytes ``[e*w, (e+1)*w)`` little-endian, ``w`` the
    word size. Reusing ``out`` as scratch avoids page faults in hot loops.
    """
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise InvalidInput(f"PRG seed must be {SEED_BYTES} bytes")
    if out.dtype not in (np.dtype("<u4"), np.dtype("<u8")) or not out.flags.c_contiguous:
        raise InvalidInput("PRG output must be a contiguous little-endian uint32/uint64 array")
    raw = out.reshape(-1).view(np.uint8)
    if raw.nbytes == 0:
        return out
    encryptor = Cipher(algorithms.ChaCha20(bytes(seed), NONCE), mode=None).encryptor()
    encryptor.update_into(_zero_view(raw.nbytes), raw)
    return out


def expand(seed: bytes, count: int, bits: int = 32) -> np.ndarray:
    """The first ``count`` mask words of ``seed``, ``uint32`` (``bits=32``) or ``uint64`` (``bits=64``)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InvalidInput("word count must be a non-negative integer")
    return expand_into(seed, np.empty(count, dtype=word_dtype(bits)))
