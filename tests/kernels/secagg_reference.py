"""Independent pure-Python references for the SecAgg+ known-answer tests.

Written from the RFCs and docs/secagg.md, not from fedrpc.fl.secagg: X25519
(RFC 7748 §5), HKDF-SHA256 (RFC 5869 §2) on the standard library's hmac, the
ChaCha20 block function (RFC 8439 §2.3), Shamir polynomial evaluation and
Lagrange interpolation with Python integers, the Fisher-Yates ring and the
Harary graph. Slow and simple on purpose.
"""

from __future__ import annotations

import hashlib
import hmac

P25519 = 2**255 - 19
PRIME = 2**521 - 1


# --- X25519, RFC 7748 §5 -------------------------------------------------------------


def _clamp(k: bytes) -> int:
    b = bytearray(k)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return int.from_bytes(b, "little")


def x25519(k: bytes, u: bytes) -> bytes:
    """The scalar multiplication of RFC 7748 §5 (Montgomery ladder)."""
    scalar = _clamp(k)
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    a24 = 121665
    for t in range(254, -1, -1):
        bit = (scalar >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % P25519, (x2 - z2) % P25519
        aa, bb = a * a % P25519, b * b % P25519
        e = (aa - bb) % P25519
        c, d = (x3 + z3) % P25519, (x3 - z3) % P25519
        da, cb = d * a % P25519, c * b % P25519
        x3 = (da + cb) ** 2 % P25519
        z3 = x1 * (da - cb) ** 2 % P25519
        x2 = aa * bb % P25519
        z2 = e * (aa + a24 * e) % P25519
    if swap:
        x2, x3, z2, z3 = x3, x2, z3, z2
    return (x2 * pow(z2, P25519 - 2, P25519) % P25519).to_bytes(32, "little")


def x25519_public(k: bytes) -> bytes:
    return x25519(k, (9).to_bytes(32, "little"))


# --- HKDF-SHA256, RFC 5869 §2 --------------------------------------------------------


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


# --- ChaCha20, RFC 8439 §2.3 ---------------------------------------------------------


def _rotl(v: int, c: int) -> int:
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


def _quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF
    s[b] = _rotl(s[b] ^ s[c], 7)


def _words(b: bytes) -> list[int]:
    return [int.from_bytes(b[i : i + 4], "little") for i in range(0, len(b), 4)]


def chacha20_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *_words(key), counter, *_words(nonce)]
    s = list(state)
    for _ in range(10):
        _quarter(s, 0, 4, 8, 12)
        _quarter(s, 1, 5, 9, 13)
        _quarter(s, 2, 6, 10, 14)
        _quarter(s, 3, 7, 11, 15)
        _quarter(s, 0, 5, 10, 15)
        _quarter(s, 1, 6, 11, 12)
        _quarter(s, 2, 7, 8, 13)
        _quarter(s, 3, 4, 9, 14)
    return b"".join(
        ((x + y) & 0xFFFFFFFF).to_bytes(4, "little") for x, y in zip(s, state, strict=True)
    )


def keystream(key: bytes, nbytes: int) -> bytes:
    """docs/secagg.md's PRG: nonce all zero, counter from 0."""
    out = b""
    counter = 0
    while len(out) < nbytes:
        out += chacha20_block(key, counter, bytes(12))
        counter += 1
    return out[:nbytes]


def mask_words(seed: bytes, count: int, bits: int) -> list[int]:
    w = bits // 8
    ks = keystream(seed, count * w)
    return [int.from_bytes(ks[e * w : (e + 1) * w], "little") for e in range(count)]


# --- Shamir over GF(2^521 - 1) -------------------------------------------------------


def shamir_coefficients(secret: bytes, noise: bytes) -> list[int]:
    """f's coefficients as docs/secagg.md describes: a_m from 66-byte big-endian chunks."""
    coeffs = [int.from_bytes(secret, "big")]
    for o in range(0, len(noise), 66):
        coeffs.append((int.from_bytes(noise[o : o + 66], "big") & PRIME) % PRIME)
    return coeffs


def poly_eval(coeffs: list[int], x: int) -> int:
    return sum(a * pow(x, m, PRIME) for m, a in enumerate(coeffs)) % PRIME


def lagrange_at_zero(points: dict[int, int]) -> int:
    """f(0) from {x: f(x)}, one modular inverse per term (no batching, no caching)."""
    total = 0
    for xm, ym in points.items():
        num, den = 1, 1
        for xo in points:
            if xo != xm:
                num = num * (-xo) % PRIME
                den = den * (xm - xo) % PRIME
        total += ym * num * pow(den, PRIME - 2, PRIME)
    return total % PRIME


# --- Neighbour graph -----------------------------------------------------------------


def ring(n: int, seed: bytes) -> list[int]:
    words = mask_words(seed, n + 16, 64)
    order = list(range(1, n + 1))
    it = iter(words)
    for m in range(n - 1, 0, -1):
        w = next(it)
        while w >= 2**64 - (2**64 % (m + 1)):
            w = next(it)
        j = w % (m + 1)
        order[m], order[j] = order[j], order[m]
    return order


def harary(order: list[int], k: int) -> dict[int, set[int]]:
    n = len(order)
    graph: dict[int, set[int]] = {i: set() for i in order}
    for p, i in enumerate(order):
        for d in range(1, k // 2 + 1):
            graph[i] |= {order[(p + d) % n], order[(p - d) % n]}
        if k % 2:
            graph[i].add(order[(p + n // 2) % n])
    return graph
