"""Central differential privacy for aggregation: clip, sum, divide by the expected cohort, noise.

Implements the server side of DP-FedAvg with the **fixed-denominator
estimator** of McMahan, Ramage, Talwar & Zhang 2018, "Learning
Differentially Private Recurrent Language Models" (ICLR), Algorithm 1 (the
estimator they write f~_f, with every user's weight 1 so W = N). Every
client delta is clipped to L2 norm
``clipping_norm`` (C) over the whole flat vector, the clipped deltas are
**summed** and divided by the *expected* cohort size ``W = q N`` (``q`` the
Poisson sampling rate, ``N`` the eligible population), never by the
realised number of updates ``m``, and Gaussian noise of standard deviation
``z C / (q N)`` is added to that average.

Why the fixed denominator: under add/remove-one-device neighbours the
clipped sum changes by at most ``C``; dividing by the constant ``q N`` keeps
the sensitivity of the average at ``C / (q N)``, and the noise is calibrated
to exactly that. Dividing by the realised ``m`` (which itself changes by one
with the device) does not have that sensitivity bound: removing a device
also rescales every other device's contribution. The estimator is unbiased
for the population mean of clipped deltas under Poisson sampling; its
variance is higher than the ratio estimator's when ``m`` strays from
``q N``, which is the price of the honest sensitivity.

Why uniform weights: with sample weights ``n_k / sum n`` one client's
contribution can reach ``C`` itself, so the bound would not hold. Sample
counts are ignored here.

The noise std on the sum is ``z C``: the Gaussian mechanism with multiplier
``z`` at sensitivity ``C``; turning ``z``, the sampling rate and the number
of rounds into an epsilon is the accountant's job (:mod:`fedrpc.fl.privacy`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.strategies._common import as_tensor, check_positive, check_vector, single_thread
from fedrpc.fl.strategies._sum import WeightedSum

__all__ = ["CentralDPAccumulator", "DPAggregate"]

# Clipped vectors are scaled in float32: shrinking the scale by 2^-20 keeps
# their norm at or below the clipping norm despite the roundings (<= 2^-23).
_CLIP_MARGIN = 1.0 - 2.0**-20
_NOISE_CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class DPAggregate:
    """The noised average and what the clipping did.

    Attributes
    ----------
    vector : numpy.ndarray
        Sum of the clipped deltas divided by the expected cohort size
        ``q N``, plus Gaussian noise; flat float32.
    num_updates : int
        m, the number of deltas summed (not to be published un-noised).
    num_clipped : int
        How many deltas had a norm above the clipping norm.
    fraction_clipped : float
        ``num_clipped / num_updates``.
    noise_std : float
        Standard deviation of the noise added to each coordinate of the
        average, ``z C / (q N)``.
    expected_count : float
        ``q N``, the denominator.
    """

    vector: np.ndarray
    num_updates: int
    num_clipped: int
    fraction_clipped: float
    noise_std: float
    expected_count: float


class CentralDPAccumulator:
    """DP-FedAvg aggregation with the fixed-denominator estimator, one client delta at a time.

    The result is ``(sum_k clip(delta_k)) / (q N) + Normal(0, (z C / (q N))^2)``
    per coordinate (McMahan et al. 2018, "Learning Differentially Private
    Recurrent Language Models", ICLR).

    Parameters
    ----------
    size : int
        Length of the flat vectors.
    clipping_norm : float
        C > 0, the L2 bound of each client's delta.
    noise_multiplier : float
        z >= 0; the noise std on the average is ``z * C / expected_count``.
        0 clips only.
    expected_count : float
        ``q N`` > 0, the expected cohort size under Poisson sampling at rate
        ``q`` over ``N`` eligible devices: the fixed denominator.
    base : numpy.ndarray, optional
        The round's global model. When given, :meth:`add` receives full
        client weights and clips ``weights - base``; the result is still the
        noised mean *delta*. Clipping full weights would be meaningless.
    """

    def __init__(
        self,
        size: int,
        *,
        clipping_norm: float,
        noise_multiplier: float,
        expected_count: float,
        base: np.ndarray | None = None,
    ) -> None:
        self.clipping_norm = check_positive("clipping_norm", clipping_norm)
        self.expected_count = check_positive("expected_count", expected_count)
        if (
            isinstance(noise_multiplier, bool)
            or not isinstance(noise_multiplier, numbers.Real)
            or not (math.isfinite(noise_multiplier) and noise_multiplier >= 0)
        ):
            raise InvalidInput(f"noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
        self.noise_multiplier = float(noise_multiplier)
        self._sum = WeightedSum(size)
        self._base = None if base is None else check_vector(base, size, "base")
        self._delta = None if base is None else np.empty(size, dtype=np.float32)
        self.num_clipped = 0
        self._extra = 0  # deltas beyond one per add, from add_clipped_mean

    def add(self, update: np.ndarray) -> float:
        """Clip and add one client's delta (or weights, with ``base``).

        Returns
        -------
        float
            The L2 norm of the delta before clipping.
        """
        delta = check_vector(update, self._sum.size, "update", self.count)
        if self._base is not None and self._delta is not None:
            with single_thread():
                torch.sub(as_tensor(delta), as_tensor(self._base), out=as_tensor(self._delta))
            delta = self._delta
        with single_thread():
            # float64 accumulation: the clipping guarantee needs the norm to
            # better than the margin, which a float32 dot over 1M values misses.
            norm = float(torch.linalg.vector_norm(as_tensor(delta), dtype=torch.float64))
        if not math.isfinite(norm):
            raise InvalidInput(f"update {self.count} holds NaN or infinite values")
        scale = 1.0
        if norm > self.clipping_norm:
            scale = self.clipping_norm / norm * _CLIP_MARGIN
            self.num_clipped += 1
        self._sum.add(delta, scale)
        return norm

    def add_clipped_mean(self, mean: np.ndarray, count: int) -> None:
        """Add ``count`` deltas the server only knows by their mean, each clipped by its device.

        A SecAgg+ result is such a mean: the server never sees one device's
        delta, so it cannot clip it; devices clip to ``C`` before masking
        (docs/secagg.md, "Central DP"), and the sensitivity bound holds for
        every device that does. ``count`` deltas add ``count * mean``.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidInput("count must be a positive integer")
        if self._base is not None:
            raise InvalidInput("a clipped mean is a mean delta; it takes no base")
        self._sum.add(check_vector(mean, self._sum.size, "update", self.count), float(count))
        self._extra += count - 1

    @property
    def count(self) -> int:
        """Deltas added so far."""
        return self._sum.count + self._extra

    def finish(self, rng: np.random.Generator) -> DPAggregate:
        """The noised average; ``rng`` is the caller's (cryptographically seeded) generator."""
        if not isinstance(rng, np.random.Generator):
            raise InvalidInput("rng must be a numpy.random.Generator")
        m = self.count
        # The clipped sum over the fixed denominator q N, rounded once to float32.
        total, _ = self._sum.finish_mean(self.expected_count)
        std = self.noise_multiplier * self.clipping_norm / self.expected_count
        if std > 0:
            for a in range(0, total.size, _NOISE_CHUNK):
                b = min(a + _NOISE_CHUNK, total.size)
                noise = rng.standard_normal(b - a)
                noise *= std
                # Added in float64, rounded once to float32.
                np.add(total[a:b], noise, out=total[a:b], casting="same_kind")
        return DPAggregate(
            vector=total,
            num_updates=m,
            num_clipped=self.num_clipped,
            fraction_clipped=self.num_clipped / m,
            noise_std=std,
            expected_count=self.expected_count,
        )
