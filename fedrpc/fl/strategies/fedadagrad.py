"""FedAdagrad: Adagrad as the server optimiser."""

from __future__ import annotations

import numpy as np

from fedrpc.fl.strategies._fedopt import FedOptState, fedopt_step

__all__ = ["FedOptState", "fedadagrad_step"]


def fedadagrad_step(
    base: np.ndarray,
    pseudo_gradient: np.ndarray,
    state: FedOptState | None,
    *,
    eta: float = 0.1,
    eta_l: float = 0.1,
    beta_1: float = 0.9,
    tau: float = 1e-3,
) -> tuple[np.ndarray, FedOptState]:
    """One server step of FedAdagrad (Reddi et al. 2021, "Adaptive Federated
    Optimization", Algorithm 2).

    ``v_t = v_{t-1} + Delta_t^2``; see :mod:`fedrpc.fl.strategies._fedopt`
    for ``m_t`` and the model update.

    Parameters
    ----------
    base : numpy.ndarray
        Current global model, flat float32.
    pseudo_gradient : numpy.ndarray
        The round's mean client delta, flat float32.
    state : FedOptState or None
        State returned by the previous round for this model; None on the first.
    eta : float
        Server learning rate, > 0.
    eta_l : float
        Client learning rate, > 0 (validated here, used by the clients).
    beta_1 : float
        First-moment decay in [0, 1) (the paper's default 0.9; 0 is classic
        Adagrad without momentum).
    tau : float
        Adaptivity (epsilon) > 0.

    Returns
    -------
    (weights, state) : tuple
        New global model and the state to pass to the next round.
    """

    def adagrad(v_prev: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        delta_sq += v_prev
        return delta_sq

    return fedopt_step(
        base, pseudo_gradient, state, adagrad, eta=eta, eta_l=eta_l, beta_1=beta_1, tau=tau
    )
