"""The SecAgg+ neighbour graph and the default degree ``k`` and threshold ``t``.

Bell et al. 2020 replace SecAgg's complete graph (Bonawitz et al. 2017) with a
random ``k``-regular one: a device masks with and shares its secrets among its
``k`` neighbours only, ``k = O(log n)``. The graph is the Harary graph
``H(k, n)`` (a ring where each device links to its ``k/2`` nearest on each side
and, for odd ``k``, the opposite one) under a random relabelling, as in Google's
federated-compute. The relabelling is drawn from the session's graph seed
(random, fixed when the session starts and stored with it), so every server
process rebuilds the same graph and a test can pin it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.secagg.keys import INFO_GRAPH, hkdf
from fedrpc.fl.secagg.prg import expand

__all__ = [
    "CORRECTNESS_BITS",
    "SECURITY_BITS",
    "GraphParams",
    "default_parameters",
    "effective_degree",
    "graph_seed",
    "neighbours",
    "shuffle",
]

#: Colluders hold ``t`` shares of some secret, or the honest survivors' graph splits, with
#: probability at most 2^-41 each (2^-40 together).
SECURITY_BITS = 41
#: Some secret keeps fewer than ``t`` surviving holders with probability at most 2^-20.
CORRECTNESS_BITS = 20


class GraphParams(NamedTuple):
    """Neighbour count ``k`` and Shamir threshold ``t`` of a session."""

    k: int
    t: int


def _count(n: int, what: str, low: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < low:
        raise InvalidInput(f"{what} must be an integer >= {low}")
    return n


def effective_degree(n: int, k: int) -> int:
    """The degree the session uses for ``k`` requested among ``n`` devices.

    ``n - 1`` (all-to-all) when ``k >= n - 1``; ``k + 1`` when ``k`` and ``n``
    are both odd, where no ``k``-regular graph exists; otherwise ``k``.
    """
    _count(n, "device count", 2)
    _count(k, "neighbour count", 1)
    if k >= n - 1:
        return n - 1
    if k % 2 and n % 2:
        return k + 1
    return k


def graph_seed(session_seed: bytes, session_id: str) -> bytes:
    """HKDF-SHA256 of the server's 32-byte session seed, info ``fedrpc-secagg-v1 graph``."""
    if len(session_seed) != 32:
        raise InvalidInput("session seed must be 32 bytes")
    return hkdf(session_seed, session_id, INFO_GRAPH)


def shuffle(n: int, seed: bytes) -> list[int]:
    """Indices ``1..n`` in the ring order drawn from ``seed`` (Fisher-Yates, unbiased).

    ChaCha20 words (``prg.expand(seed, ., 64)``) are consumed in order; for
    ``m = n-1 .. 1`` a word ``w`` is accepted when ``w < 2^64 - (2^64 mod (m+1))``
    and swaps positions ``m`` and ``w mod (m+1)``.
    """
    order = list(range(1, _count(n, "device count", 1) + 1))
    words = expand(seed, n + 16, 64).tolist()
    pos = 0
    for m in range(n - 1, 0, -1):
        bound = 2**64 - (2**64 % (m + 1))
        while True:
            if pos == len(words):  # rejections are rare: a longer prefix of the same stream
                words = expand(seed, 2 * len(words), 64).tolist()
            w = words[pos]
            pos += 1
            if w < bound:
                break
        j = w % (m + 1)
        order[m], order[j] = order[j], order[m]
    return order


