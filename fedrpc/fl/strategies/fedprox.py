"""FedProx: FedAvg on the server, a proximal term on the clients."""

from __future__ import annotations

import math
import numbers

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.strategies.fedavg import FedAvgAccumulator

__all__ = ["FedProxAccumulator", "check_proximal_mu"]


def check_proximal_mu(proximal_mu: object) -> float:
    """The proximal coefficient mu: a finite number >= 0 (0 is plain FedAvg)."""
    if isinstance(proximal_mu, bool) or not isinstance(proximal_mu, numbers.Real):
        raise InvalidInput(f"proximal_mu must be a number >= 0, got {proximal_mu!r}")
    if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
        raise InvalidInput(f"proximal_mu must be >= 0, got {proximal_mu!r}")
    return float(proximal_mu)


class FedProxAccumulator(FedAvgAccumulator):
    """FedProx server side (Li et al. 2020, "Federated Optimization in
    Heterogeneous Networks", MLSys).

    Each client k minimises ``F_k(w) + mu/2 * ||w - w_t||^2`` locally; the
    server aggregates the results exactly as FedAvg does (sample-weighted
    mean), so this class only validates and carries ``proximal_mu`` for the
    round's client configuration.

    Parameters
    ----------
    size : int
        Length of the flat vectors.
    proximal_mu : float
        The clients' proximal coefficient, >= 0.
    """

    def __init__(self, size: int, *, proximal_mu: float) -> None:
        self.proximal_mu = check_proximal_mu(proximal_mu)
        super().__init__(size)
