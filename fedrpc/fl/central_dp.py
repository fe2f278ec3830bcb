"""Central differential privacy for aggregation: clip, average, add Gaussian noise.

Implements the server side of DP-FedAvg (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models", ICLR): every client delta
is clipped to L2 norm ``clipping_norm`` over the whole flat vector, the
clipped deltas are averaged with **uniform** weights, and Gaussian noise of
standard deviation ``noise_multiplier * clipping_norm / m`` is added to the
average (``m`` = number of updates).

Why uniform weights: with sample weights ``n_k / sum n`` one client's
contribution to the average can reach ``clipping_norm`` itself (a client with
most of the samples), so the sensitivity bound ``clipping_norm / m`` behind
the noise scale would not hold. DP-FedAvg bounds each user's influence by
clipping and equal weighting; the number of examples is ignored here.

The noise std on the mean is ``z C / m``, i.e. the Gaussian mechanism with
multiplier ``z`` on the clipped sum (sensitivity ``C`` for adding or removing
one client); turning ``z``, the sampling rate and the number of rounds into
an epsilon is the accountant's job (:mod:`fedrpc.fl.privacy`).
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
        Mean of the clipped deltas plus Gaussian noise, flat float32.
    num_updates : int
        m, the number of deltas averaged.
    num_clipped : int
        How many deltas had a norm above the clipping norm.
    fraction_clipped : float
        ``num_clipped / num_updates``.
    noise_std : float
        Standard deviation of the noise added to each coordinate of the mean.
    """

    vector: np.ndarray
    num_updates: int
    num_clipped: int
    fraction_clipped: float
    noise_std: float


class CentralDPAccumulator:
    """DP-FedAvg aggregation, streamed one client delta at a time.

    Parameters
    ----------
    size : int
        Length of the flat vectors.
    clipping_norm : float
        C > 0, the L2 bound of each client's delta.
    noise_multiplier : float
        z >= 0; the noise std on the mean is ``z * C / m``. 0 clips only.
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
        base: np.ndarray | None = None,
    ) -> None:
        self.clipping_norm = check_positive("clipping_norm", clipping_norm)
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

    @property
    def count(self) -> int:
        """Updates added so far."""
        return self._sum.count

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

    def finish(self, rng: np.random.Generator) -> DPAggregate:
        """The noised mean; ``rng`` is the caller's (cryptographically seeded) generator."""
        if not isinstance(rng, np.random.Generator):
            raise InvalidInput("rng must be a numpy.random.Generator")
        m = self._sum.count
        total = self._sum.finish()
        std = self.noise_multiplier * self.clipping_norm / m
        np.divide(total, np.float64(m), out=total, casting="same_kind")
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
        )
