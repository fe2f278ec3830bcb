"""Quantization for SecAgg+: float updates to integers modulo 2^b and back.

Masking works on integers modulo ``M = 2^b`` (Bonawitz et al. 2017, §3), so a
device clips its update to ``[-c, c]``, maps it onto ``L = 2^q - 1`` levels
with unbiased stochastic rounding, multiplies by its capped integer weight
``w`` and appends ``w`` as one more element; the server then learns only the
weighted sum and the total weight. The sum of ``n`` devices must not wrap:
``n * L * W <= 2^b - 1``; :func:`make_spec` picks the smallest ``b`` in
{32, 64} that holds or refuses, never wrapping silently. See
``docs/secagg.md`` ("Quantization").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.secagg.prg import word_dtype

__all__ = [
    "MODULUS_BITS",
    "QuantSpec",
    "capped_weight",
    "choose_modulus_bits",
    "clip_l2",
    "dp_sum",
    "dequantize",
    "error_bound",
    "l2_norm_bound",
    "make_spec",
    "quantize",
]

#: Supported modulus bit widths, smallest first.
MODULUS_BITS = (32, 64)


def _positive_int(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InvalidInput(f"{what} must be a positive integer")
    return int(value)


@dataclass(frozen=True)
class QuantSpec:
    """Quantization and modulus of one session.

    Attributes
    ----------
    clip
        Clipping bound ``c``: each element is clamped to ``[-c, c]``.
    bits
        Quantization bits ``q`` (1..32): ``L = 2^q - 1`` levels above zero.
    max_weight
        Cap ``W`` on a device's integer weight (its sample count).
    modulus_bits
        ``b``: vectors are summed modulo ``2^b`` (32 or 64).
    """

    clip: float
    bits: int
    max_weight: int
    modulus_bits: int

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
            raise InvalidInput("clipping bound must be a positive finite number")
        if _positive_int(self.bits, "quantization bits") > 32:
            raise InvalidInput("quantization bits must be in 1..32")
        _positive_int(self.max_weight, "maximum weight")
        word_dtype(self.modulus_bits)
        if self.capacity(1) > 2**self.modulus_bits - 1:
            raise InvalidInput("one device's levels x maximum weight overflow the modulus")

    @property
    def levels(self) -> int:
        """``L = 2^q - 1``."""
        return 2**self.bits - 1

    @property
    def step(self) -> float:
        """One quantization step in update units, ``2c / L``."""
        return 2.0 * self.clip / self.levels

    @property
    def dtype(self) -> np.dtype:
        """``uint32`` or ``uint64``, little-endian."""
        return word_dtype(self.modulus_bits)

    def capacity(self, devices: int) -> int:
        """Largest possible sum of ``devices`` vectors' elements: ``n * L * W``."""
        return _positive_int(devices, "device count") * self.levels * self.max_weight


def choose_modulus_bits(devices: int, bits: int, max_weight: int) -> int:
    """Smallest ``b`` in {32, 64} with ``devices * (2^bits - 1) * max_weight <= 2^b - 1``.

    Refuses when even 64 bits cannot hold the sum.
    """
    need = (
        _positive_int(devices, "device count")
        * (2 ** _positive_int(bits, "quantization bits") - 1)
        * _positive_int(max_weight, "maximum weight")
    )
    for b in MODULUS_BITS:
        if need <= 2**b - 1:
            return b
    raise InvalidInput(
        f"{devices} devices x {2**bits - 1} levels x weight {max_weight} do not fit a 64-bit "
        "modulus; lower the quantization bits or the maximum weight"
    )


def make_spec(
    devices: int, clip: float, bits: int, max_weight: int, modulus_bits: int | None = None
) -> QuantSpec:
    """The session's :class:`QuantSpec` for at most ``devices`` contributors.

    ``modulus_bits=None`` picks :func:`choose_modulus_bits`; an explicit width
    that cannot hold ``devices * L * W`` is refused, never wrapped.
    """
    if modulus_bits is None:
        modulus_bits = choose_modulus_bits(devices, bits, max_weight)
    spec = QuantSpec(
        clip=float(clip), bits=int(bits), max_weight=int(max_weight), modulus_bits=modulus_bits
    )
    if spec.capacity(devices) > 2**modulus_bits - 1:
        raise InvalidInput(
            f"{devices} devices x {spec.levels} levels x weight {max_weight} overflow a "
            f"{modulus_bits}-bit modulus"
        )
    return spec


def capped_weight(samples: int, spec: QuantSpec) -> int:
    """A device's weight: its sample count capped at ``spec.max_weight``."""
    if isinstance(samples, bool) or not isinstance(samples, int | np.integer) or samples < 0:
        raise InvalidInput("sample count must be a non-negative integer")
    return min(int(samples), spec.max_weight)


