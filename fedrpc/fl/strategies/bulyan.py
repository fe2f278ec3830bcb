"""Bulyan: iterated Krum selection, then a trimmed mean around the median."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.strategies._common import (
    DEFAULT_MEMORY_BUDGET,
    Selection,
    VectorSource,
    check_budget,
    check_count,
    check_sources,
    chunk_size,
    gather,
    single_thread,
)
from fedrpc.fl.strategies.krum import krum_scores, pairwise_sq_distances

__all__ = ["Selection", "bulyan"]


def _select(dist: np.ndarray, f: int, theta: int) -> list[int]:
    """Apply Krum ``theta`` times, removing each winner from the candidates."""
    remaining = list(range(dist.shape[0]))
    chosen: list[int] = []
    for _ in range(theta):
        sub = dist[np.ix_(remaining, remaining)]
        r = len(remaining)
        neighbours = min(r - 1, max(1, r - f - 2))
        best = int(np.argmin(krum_scores(sub, neighbours)))
        chosen.append(remaining.pop(best))
    return chosen


def bulyan(
    sources: Sequence[VectorSource],
    *,
    num_malicious: int,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> Selection:
    """Bulyan over Krum (El Mhamdi et al. 2018, "The Hidden Vulnerability of
    Distributed Learning in Byzantium", ICML).

    1. Select ``theta = n - 2f`` updates by applying Krum repeatedly to the
       remaining ones (scores over the shrinking set, as in the paper); the
       pairwise distances are computed once, in one chunked pass.
    2. For each coordinate, average the ``beta = theta - 2f`` selected values
       closest to the selected values' median.

    Parameters
    ----------
    sources : sequence of VectorSource
        The n client vectors; n must be at least ``4 f + 3``.
    num_malicious : int
        f, the number of Byzantine updates tolerated.
    memory_budget_bytes : int
        Bound on the working buffers of each pass (about ``16 theta + 32
        (2f + 1)`` bytes per coordinate of a chunk in the second); numpy's
        casting buffers and the float32 result come on top.

    Returns
    -------
    Selection
        The aggregate and the ``theta`` selected indices in selection order.
    """
    n, size = check_sources(sources)
    f = check_count("num_malicious", num_malicious)
    if n < 4 * f + 3:
        raise InvalidInput(
            f"bulyan needs at least 4*num_malicious+3 = {4 * f + 3} updates, got {n}"
        )
    budget = check_budget(memory_budget_bytes)
    theta = n - 2 * f
    beta = theta - 2 * f
    selected = _select(pairwise_sq_distances(sources, memory_budget_bytes=budget), f, theta)

    windows = 2 * f + 1  # a beta-window of the sorted theta values starts at 0..2f
    step = chunk_size(size, 16 * theta + 8 + 32 * windows, budget, block_rows=theta)
    out = np.empty(size, dtype=np.float32)
    block = np.empty((theta, step), dtype=np.float32)
    by_coordinate = np.empty((step, theta), dtype=np.float32)
    prefix = np.zeros((step, theta + 1), dtype=np.float64)
    half = theta // 2
    with single_thread():
        for a in range(0, size, step):
            b = min(a + step, size)
            rows = gather(sources, selected, a, b, block)
            cols = by_coordinate[: b - a]
            torch.from_numpy(cols).copy_(torch.from_numpy(rows).t())
            cols.sort(axis=1)
            median = cols[:, half].astype(np.float64)
            if theta % 2 == 0:
                median += cols[:, half - 1]
                median *= 0.5
            # The beta values nearest the median are a window of the sorted
            # row; among the candidate windows it is the one whose farther end
            # is nearest (its k-NN radius).
            left = np.abs(cols[:, :windows] - median[:, None])
            right = np.abs(cols[:, beta - 1 :] - median[:, None])
            start = np.argmin(np.maximum(left, right, out=left), axis=1)[:, None]
            sums = prefix[: b - a]
            np.cumsum(cols, axis=1, dtype=np.float64, out=sums[:, 1:])
            window = np.take_along_axis(sums, start + beta, axis=1)
            window -= np.take_along_axis(sums, start, axis=1)
            np.divide(window[:, 0], beta, out=out[a:b], casting="same_kind")
    return Selection(vector=out, selected=tuple(selected))
