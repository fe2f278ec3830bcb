"""What bench/secagg.py's contenders share: the cases, the constants, the generated cohort and
the float64 reference they are checked against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

K, T, DROPOUTS = 11, 6, 2
#: (devices, parameters, repetitions): fewer repetitions for the 1M cases.
CASES = ((10, 100_000, 7), (10, 1_000_000, 5), (50, 100_000, 5), (50, 1_000_000, 4))
LARGE = (1_000, 100_000, 1)  # ours only
CLIPPING, LEVELS, MODULUS, MAX_WEIGHT = 8.0, 1 << 22, 1 << 32, 1000.0
UNMASK_GOAL, MASK_GOAL, BYTES_GOAL = 10.0, 3.0, 4.0


@dataclass
class Round:
    """What one run of the protocol measured."""

    mask: list[float]  # seconds of stage-2 masking, one per surviving device
    unmask: float  # seconds of the server's unmask work
    wire: float  # bytes of one device's stage-2 upload per masked element (d + 1)
    payload: float  # the masked vector's own bytes per masked element
    error: float  # max abs difference from the float64 weighted mean of the survivors
    total: float  # seconds of the whole protocol, every device run one after another


def neighbours(n: int) -> int:
    return min(K, n - 1)


def generate(n: int, d: int, seed: int) -> tuple[list[np.ndarray], list[int], list[int]]:
    """Updates, sample counts and the indices of the devices that drop after stage 1."""
    rng = np.random.default_rng(seed)
    vectors = [rng.standard_normal(d, dtype=np.float32) * np.float32(0.1) for _ in range(n)]
    weights = [int(w) for w in rng.integers(10, int(MAX_WEIGHT), size=n)]
    dropped = sorted(int(i) for i in rng.choice(n, size=DROPOUTS, replace=False))
    return vectors, weights, dropped


def reference(vectors: list[np.ndarray], weights: list[int], dropped: list[int]) -> np.ndarray:
    """The float64 weighted mean of the survivors' updates."""
    alive = [i for i in range(len(vectors)) if i not in dropped]
    total = sum(weights[i] for i in alive)
    return sum(weights[i] * vectors[i].astype(np.float64) for i in alive) / total
