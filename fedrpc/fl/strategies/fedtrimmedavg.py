"""FedTrimmedAvg: the coordinate-wise trimmed mean, over coordinate chunks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedrpc.fl.strategies._common import (
    DEFAULT_MEMORY_BUDGET,
    VectorSource,
    check_budget,
    check_fraction,
    check_sources,
    chunk_size,
    gather,
    single_thread,
)

__all__ = ["fedtrimmedavg"]


def fedtrimmedavg(
    sources: Sequence[VectorSource],
    *,
    beta: float,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> np.ndarray:
    """Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML).

    For each coordinate, the ``floor(beta * N)`` largest and as many smallest
    values are dropped and the rest averaged (in float64, rounded once).

    Parameters
    ----------
    sources : sequence of VectorSource
        The N client vectors, all the same length.
    beta : float
        Fraction cut at each end, in [0, 0.5).
    memory_budget_bytes : int
        Bound on the working buffers (``8 N + 16`` bytes per coordinate of a
        chunk); numpy's casting buffers and the float32 result come on top.

    Returns
    -------
    numpy.ndarray
        The trimmed mean, flat float32.
    """
    beta = check_fraction("beta", beta, low=0.0, high=0.5)
    n, size = check_sources(sources)
    cut = int(beta * n)
    kept = n - 2 * cut
    step = chunk_size(size, 8 * n + 16, check_budget(memory_budget_bytes), block_rows=n)
    out = np.empty(size, dtype=np.float32)
    block = np.empty((n, step), dtype=np.float32)
    by_coordinate = np.empty((step, n), dtype=np.float32)
    with single_thread():
        for a in range(0, size, step):
            b = min(a + step, size)
            rows = gather(sources, range(n), a, b, block)
            if cut == 0:
                total = rows.sum(axis=0, dtype=np.float64)
            else:
                cols = by_coordinate[: b - a]
                torch.from_numpy(cols).copy_(torch.from_numpy(rows).t())
                # A SIMD sort of each row costs about what one partition does
                # (two partitions would be needed to isolate both tails).
                cols.sort(axis=1)
                total = cols[:, cut : n - cut].sum(axis=1, dtype=np.float64)
            np.divide(total, kept, out=out[a:b], casting="same_kind")
    return out
