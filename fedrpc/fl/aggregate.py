"""One round's aggregation: client vectors in, the next global model out.

This module picks and parameterises a strategy (see :mod:`fedrpc.fl.strategies`)
and applies the round's update format and central DP. It does no I/O: the
caller hands it lazily produced vectors (streaming strategies read each once)
or random-access sources such as memmaps (robust strategies read them in
coordinate chunks).

Update formats: with ``"weights"`` clients send their trained weights, with
``"delta"`` the difference to the round's base model. The FedAvg family
averages whichever was sent and adds the base back for deltas; server
optimisers (FedAvgM, FedAdagrad, FedAdam, FedYogi; Reddi et al. 2021) step
along the mean delta (``mean(weights) - base``); robust strategies combine
what was sent and add the base back for deltas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.central_dp import CentralDPAccumulator
from fedrpc.fl.strategies import (
    FedAvgAccumulator,
    FedOptState,
    VectorSource,
    bulyan,
    fedadagrad_step,
    fedadam_step,
    fedavgm_step,
    fedmedian,
    fedtrimmedavg,
    fedyogi_step,
    krum,
    multikrum,
)

__all__ = [
    "ROBUST",
    "STREAMING",
    "Outcome",
    "aggregate_robust",
    "aggregate_streaming",
    "check_strategy",
]

# name -> {parameter: default}; None means required. Defaults are Flower's, so a
# configuration moved from Flower behaves the same.
PARAMETERS: dict[str, dict[str, float | None]] = {
    "fedavg": {},
    "fedprox": {"proximal_mu": 0.0},
    "fedavgm": {"server_learning_rate": 1.0, "server_momentum": 0.0},
    "fedadagrad": {"eta": 0.1, "eta_l": 0.1, "beta_1": 0.0, "tau": 1e-9},
    "fedadam": {"eta": 0.1, "eta_l": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9},
    "fedyogi": {"eta": 0.01, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedmedian": {},
    "fedtrimmedavg": {"beta": 0.2},
    "krum": {"num_malicious": None},
    "multikrum": {"num_malicious": None, "num_to_keep": None},
    "bulyan": {"num_malicious": None},
}
INTEGER_PARAMETERS = {"num_malicious", "num_to_keep"}
STREAMING = frozenset({"fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi"})
ROBUST = frozenset({"fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"})
_FEDOPT = {"fedadagrad": fedadagrad_step, "fedadam": fedadam_step, "fedyogi": fedyogi_step}


@dataclass(frozen=True, slots=True)
class Outcome:
    """The new global model and what the server must remember or report."""

    vector: np.ndarray
    server_state: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def check_strategy(name: str, params: Mapping[str, float], *, dp: bool = False) -> dict[str, float]:
    """The strategy's full parameter set (defaults filled in), or InvalidInput."""
    if name not in PARAMETERS:
        raise InvalidInput(f"unknown strategy {name!r}")
    allowed = PARAMETERS[name]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise InvalidInput(
            f"{name} takes no parameter {unknown[0]!r}; it takes {sorted(allowed) or 'none'}"
        )
    full: dict[str, float] = {}
    for key, default in allowed.items():
        value = params.get(key, default)
        if value is None:
            raise InvalidInput(f"{name} needs the parameter {key!r}")
        if not math.isfinite(value):
            raise InvalidInput(f"{key} must be a finite number")
        if key in INTEGER_PARAMETERS and (value != int(value) or value < 0):
            raise InvalidInput(f"{key} must be a whole number >= 0")
        full[key] = int(value) if key in INTEGER_PARAMETERS else float(value)
    if dp and name in ROBUST:
        raise InvalidInput(
            f"central differential privacy needs a FedAvg-family strategy, not {name}"
        )
    return full


