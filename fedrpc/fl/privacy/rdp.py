"""Rényi DP of the Poisson-subsampled Gaussian mechanism and its (epsilon, delta) conversion.

Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of the Sampled
Gaussian Mechanism" (arXiv:1908.10530), Section 3.3, gives A_alpha, with
``rdp(alpha) = log(A_alpha) / (alpha - 1)`` for add/remove-one neighbours:

* integer alpha: a finite binomial sum of positive terms;
* fractional alpha: two infinite series split at
  ``z0 = sigma**2 * log(1/q - 1) + 1/2``, whose binomial coefficients change sign.

Rounds compose by adding their RDP curves order by order; the sum is turned
into (epsilon, delta) once, with the conversion of Balle et al. 2020,
"Hypothesis Testing Interpretations and Rényi Differential Privacy"
(Theorem 21). Adding up per-round epsilons would be a loose and different
bound, so nothing here does it.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
from scipy import special

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.privacy._charge import check_delta, check_noise, check_rate, check_steps

__all__ = [
    "ORDERS",
    "clear_cache",
    "curves_of",
    "epsilon_from_rdp",
    "one_step_rdp",
    "rdp_curve",
    "remember_curves",
    "uncached_pairs",
]


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


ORDERS: np.ndarray = _readonly(
    np.concatenate(
        [np.arange(11, 110) / 10.0, np.arange(11, 64, dtype=float), [128.0, 256.0, 512.0, 1024.0]]
    )
)
"""RDP orders: 1.1..10.9 by 0.1, 11..63, then 128, 256, 512, 1024 (156 orders)."""

_IS_INT = ORDERS == np.round(ORDERS)
_INT_ORDERS = ORDERS[_IS_INT].astype(int)
_FRAC_ORDERS = ORDERS[~_IS_INT]

# Integer orders: every term k = 0..alpha of every order in one flat array, so a
# curve is a handful of vector ops plus a segmented log-sum-exp (reduceat).
_K = np.concatenate([np.arange(a + 1) for a in _INT_ORDERS]).astype(float)
_KA = np.repeat(_INT_ORDERS, _INT_ORDERS + 1).astype(float)
_SEG_START = np.concatenate([[0], np.cumsum(_INT_ORDERS + 1)[:-1]])
# Exact big-integer binomials, rounded once: no gammaln error at alpha = 1024.
_LOG_BINOM = np.array(
    [math.log(math.comb(a, k)) for a in _INT_ORDERS for k in range(a + 1)], dtype=float
)

# Fractional orders are tenths, so alpha - i is a tenth too: the second series'
# normal tail is evaluated once per distinct tenth instead of once per (alpha, i).
_FRAC_TENTHS = np.round(_FRAC_ORDERS * 10.0).astype(int)
assert np.array_equal(_FRAC_TENTHS / 10.0, _FRAC_ORDERS)
_TABLE_TERMS = 1024
_FRAC_LGAMMA = special.gammaln(_FRAC_ORDERS + 1.0)


def _log_binom_signed(a: np.ndarray, i: np.ndarray, a_lgamma: np.ndarray) -> tuple:
    j1 = a - i + 1.0
    log_c = a_lgamma - special.gammaln(i + 1.0) - special.gammaln(j1)
    return log_c, special.gammasgn(j1)


_TAB_LOGC, _TAB_SIGN = _log_binom_signed(
    _FRAC_ORDERS[:, None], np.arange(_TABLE_TERMS, dtype=float)[None, :], _FRAC_LGAMMA[:, None]
)
_SERIES_RTOL = 1e-14  # relative size of the last summed term when a series stops
_SERIES_MAX_TERMS = 1 << 17
# log A is a sum of exp()'d terms near 1, good to a few ulp; nudging it up by
# this much keeps the curve an upper bound after rounding, not just before.
_ROUNDING_MARGIN = 2e-15
_FIRST_CHUNK = 16  # holds the largest term: |terms| shrink from i > (alpha - 1) / 2

# Balle et al. 2020 conversion, split into its order-only parts.
_CONV_OFFSET = np.log1p(-1.0 / ORDERS) - np.log(ORDERS) / (ORDERS - 1.0)
_CONV_SLOPE = 1.0 / (ORDERS - 1.0)


def _log_a_integer(sigma: float, q: float) -> np.ndarray:
    """log A_alpha at the integer orders (binomial expansion, all terms positive)."""
    x = (
        _LOG_BINOM
        + _K * math.log(q)
        + (_KA - _K) * math.log1p(-q)
        + _K * (_K - 1.0) / (2.0 * sigma * sigma)
    )
    peak = np.maximum.reduceat(x, _SEG_START)
    peak_each = np.repeat(peak, _INT_ORDERS + 1)
    return peak + np.log(np.add.reduceat(np.exp(x - peak_each), _SEG_START))


def _log_a_fractional(sigma: float, q: float) -> np.ndarray:
    """log A_alpha at the fractional orders (two signed series, summed in chunks).

    The i-th terms of both series carry the sign of binom(alpha, i), which
    alternates for i > alpha, and their magnitudes decrease for
    i > (alpha - 1) / 2 (the Gaussian Mills-ratio bound
    ``Phi(-(t + d)) <= exp(-t d - d^2 / 2) Phi(-t)`` cancels the growth of the
    exponential factor exactly). So once i > alpha the tail left out is at most
    the last term in magnitude, and adding that term's magnitude back makes the
    result an upper bound on A_alpha, never an underestimate.
    """
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma * sigma * (log_1mq - log_q) + 0.5
    inv2s2 = 1.0 / (2.0 * sigma * sigma)
    n = _FRAC_ORDERS.size
    scale = np.zeros(n)
    total = np.zeros(n)
    result = np.empty(n)
    active = np.arange(n)
    start, size = 0, _FIRST_CHUNK
    while active.size:
        end = start + size
        a = _FRAC_ORDERS[active, None]
        i = np.arange(start, end, dtype=float)
        if end <= _TABLE_TERMS:
            log_c, sign = _TAB_LOGC[active, start:end], _TAB_SIGN[active, start:end]
        else:
            log_c, sign = _log_binom_signed(a, i[None, :], _FRAC_LGAMMA[active, None])
        j = a - i
        # 10 * (alpha - i) as an integer index into one vector of normal tails.
        u = _FRAC_TENTHS[active, None] - 10 * np.arange(start, end)[None, :]
        u_min = int(u.min())
        tail1 = special.log_ndtr((np.arange(u_min, int(u.max()) + 1) / 10.0 - z0) / sigma)
        s0 = log_c + (i * log_q + (i * i - i) * inv2s2 + special.log_ndtr((z0 - i) / sigma))
        s0 = s0 + j * log_1mq
        s1 = log_c + j * log_q + (j * j - j) * inv2s2 + i * log_1mq + tail1[u - u_min]
        if start == 0:
            scale = np.maximum(s0, s1).max(axis=1)
        sc = scale[active, None]
        mag = np.exp(s0 - sc) + np.exp(s1 - sc)
        total[active] += (sign * mag).sum(axis=1)
        last = mag[:, -1]
        done = ((end - 1 >= a[:, 0] + 1.0) & (last <= _SERIES_RTOL * total[active])) | (
            end >= _SERIES_MAX_TERMS
        )
        result[active[done]] = total[active[done]] + last[done]
        active = active[~done]
        start, size = end, min(2 * size, 4096)
    return scale + np.log(result)


def _compute_one_step(sigma: float, q: float) -> np.ndarray:
    if q == 1.0:
        return _readonly(ORDERS / (2.0 * sigma * sigma))
    log_a = np.empty_like(ORDERS)
    log_a[_IS_INT] = _log_a_integer(sigma, q)
    log_a[~_IS_INT] = _log_a_fractional(sigma, q)
    # A_alpha >= 1 (a Rényi divergence is non-negative); clip rounding noise.
    return _readonly(np.maximum(log_a + _ROUNDING_MARGIN, 0.0) / (ORDERS - 1.0))


# One-step curves by (sigma, q), least recently used first. Filled by _one_step, or by
# remember_curves with curves computed elsewhere (a server's worker process).
_CACHE_SIZE = 1024
_cache: OrderedDict[tuple[float, float], np.ndarray] = OrderedDict()
_cache_lock = threading.Lock()


def _store(key: tuple[float, float], curve: np.ndarray) -> None:
    with _cache_lock:
        _cache[key] = curve
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def _one_step(sigma: float, q: float) -> np.ndarray:
    if q == 1.0:  # a closed form: cheaper than the cache, and kept out of it
        return _compute_one_step(sigma, q)
    key = (sigma, q)
    with _cache_lock:
        curve = _cache.get(key)
        if curve is not None:
            _cache.move_to_end(key)
            return curve
    curve = _compute_one_step(sigma, q)
    _store(key, curve)
    return curve


def uncached_pairs(pairs: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (noise_multiplier, sample_rate) pairs whose one-step curve would be computed.

    A cached pair, or one with ``sample_rate == 1`` (a closed form), costs
    microseconds; any other pair costs up to tens of milliseconds, which a
    server computes off its event loop (``fedrpc.math_pool``).
    """
    with _cache_lock:
        return [(s, q) for s, q in pairs if q != 1.0 and (s, q) not in _cache]