def quantize(
    update: np.ndarray, weight: int, spec: QuantSpec, rng: np.random.Generator | None
) -> np.ndarray:
    """The device's vector ``(w*q_1, ..., w*q_d, w)`` before masking.

    Parameters
    ----------
    update
        The update, any float shape (flattened in C order); non-finite values
        are refused.
    weight
        Capped weight ``w`` in ``0..spec.max_weight`` (see :func:`capped_weight`).
    rng
        The device's generator for stochastic rounding (unbiased); ``None``
        rounds to nearest, for tests and known answers.

    Returns
    -------
    numpy.ndarray
        ``d + 1`` words of ``spec.dtype``.
    """
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
        raise InvalidInput("weight must be an integer")
    if not 0 <= weight <= spec.max_weight:
        raise InvalidInput(f"weight must be in 0..{spec.max_weight}")
    x = np.asarray(update).reshape(-1)
    if not np.isfinite(x).all():
        raise InvalidInput("update has NaN or infinite values")
    # In place on one float64 copy: this runs once per device per round over the whole model.
    u = x.astype(np.float64, copy=True)
    # np.minimum/np.maximum: np.clip costs several times more per element.
    np.minimum(u, spec.clip, out=u)
    np.maximum(u, -spec.clip, out=u)
    u += spec.clip
    u *= spec.levels / (2.0 * spec.clip)
    if rng is None:
        q = np.floor(u + 0.5)
    else:
        q = np.floor(u)
        u -= q  # the fractional part, exact in float64
        q += rng.random(u.shape[0]) < u
    np.minimum(q, spec.levels, out=q)  # u >= 0, so q >= 0 already
    out = np.empty(x.shape[0] + 1, dtype=spec.dtype)
    words = out[:-1]
    if spec.levels * spec.max_weight < 2**53:
        np.multiply(q, weight, out=words, casting="unsafe")  # exact in float64 below 2^53
    else:
        words[...] = q  # integers in 0..L, L < 2^32
        words *= spec.dtype.type(weight)
    out[-1] = weight
    return out


def dequantize(total: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, int]:
    """Weighted mean (float64) and total weight from the unmasked sum of vectors.

    ``mean = S / T * (2c / L) - c`` with ``T`` the last element; refuses ``T = 0``.
    """
    total = np.asarray(total)
    if total.ndim != 1 or total.shape[0] < 1 or total.dtype != spec.dtype:
        raise InvalidInput(f"the sum must be a 1-d {spec.dtype} vector with the weight last")
    weight = int(total[-1])
    if weight == 0:
        raise InvalidInput("total weight is zero")
    mean = total[:-1].astype(np.float64)
    mean *= spec.step / weight
    mean -= spec.clip
    return mean, weight


def error_bound(spec: QuantSpec, stochastic: bool = True) -> float:
    """Per-element bound on ``|dequantized mean - weighted mean of clipped updates|``.

    Each device's rounding error is below one step (stochastic) or at most half
    a step (nearest); a weighted mean of such errors is bounded the same way.
    """
    return spec.step if stochastic else spec.step / 2


def l2_norm_bound(clipping_norm: float, bits: int, dimension: int) -> float:
    """The L2 norm a device clips its update to so that, once quantized, it is at most ``C``.

    Central DP on a secure round (docs/secagg.md, "Central DP") calibrates noise
    to a sensitivity ``C``, and the server only sees the sum of the *quantized*
    updates. With the coordinate range ``c = C`` each coordinate moves by less
    than one step ``2C / L`` when rounded, so the quantized update's norm exceeds
    the clipped one by less than ``sqrt(d) * 2C / L``: clipping to
    ``C * (1 - 2 sqrt(d) / L)`` keeps it at most ``C``. Refuses a bound that is
    not positive (too few quantization bits for ``d`` parameters).
    """
    if not (isinstance(clipping_norm, int | float) and math.isfinite(clipping_norm)):
        raise InvalidInput("clipping norm must be a finite number")
    if clipping_norm <= 0:
        raise InvalidInput("clipping norm must be positive")
    levels = 2 ** _positive_int(bits, "quantization bits") - 1
    shrink = 1.0 - 2.0 * math.sqrt(_positive_int(dimension, "dimension")) / levels
    if shrink <= 0:
        raise InvalidInput(
            f"{bits} quantization bits are too coarse for central DP over {dimension} "
            "parameters: rounding alone could exceed the clipping norm; use more bits"
        )
    return float(clipping_norm) * shrink


def clip_l2(update: np.ndarray, bound: float) -> np.ndarray:
    """The update scaled down to L2 norm at most ``bound`` (float64, flat)."""
    x = np.asarray(update, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(x))
    if not math.isfinite(norm):
        raise InvalidInput("update has NaN or infinite values")
    # The margin absorbs the rounding of the scaling itself.
    return x * (bound / norm * (1 - 2.0**-40)) if norm > bound else x


def dp_sum(total: np.ndarray, count: int, spec: QuantSpec) -> np.ndarray:
    """The sum of ``count`` weight-1 dequantized updates, through a fold no device can exploit.

    Central DP on a secure round needs the released sum to move by at most one
    honest device's norm when that device is added or removed, whatever the
    other devices send. A plain dequantization of the modular sum does not: a
    hostile vector can make it wrap exactly where the honest sum is negative,
    a jump of ``M`` steps. So the sum is read in doubled, centred units,
    ``Z = 2 S - count L`` modulo ``2M`` (one device adds exactly ``2 q_i - L``,
    its dequantized update over ``c / L``), and folded by the triangle wave of
    period ``2M`` that is the identity on ``[-M/2, M/2]``: 1-Lipschitz on the
    circle, so no sum of other vectors makes it jump, and exact for honest
    sums, which the session's capacity (``2 n L <= M - 1``) keeps within it.
    Only ``b = 32`` (exact in int64); the weight word must equal ``count``.
    """
    total = np.asarray(total)
    if spec.modulus_bits != 32 or total.dtype != spec.dtype or total.ndim != 1:
        raise InvalidInput("a DP sum needs the 32-bit modulus and its 1-d uint32 sum")
    if spec.max_weight != 1 or int(total[-1]) != count:
        raise InvalidInput(
            f"the weights add up to {int(total[-1])}, not to the {count} survivors: "
            "a device sent a weight other than 1"
        )
    m = 1 << 32
    z = total[:-1].astype(np.int64) * 2 - count * spec.levels
    z %= 2 * m  # in [0, 2M)
    z[z >= m] -= 2 * m  # in [-M, M)
    upper, lower = z > m // 2, z < -(m // 2)
    z[upper] = m - z[upper]
    z[lower] = -m - z[lower]
    return z.astype(np.float64) * (spec.clip / spec.levels)