def aggregate_streaming(
    name: str,
    params: Mapping[str, float],
    base: np.ndarray,
    updates: Iterable[tuple[np.ndarray, int]],
    *,
    update_format: str,
    server_state: Mapping[str, np.ndarray] | None = None,
    dp: tuple[float, float, float] | None = None,
    rng: np.random.Generator | None = None,
    device_clipped: bool = False,
) -> Outcome:
    """FedAvg-family aggregation reading each (vector, num_samples) once; O(model) memory.

    With ``dp = (noise_multiplier, clipping_norm, expected_count)`` every
    client's delta is clipped, the clipped deltas are summed with equal
    weights and divided by ``expected_count`` (``q N``, the expected Poisson
    cohort: the fixed-denominator estimator of DP-FedAvg, McMahan et al.
    2018), and Gaussian noise of std ``noise_multiplier * clipping_norm /
    expected_count`` is added; ``rng`` must then be a cryptographically
    seeded generator. The outcome's metrics then hold only ``dp_noise_std``
    and ``dp_expected_updates``, which depend on the round's settings and not
    on any device: the update count and the number clipped stay unpublished.
    With ``device_clipped`` each update is instead the mean delta of
    ``num_samples`` devices that clipped their own (a SecAgg+ result): it
    counts as that many clipped deltas, and is not clipped again.
    """
    p = check_strategy(name, params, dp=dp is not None)
    if name not in STREAMING:
        raise InvalidInput(f"{name} is not a streaming strategy")
    size = base.shape[0]
    metrics: dict[str, float] = {}
    if dp is not None:
        if rng is None:
            raise InvalidInput("central DP needs a random generator")
        acc = CentralDPAccumulator(
            size,
            noise_multiplier=dp[0],
            clipping_norm=dp[1],
            expected_count=dp[2],
            base=base if update_format == "weights" else None,
        )
        for vector, samples in updates:
            if device_clipped:
                acc.add_clipped_mean(vector, samples)
            else:
                acc.add(vector)
        if acc.count == 0:
            raise InvalidInput("there are no updates to aggregate")
        noised = acc.finish(rng)
        mean_delta = noised.vector
        metrics = {"dp_noise_std": noised.noise_std, "dp_expected_updates": noised.expected_count}
    else:
        avg = FedAvgAccumulator(size)
        for vector, samples in updates:
            avg.add(vector, samples)
        if avg.count == 0:
            raise InvalidInput("there are no updates to aggregate")
        mean = avg.finish()
        mean_delta = mean - base if update_format == "weights" else mean
    state = dict(server_state or {})
    if name in ("fedavg", "fedprox"):
        return Outcome(base + mean_delta, {}, metrics)
    if name == "fedavgm":
        new, momentum = fedavgm_step(base, mean_delta, state.get("momentum"), **p)
        return Outcome(new, {"momentum": momentum}, metrics)
    previous = FedOptState(state["m"], state["v"]) if "m" in state and "v" in state else None
    new, opt = _FEDOPT[name](base, mean_delta, previous, **p)
    return Outcome(new, {"m": opt.m, "v": opt.v}, metrics)


def aggregate_robust(
    name: str,
    params: Mapping[str, float],
    base: np.ndarray,
    sources: Sequence[VectorSource],
    num_samples: Sequence[int],
    *,
    update_format: str,
    memory_budget_bytes: int,
) -> Outcome:
    """Median, trimmed mean, Krum, MultiKrum or Bulyan over coordinate chunks of the sources."""
    p = check_strategy(name, params)
    if name not in ROBUST:
        raise InvalidInput(f"{name} is not a robust strategy")
    if not sources:
        raise InvalidInput("there are no updates to aggregate")
    budget = {"memory_budget_bytes": memory_budget_bytes}
    metrics: dict[str, float] = {}
    if name == "fedmedian":
        combined = fedmedian(sources, **budget)
    elif name == "fedtrimmedavg":
        combined = fedtrimmedavg(sources, beta=p["beta"], **budget)
    else:
        if name == "krum":
            chosen = krum(sources, num_malicious=p["num_malicious"], **budget)
        elif name == "multikrum":
            chosen = multikrum(
                sources,
                num_malicious=p["num_malicious"],
                num_to_keep=p["num_to_keep"],
                num_samples=list(num_samples),
                **budget,
            )
        else:
            chosen = bulyan(sources, num_malicious=p["num_malicious"], **budget)
        combined = chosen.vector
        metrics["num_selected"] = float(len(chosen.selected))
    return Outcome(base + combined if update_format == "delta" else combined, {}, metrics)