def neighbours(n: int, k: int, graph_seed: bytes) -> dict[int, tuple[int, ...]]:
    """Each device's neighbours (sorted indices) in the session's random Harary graph.

    Parameters
    ----------
    n
        Devices, indexed ``1..n``.
    k
        Requested degree; the graph has :func:`effective_degree` ``(n, k)``.
    graph_seed
        32 bytes from :func:`graph_seed`.
    """
    k = effective_degree(n, k)
    ring = shuffle(n, graph_seed)
    offsets = list(range(1, k // 2 + 1))
    offsets += [-d for d in offsets]
    if k % 2:
        offsets.append(n // 2)
    return {ring[p]: tuple(sorted({ring[(p + d) % n] for d in offsets})) for p in range(n)}


def _log_comb(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def _hypergeometric_pmf(population: int, marked: int, draws: int) -> list[float]:
    """P[i marked among ``draws`` neighbours] for i = 0..draws, ``marked`` of ``population``."""
    log_total = _log_comb(population, draws)
    return [
        math.exp(_log_comb(marked, i) + _log_comb(population - marked, draws - i) - log_total)
        if i <= marked and draws - i <= population - marked
        else 0.0
        for i in range(draws + 1)
    ]


def _sparse_threshold(n: int, k: int, colluders: int, survivors: int, bad: int) -> int | None:
    """Smallest safe ``t`` for a random Harary graph of even degree ``k``, if also correct."""
    bound = 2.0**-SECURITY_BITS / n
    if k <= bad:
        # The honest survivors stay connected unless k/2 consecutive ring positions are bad
        # in two places: at most n(n-k-1)/2 position pairs, each all-bad with probability
        # bad!/(bad-k)! * (n-k)!/n! (a union bound, as federated-compute's finder).
        log_disconnected = (
            math.log(n * (n - k - 1) / 2)
            + math.lgamma(bad + 1)
            - math.lgamma(bad - k + 1)
            + math.lgamma(n - k + 1)
            - math.lgamma(n + 1)
        )
        if log_disconnected >= -SECURITY_BITS * math.log(2):
            return None
    tail = list(np.cumsum(_hypergeometric_pmf(n, colluders, k)[::-1])[::-1]) + [0.0]
    t = next((t for t in range(2, k + 1) if tail[t] <= bound), None)
    if t is None:
        return None
    short = sum(_hypergeometric_pmf(n, survivors, k)[:t])  # P[fewer than t survive]
    return t if short <= 2.0**-CORRECTNESS_BITS / n else None


def default_parameters(
    n: int, dropout: float = 1 / 3, corruption: float = 0.05, small_cohort: int = 100
) -> GraphParams:
    """Default ``(k, t)`` for ``n`` devices (Bell et al. 2020; federated-compute's finder).

    The adversary controls ``c = floor(corruption * n)`` devices and at most
    ``floor(dropout * n)`` drop, so a device's neighbours are a random draw
    from the cohort (hypergeometric counts).

    * ``n >= small_cohort``: the smallest even ``k < n - 1`` such that the
      honest survivors stay connected except with probability ``2^-41``,
      colluders hold ``t`` shares of some secret with probability at most
      ``2^-41`` (``t >= 2`` the smallest such), and some secret keeps fewer
      than ``t`` surviving holders with probability at most ``2^-20``. 1,000
      devices at 1/3 dropout and 5% collusion give ``(72, 24)``, as in
      Google's federated-compute.
    * Smaller cohorts, or when no such ``k`` exists: all-to-all, ``k = n - 1``,
      and ``t = floor((k + c) / 2) + 1``, which also defeats a server that lies
      about who dropped (``2t > k + c``), when the tolerated dropout leaves that
      many neighbours (``ceil((1 - dropout) n) - 1``); otherwise ``t = c + 1``
      (at least 2, at most ``k``), the semi-honest minimum. Below 100 devices
      all-to-all costs each device at most 99 mask expansions (about 10 ms at
      100k parameters), and the complete graph cannot disconnect.
    """
    _count(n, "device count", 3)
    if not (0.0 <= dropout < 1.0 and 0.0 <= corruption < 1.0 and dropout + corruption < 1.0):
        raise InvalidInput("dropout and corruption fractions must be in [0, 1) with sum below 1")
    eps = 1e-12  # keep float error from rounding in the insecure direction
    colluders = math.floor((corruption + eps) * n)
    survivors = math.ceil((1.0 - dropout - eps) * n)
    bad = colluders + math.floor((dropout + eps) * n)
    if n >= small_cohort:
        for k in range(2, n - 1, 2):
            t = _sparse_threshold(n, k, colluders, survivors, bad)
            if t is not None:
                return GraphParams(k, t)
    k = n - 1
    t = (k + colluders) // 2 + 1
    if t > survivors - 1:
        t = colluders + 1
    return GraphParams(k, min(max(t, 2), k))
