"""Krum and MultiKrum: keep the updates closest to their neighbours."""

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
    check_num_samples,
    check_sources,
    chunk_size,
    chunked_mean,
    gather,
    single_thread,
)

__all__ = ["Selection", "krum", "krum_scores", "multikrum", "pairwise_sq_distances"]


def pairwise_sq_distances(
    sources: Sequence[VectorSource], *, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET
) -> np.ndarray:
    """The N x N matrix of squared L2 distances, accumulated chunk by chunk.

    Per chunk, ``||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij`` with the Gram matrix
    ``G`` of the chunk's rows, one BLAS product instead of N^2 passes. The rows
    are centred on their mean first and the product runs in float64: honest
    updates are close to each other and far from the origin, and in float32
    the subtraction cancelled up to 1e-1 of a distance (measured with one
    far-away outlier); in float64 centred, below 1e-7.

    Working memory: ``8 N + 8`` bytes per coordinate of a chunk, within
    ``memory_budget_bytes``, plus the N x N matrices.
    """
    n, size = check_sources(sources)
    budget = check_budget(memory_budget_bytes)
    step = chunk_size(size, 8 * n + 8, budget, block_rows=2 * n)
    block = np.empty((n, step), dtype=np.float64)
    gram = np.zeros((n, n), dtype=np.float64)
    gram_t = torch.from_numpy(gram)
    with single_thread():
        for a in range(0, size, step):
            b = min(a + step, size)
            rows = gather(sources, range(n), a, b, block)
            rows -= rows.mean(axis=0)
            x = torch.from_numpy(rows)
            gram_t.addmm_(x, x.t())
    # BLAS need not return an exactly symmetric product; ties between mutual
    # nearest neighbours are common in Krum scores and must stay exact ties.
    gram += gram.T.copy()
    gram *= 0.5
    norms = np.diag(gram).copy()
    dist = norms[:, None] + norms[None, :]
    dist -= 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_scores(dist: np.ndarray, num_neighbours: int) -> np.ndarray:
    """Each update's sum of squared distances to its ``num_neighbours`` nearest others."""
    n = dist.shape[0]
    if num_neighbours == 0:
        return np.zeros(n)
    others = dist.copy()
    np.fill_diagonal(others, np.inf)
    nearest = np.partition(others, num_neighbours - 1, axis=1)[:, :num_neighbours]
    return nearest.sum(axis=1)


def _check_krum(n: int, num_malicious: object) -> int:
    f = check_count("num_malicious", num_malicious)
    if n <= 2 * f + 2:
        raise InvalidInput(f"krum needs more than 2*num_malicious+2 = {2 * f + 2} updates, got {n}")
    return f


def _ranked(sources: Sequence[VectorSource], f: int, budget: int) -> np.ndarray:
    dist = pairwise_sq_distances(sources, memory_budget_bytes=budget)
    scores = krum_scores(dist, len(sources) - f - 2)
    # Stable: equal scores keep the lower index first, so results are reproducible.
    return np.argsort(scores, kind="stable")


def krum(
    sources: Sequence[VectorSource],
    *,
    num_malicious: int,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> Selection:
    """Krum (Blanchard et al. 2017, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent", NeurIPS).

    Each update is scored by the sum of squared distances to its
    ``n - f - 2`` nearest other updates; the lowest-scored update is returned
    as it is.

    Parameters
    ----------
    sources : sequence of VectorSource
        The n client vectors; n must exceed ``2 f + 2``.
    num_malicious : int
        f, the number of Byzantine updates tolerated.
    memory_budget_bytes : int
        Bound on the working buffers (see :func:`pairwise_sq_distances`).

    Returns
    -------
    Selection
        The chosen update (a copy) and its index.
    """
    n, _ = check_sources(sources)
    f = _check_krum(n, num_malicious)
    budget = check_budget(memory_budget_bytes)
    best = int(_ranked(sources, f, budget)[0])
    return Selection(vector=chunked_mean(sources, [best], [1.0], budget), selected=(best,))


def multikrum(
    sources: Sequence[VectorSource],
    *,
    num_malicious: int,
    num_to_keep: int,
    num_samples: Sequence[int] | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> Selection:
    """MultiKrum (Blanchard et al. 2017): average the m best Krum-scored updates.

    Scores are those of :func:`krum`, computed once over all n updates.

    Parameters
    ----------
    sources : sequence of VectorSource
        The n client vectors; n must exceed ``2 f + 2``.
    num_malicious : int
        f, the number of Byzantine updates tolerated.
    num_to_keep : int
        m, how many updates to average, 1 <= m <= n.
    num_samples : sequence of int, optional
        Examples per update: when given, the m kept updates are averaged with
        these weights (as FedAvg would); otherwise uniformly, as in the paper.
    memory_budget_bytes : int
        Bound on the working buffers.

    Returns
    -------
    Selection
        The average and the kept indices, best score first.
    """
    n, _ = check_sources(sources)
    f = _check_krum(n, num_malicious)
    m = check_count("num_to_keep", num_to_keep, minimum=1)
    if m > n:
        raise InvalidInput(f"num_to_keep must be at most the number of updates ({n}), got {m}")
    if num_samples is not None and len(num_samples) != n:
        raise InvalidInput(f"num_samples has {len(num_samples)} entries for {n} updates")
    weights = (
        [float(check_num_samples(s, f"num_samples[{i}]")) for i, s in enumerate(num_samples)]
        if num_samples is not None
        else [1.0] * n
    )
    budget = check_budget(memory_budget_bytes)
    kept = [int(i) for i in _ranked(sources, f, budget)[:m]]
    vector = chunked_mean(sources, kept, [weights[i] for i in kept], budget)
    return Selection(vector=vector, selected=tuple(kept))