def curves_of(pairs: Iterable[tuple[float, float]]) -> dict[tuple[float, float], np.ndarray]:
    """The one-step curves of ``pairs`` (computed and cached where missing), by pair."""
    return {(s, q): one_step_rdp(s, q) for s, q in pairs}


def remember_curves(curves: dict[tuple[float, float], np.ndarray]) -> None:
    """Cache one-step curves computed elsewhere by :func:`curves_of` (another process).

    Raises
    ------
    InvalidInput
        If a key is not a valid (noise_multiplier, sample_rate) pair or a curve
        does not hold one non-negative number per order.
    """
    for (sigma, q), curve in curves.items():
        key = (check_noise(sigma), check_rate(q))
        c = np.array(curve, dtype=float)
        if c.shape != ORDERS.shape or not (c >= 0).all():
            raise InvalidInput(f"a one-step curve must hold {ORDERS.size} non-negative values")
        _store(key, _readonly(c))


def one_step_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one release over :data:`ORDERS`, cached per parameter pair (read-only).

    Parameters
    ----------
    noise_multiplier : float
        Noise standard deviation over L2 sensitivity, finite and > 0.
    sample_rate : float
        Poisson sampling probability in (0, 1]; q = 1 is ``alpha / (2 sigma^2)``.

    Returns
    -------
    numpy.ndarray
        A read-only array shared between callers; copy it before editing.
    """
    return _one_step(check_noise(noise_multiplier), check_rate(sample_rate))


def clear_cache() -> None:
    """Forget the cached one-step curves (for benchmarks and tests)."""
    with _cache_lock:
        _cache.clear()


def rdp_curve(noise_multiplier: float, sample_rate: float, num_steps: int) -> np.ndarray:
    """RDP over :data:`ORDERS` of ``num_steps`` releases of the subsampled Gaussian.

    Mironov, Talwar & Zhang 2019. Composition of identical steps multiplies the
    one-step curve, which is cached per ``(noise_multiplier, sample_rate)``.

    Returns
    -------
    numpy.ndarray
        A new array of shape ``ORDERS.shape``.

    Raises
    ------
    InvalidInput
        If a parameter is out of range.
    """
    return one_step_rdp(noise_multiplier, sample_rate) * check_steps(num_steps)


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """Smallest epsilon over :data:`ORDERS` for an RDP curve at target ``delta``.

    Balle et al. 2020, Theorem 21:
    ``eps = rdp - (log(delta) + log(alpha)) / (alpha - 1) + log((alpha - 1) / alpha)``,
    minimised over the orders, with the edge cases handled as dp-accounting's
    ``compute_epsilon``: an order whose RDP is so small that
    ``delta**2 + expm1(-rdp) > 0`` already gives epsilon 0 (KL bound), an
    infinite RDP gives an infinite epsilon, and the result is clipped at 0.

    Returns
    -------
    tuple of float
        ``(epsilon, best_order)``; ``(inf, nan)`` when every order is infinite.

    Raises
    ------
    InvalidInput
        If ``rdp`` does not hold one non-negative value per order, or ``delta``
        is not in (0, 1).
    """
    delta = check_delta(delta)
    try:
        r = np.asarray(rdp, dtype=float)
    except (TypeError, ValueError):
        raise InvalidInput("rdp must be an array of numbers, one per RDP order") from None
    if r.shape != ORDERS.shape:
        raise InvalidInput(f"rdp must hold exactly {ORDERS.size} values, one per RDP order")
    if np.isnan(r).any() or (r < 0).any():
        raise InvalidInput("rdp values must be non-negative numbers")
    with np.errstate(invalid="ignore"):
        eps = r + _CONV_OFFSET - math.log(delta) * _CONV_SLOPE
    eps[delta * delta + np.expm1(-r) > 0.0] = 0.0
    if np.isinf(eps).all():
        return math.inf, math.nan
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(ORDERS[best])
