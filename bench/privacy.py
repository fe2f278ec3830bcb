"""Latency of fedrpc's privacy accounting against Opacus and dp-accounting, same run.

The question a ledger asks on every charged round: what is epsilon of the
recorded history plus the round about to be charged? Two histories of 50
recorded rounds + 1 projected one:

* ``shared``: the federation changes its noise multiplier and cohort size now
  and then, so 4 distinct (noise_multiplier, sample_rate) pairs;
* ``distinct``: the sampled cohort differs every round, so 51 distinct pairs.

Ours is timed cold (every cache cleared before each call) and cached (the
one-step curves of earlier calls reused); Opacus' RDPAccountant (on our order
grid, so it computes the same value) and dp-accounting's RdpAccountant (whose
default orders are ours) are timed computing the same epsilon from scratch,
which is how they work. The PLD accountant is timed against dp-accounting's
PLDAccountant on the ``shared`` history, once each (they take seconds).
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # _report, and fedrpc without an install

from _report import table, write_section  # noqa: E402

from fedrpc.fl.privacy import ORDERS, RoundCharge, clear_cache, compose_epsilon  # noqa: E402

DELTA = 1e-5


def histories() -> dict[str, list[RoundCharge]]:
    rng = np.random.default_rng(2024)
    steps = rng.integers(20, 200, size=51)
    shared = [
        RoundCharge(1.0 if i < 25 else 1.2, 0.01 if i % 10 < 7 else 0.02, int(steps[i]))
        for i in range(51)
    ]
    # A growing population and a random cohort: every round has its own rate.
    cohorts = rng.integers(80, 160, size=51)
    distinct = [RoundCharge(1.1, int(c) / (10_000 + 37 * i), 1) for i, c in enumerate(cohorts)]
    return {"shared": shared, "distinct": distinct}


def opacus_epsilon(charges: list[RoundCharge]) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(c.noise_multiplier, c.sample_rate, c.num_steps) for c in charges]
    return accountant.get_epsilon(DELTA, alphas=list(ORDERS))


def dp_accounting_rdp_epsilon(charges: list[RoundCharge]) -> float:
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(_events(charges))
    return accountant.get_epsilon(DELTA)


def dp_accounting_pld_epsilon(charges: list[RoundCharge]) -> float:
    import dp_accounting

    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(_events(charges))
    return accountant.get_epsilon(DELTA)


def _events(charges: list[RoundCharge]):
    import dp_accounting

    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    c.sample_rate, dp_accounting.GaussianDpEvent(c.noise_multiplier)
                ),
                c.num_steps,
            )
            for c in charges
        ]
    )


def timed(fn: Callable[[], float], runs: int, before: Callable[[], None] | None = None) -> tuple:
    """(median ms, p99 ms, value) over `runs` calls; `before` runs untimed each time."""
    samples, value = [], float("nan")
    for _ in range(runs):
        if before:
            before()
        start = time.perf_counter_ns()
        value = fn()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
    return statistics.median(samples), p99, value


def main() -> None:
    logging.disable(logging.WARNING)  # dp-accounting logs every non-converged order
    warnings.simplefilter("ignore")  # Opacus warns when the best order is an end point
    headers = ["history", "accountant", "mode", "runs", "median ms", "p99 ms", "epsilon"]
    headers += ["peer median / ours"]
    rows = []
    for name, charges in histories().items():
        cold = timed(lambda c=charges: compose_epsilon(c, DELTA), 30, before=clear_cache)
        compose_epsilon(charges, DELTA)
        cached = timed(lambda c=charges: compose_epsilon(c, DELTA), 1000)
        peers = {
            "Opacus RDPAccountant": timed(lambda c=charges: opacus_epsilon(c), 5),
            "dp-accounting RdpAccountant": timed(lambda c=charges: dp_accounting_rdp_epsilon(c), 5),
        }
        fastest = min(p[0] for p in peers.values())
        for mode, (med, p99, eps) in (("cold", cold), ("cached", cached)):
            rows.append([name, "fedrpc rdp", mode, 30 if mode == "cold" else 1000, f"{med:.3f}"])
            rows[-1] += [f"{p99:.3f}", f"{eps:.6f}", f"{fastest / med:.1f}x (fastest peer)"]
        for peer, (med, p99, eps) in peers.items():
            rows.append(
                [name, peer, "from scratch", 5, f"{med:.1f}", f"{p99:.1f}", f"{eps:.6f}", ""]
            )
    shared = histories()["shared"]
    ours = timed(lambda: compose_epsilon(shared, DELTA, "pld"), 3, before=clear_cache)
    theirs = timed(lambda: dp_accounting_pld_epsilon(shared), 1)
    rows.append(["shared", "fedrpc pld (h=1e-4)", "cold", 3, f"{ours[0]:.1f}", f"{ours[1]:.1f}"])
    rows[-1] += [f"{ours[2]:.6f}", f"{theirs[0] / ours[0]:.1f}x"]
    rows.append(["shared", "dp-accounting PLDAccountant", "from scratch", 1, f"{theirs[0]:.1f}"])
    rows[-1] += [f"{theirs[1]:.1f}", f"{theirs[2]:.6f}", ""]
    body = table(headers, rows) + (
        f"\n\nEpsilon at delta = {DELTA:g} of 50 recorded rounds + 1 projected "
        "(`python bench/privacy.py`). Cold clears the per-(noise, sample rate) "
        "caches before every call; the peers always compute from scratch. "
        "Opacus runs on our order grid; dp-accounting's RDP overestimates "
        "fractional orders, hence its larger epsilon."
    )
    print(body)
    write_section("privacy", "Privacy accounting latency (compose_epsilon)", body)


if __name__ == "__main__":
    main()
