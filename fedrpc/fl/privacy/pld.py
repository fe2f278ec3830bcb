"""Privacy Loss Distribution accounting for the Poisson-subsampled Gaussian mechanism.

A mechanism's privacy loss distribution (PLD) determines its whole
(epsilon, delta) curve, and composing mechanisms convolves their PLDs
(Koskela, Jälkö & Honkela 2020, "Computing Tight Differential Privacy
Guarantees Using FFT"). One step is discretised on the grid ``k * h`` with the
pessimistic "connect the dots" construction of Doroshenko, Ghazi, Kamath, Kumar
& Manurangsi 2022 (arXiv:2207.04380, Algorithm 1): the atoms are chosen so that
the discrete hockey-stick curve interpolates the exact one at the grid points,
linearly in ``exp(epsilon)``, and since the exact curve is convex there the
discrete one lies above it: every epsilon reported is an upper bound.

Add/remove-one neighbours give two PLDs when q < 1 (Zhu, Dong & Wang 2022):
REMOVE compares ``(1-q) N(0, s^2) + q N(-1, s^2)`` against ``N(0, s^2)`` and ADD
compares ``N(0, s^2)`` against ``(1-q) N(0, s^2) + q N(1, s^2)``; epsilon is the
larger of the two. All steps of all rounds are composed in one FFT: each
round's spectrum raised to its step count, a Chernoff bound choosing the
window, and the mass outside it charged to the infinite loss.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import fft, signal, special

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.privacy._charge import RoundCharge, check_delta, group_charges

__all__ = ["DEFAULT_VALUE_DISCRETIZATION", "clear_cache", "pld_epsilon"]

DEFAULT_VALUE_DISCRETIZATION = 1e-4
"""Default spacing ``h`` of the privacy-loss grid (dp-accounting's default too)."""

# Each Gaussian is cut where its tail holds exp(-50) / 2; that mass goes to +inf.
_TAIL_Z = float(-special.ndtri_exp(math.log(0.5) - 50.0))
_TRUNCATION = 1e-15  # mass allowed outside the composed window, charged to +inf
_EXACT_SPAN = 1 << 20  # below this many grid points, convolve without truncation
_MAX_GRID = 1 << 22  # above this, the grid is coarsened (still an upper bound)
_CHERNOFF_T = np.geomspace(0.5, 32.0, 7)  # tilts, in units of 1 / std of the sum


# Below this the privacy loss grid of one step overflows (near 1e-5): docs/privacy.md.
PLD_NOISE_FLOOR = 1e-3


def _gaussian_delta(eps: np.ndarray, sigma: float) -> np.ndarray:
    """Hockey-stick divergence of N(1, s^2) against N(0, s^2) (Balle & Wang 2018)."""
    half = 0.5 / sigma
    return np.exp(special.log_ndtr(half - eps * sigma)) - np.exp(
        eps + special.log_ndtr(-half - eps * sigma)
    )


def _log_shifted(x: np.ndarray, q: float) -> np.ndarray:
    """``log(1 + (e^x - 1) / q)`` without overflow for large x (x > log(1 - q))."""
    out = np.empty_like(x)
    small = x <= 1.0
    out[small] = np.log1p(np.expm1(x[small]) / q)
    big = x[~small]
    out[~small] = big + np.log1p(-(1.0 - q) * np.exp(-big)) - math.log(q)
    return out


def _step_delta(eps: np.ndarray, sigma: float, q: float, add: bool) -> tuple:
    """delta(eps) of one step, and ``rest = delta - (1 - e^eps)`` where eps < 0.

    Both directions reduce to the Gaussian curve (Balle, Barthe & Gaboardi 2018
    for REMOVE; its mirror image for ADD). For eps < 0 the curve is almost
    ``1 - e^eps``, whose connect-the-dots masses are exactly zero, so the masses
    there are taken from ``rest`` alone: computing them from delta would turn
    its 1e-16 rounding into spurious mass of about 1e-16 / h per grid point.
    """
    delta, rest = np.empty_like(eps), np.zeros_like(eps)
    low = eps < 0.0
    if add:
        # Zero at and beyond the largest ADD loss, -log(1 - q).
        live = eps < (math.inf if q == 1.0 else -math.log1p(-q))
        e = eps[live]
        inner = -e if q == 1.0 else _log_shifted(-e, q)
        rest[live] = q * np.exp(e) * _gaussian_delta(inner, sigma)
        rest[~live] = np.expm1(eps[~live])
        delta[:] = -np.expm1(eps) + rest
    else:
        # At and below the smallest REMOVE loss, log(1 - q), it is 1 - e^eps.
        live = eps > (-math.inf if q == 1.0 else math.log1p(-q))
        e = eps[live]
        inner = e if q == 1.0 else _log_shifted(e, q)
        delta[live] = q * _gaussian_delta(inner, sigma)
        delta[~live] = -np.expm1(eps[~live])
        part = live & low
        rest[part] = (np.expm1(eps[part]) + q) * _gaussian_delta(-inner[low[live]], sigma)
    return np.clip(delta, 0.0, 1.0), rest, low


def _loss_range(sigma: float, q: float, add: bool) -> tuple[float, float]:
    log_q = math.log(q)
    log_1mq = -math.inf if q == 1.0 else math.log1p(-q)
    cut = _TAIL_Z * sigma
    if add:

        def loss(x: float) -> float:
            return -float(np.logaddexp(log_1mq, log_q + (2 * x - 1) / (2 * sigma**2)))

        return loss(cut + 1.0), loss(-cut)

    def loss(x: float) -> float:
        return float(np.logaddexp(log_1mq, log_q + (-2 * x - 1) / (2 * sigma**2)))

    return loss(cut), loss(-cut - 1.0)


class _GridTooLarge(Exception):
    """The grid at this spacing would exceed _MAX_GRID points."""

    def __init__(self, points: int) -> None:
        self.points = points


@lru_cache(maxsize=64)
def _one_step(sigma: float, q: float, h: float, add: bool) -> tuple[int, np.ndarray, float]:
    """Connect-the-dots PMF of one step: (first grid index, masses, mass at +inf)."""
    lo, hi = _loss_range(sigma, q, add)
    k_lo, k_hi = math.floor(lo / h), math.ceil(hi / h)
    if k_hi - k_lo + 1 > _MAX_GRID:  # tiny noise: even one step needs a coarser grid
        raise _GridTooLarge(k_hi - k_lo + 1)
    deltas, rest, low = _step_delta(np.arange(k_lo, k_hi + 1) * h, sigma, q, add)
    deltas = np.minimum.accumulate(deltas)  # rounding must not break monotonicity
    if deltas.size == 1:
        probs = np.array([1.0 - deltas[0]])
    else:
        grow, em1 = math.exp(h), math.expm1(h)
        d, dr = np.diff(deltas), np.diff(rest)
        probs = np.empty_like(deltas)
        probs[0] = -rest[0] + dr[0] / em1 if low[1] else 1.0 - deltas[0] + d[0] / em1
        probs[1:-1] = np.where(
            low[2:], (dr[1:] - dr[:-1] * grow) / em1, (d[1:] - d[:-1] * grow) / em1
        )
        probs[-1] = d[-1] / math.expm1(-h)
        np.maximum(probs, 0.0, out=probs)
    probs.flags.writeable = False
    return k_lo, probs, float(deltas[-1])


def clear_cache() -> None:
    """Forget the cached one-step PMFs (for benchmarks and tests)."""
    _one_step.cache_clear()


def _window(parts: list[tuple[np.ndarray, int]], span: int) -> tuple[int, int]:
    """Index range of the composed PMF outside which at most _TRUNCATION mass lies."""
    if span < max(_EXACT_SPAN, 2 * max(p.size for p, _ in parts)):
        return 0, span  # the FFT is about this long anyway: keep every point
    variances, idx, logs = 0.0, [], []
    for probs, n in parts:
        i = np.arange(probs.size, dtype=float)
        mass = probs.sum()
        m = float(probs @ i) / mass
        variances += n * float(probs @ (i - m) ** 2) / mass
        idx.append(i)
        with np.errstate(divide="ignore"):
            logs.append(np.log(probs))
    tilts = _CHERNOFF_T / math.sqrt(max(variances, 1e-300))
    slack = math.log(2.0 / _TRUNCATION)
    a, b = 0, span
    for t in np.concatenate([tilts, -tilts]):
        log_mgf = 0.0
        for (_, n), i, log_p in zip(parts, idx, logs, strict=True):
            x = log_p + t * i
            top = x.max()
            # Subnormal floats make exp() and sums ~100x slower; raising the
            # tiny terms to e^-700 only loosens the bound.
            log_mgf += n * (top + math.log(np.exp(np.maximum(x - top, -700.0)).sum()))
        bound = (log_mgf + slack) / t
        if t > 0 and math.isfinite(bound):
            b = min(b, math.ceil(bound))
        elif t < 0 and math.isfinite(bound):
            a = max(a, math.floor(bound))
    return min(a, b), b


def _compose(
    parts: list[tuple[int, np.ndarray, float, int]],
) -> tuple[int, np.ndarray, float, bool]:
    """Convolve every step at once: (first index, masses, mass at +inf, lower cut made)."""
    span = sum(n * (p.size - 1) for _, p, _, n in parts)
    a, b = _window([(p, n) for _, p, _, n in parts], span)
    if b - a + 1 > _MAX_GRID:
        raise _GridTooLarge(b - a + 1)
    size = fft.next_fast_len(max(b - a + 1, *(p.size for _, p, _, _ in parts)), real=True)
    spectrum = np.ones(size // 2 + 1, dtype=complex)
    for _, probs, _, n in parts:
        spectrum *= fft.rfft(probs, size) ** n
    composed = np.roll(fft.irfft(spectrum, size), -a)[: b - a + 1]
    np.maximum(composed, 0.0, out=composed)  # FFT round-off leaves tiny negatives
    inf_mass = -math.expm1(sum(n * math.log1p(-inf) for _, _, inf, n in parts))
    truncated = (a, b) != (0, span)
    if truncated:
        inf_mass += _TRUNCATION
    return sum(n * k for k, _, _, n in parts) + a, composed, inf_mass, a > 0


def _epsilon(
    first: int, probs: np.ndarray, inf_mass: float, h: float, delta: float, cut: bool
) -> float:
    """Smallest epsilon >= 0 whose hockey-stick divergence is at most delta."""
    if inf_mass > delta:
        return math.inf
    # upper[j] = mass at losses >= l_j (with +inf); tilted[j] = sum_{i>=j} p_i e^(l_j - l_i),
    # run as a decaying recurrence so no exp() of a loss can overflow.
    upper = inf_mass + np.cumsum(probs[::-1])[::-1]
    tilted = signal.lfilter([1.0], [1.0, -math.exp(-h)], probs[::-1])[::-1]
    # delta at l_j counts the atoms above l_j only.
    above = np.append(upper[1:], inf_mass) - math.exp(-h) * np.append(tilted[1:], 0.0)
    j = int(np.argmax(above <= delta))
    loss_j = (first + j) * h
    if j == 0 and cut:
        return max(0.0, loss_j)  # mass below the window was cut: stay pessimistic
    # On (l_{j-1}, l_j] the curve is upper[j] - exp(eps - l_j) * tilted[j]; and
    # above[j-1] > delta makes upper[j] - delta > 0 there.
    gap = upper[j] - delta
    eps = loss_j + math.log(gap / tilted[j]) if gap > 0.0 else -math.inf
    low = loss_j - h if j else -math.inf
    return max(0.0, min(loss_j, max(low, eps)))


def pld_epsilon(
    charges: Sequence[RoundCharge],
    delta: float,
    value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION,
) -> float:
    """Epsilon of all ``charges`` composed, by the pessimistic PLD accountant.

    Parameters
    ----------
    charges : sequence of RoundCharge
        The rounds to compose; steps with equal parameters are pooled.
    delta : float
        Target delta in (0, 1).
    value_discretization_interval : float
        Grid spacing ``h`` of the privacy loss. If the composed grid would
        exceed ``2**22`` points, ``h`` is widened just enough; the result is
        then looser but still an upper bound.

    Returns
    -------
    float
        Epsilon (``inf`` if delta is below the mass at infinite loss).

    Raises
    ------
    InvalidInput
        On bad charges, delta, or discretization interval.
    """
    delta = check_delta(delta)
    h = value_discretization_interval
    if isinstance(h, bool) or not isinstance(h, numbers.Real) or not (0.0 < h <= 1.0):
        raise InvalidInput("value_discretization_interval must be a number in (0, 1]")
    groups = group_charges(charges)
    if not groups:
        return 0.0
    if min(sigma for sigma, _ in groups) < PLD_NOISE_FLOOR:
        # Rounds may run with less noise (an exactness test, a federation without a budget),
        # but the loss grid of such a step overflows: the RDP accountant prices it.
        raise InvalidInput(
            f"the PLD accountant prices noise multipliers of at least {PLD_NOISE_FLOOR:g}; "
            "this history has a smaller one: use the RDP accountant"
        )
    h = float(h)
    directions = (False, True) if any(q < 1.0 for _, q in groups) else (False,)
    for _ in range(8):
        try:
            worst = 0.0
            for add in directions:
                parts = [(*_one_step(s, q, h, add and q < 1.0), n) for (s, q), n in groups.items()]
                first, probs, inf_mass, cut = _compose(parts)
                worst = max(worst, _epsilon(first, probs, inf_mass, h, delta, cut))
            return worst
        except _GridTooLarge as big:
            h *= 1.05 * big.points / _MAX_GRID
    raise InvalidInput("these charges are too many to account with the PLD accountant")
