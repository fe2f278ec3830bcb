"""FedAdam: Adam (without bias correction) as the server optimiser."""

from __future__ import annotations

import numpy as np

from fedrpc.fl.strategies._fedopt import FedOptState, check_beta_2, fedopt_step

__all__ = ["FedOptState", "fedadam_step"]


def fedadam_step(
    base: np.ndarray,
    pseudo_gradient: np.ndarray,
    state: FedOptState | None,
    *,
    eta: float = 0.1,
    eta_l: float = 0.1,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[np.ndarray, FedOptState]:
    """One server step of FedAdam (Reddi et al. 2021, "Adaptive Federated
    Optimization", Algorithm 2).

    ``v_t = beta_2 v_{t-1} + (1 - beta_2) Delta_t^2``; see
    :mod:`fedrpc.fl.strategies._fedopt` for ``m_t`` and the model update.

    Parameters
    ----------
    base, pseudo_gradient, state, eta, eta_l, beta_1, tau
        As in :func:`fedrpc.fl.strategies.fedadagrad.fedadagrad_step`.
    beta_2 : float
        Second-moment decay in [0, 1).

    Returns
    -------
    (weights, state) : tuple
        New global model and the state to pass to the next round.
    """
    b2 = np.float32(check_beta_2(beta_2))

    def adam(v_prev: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        delta_sq *= np.float32(1.0) - b2
        delta_sq += b2 * v_prev
        return delta_sq

    return fedopt_step(
        base, pseudo_gradient, state, adam, eta=eta, eta_l=eta_l, beta_1=beta_1, tau=tau
    )
