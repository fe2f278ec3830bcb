"""Aggregation strategies over flat float32 client vectors.

The server turns each client update into one contiguous float32 vector of the
model's floating-point tensors in manifest order; every strategy here works on
those vectors. FedAvg-family strategies stream (one update at a time, O(model)
memory); robust ones read coordinate chunks through :class:`VectorSource` so
their memory is bounded by ``memory_budget_bytes``. See docs/aggregation.md.
"""

from fedrpc.fl.strategies._common import DEFAULT_MEMORY_BUDGET, Selection, VectorSource
from fedrpc.fl.strategies._fedopt import FedOptState
from fedrpc.fl.strategies.bulyan import bulyan
from fedrpc.fl.strategies.fedadagrad import fedadagrad_step
from fedrpc.fl.strategies.fedadam import fedadam_step
from fedrpc.fl.strategies.fedavg import FedAvgAccumulator, fedavg
from fedrpc.fl.strategies.fedavgm import fedavgm_step
from fedrpc.fl.strategies.fedmedian import fedmedian
from fedrpc.fl.strategies.fedprox import FedProxAccumulator, check_proximal_mu
from fedrpc.fl.strategies.fedtrimmedavg import fedtrimmedavg
from fedrpc.fl.strategies.fedyogi import fedyogi_step
from fedrpc.fl.strategies.krum import krum, multikrum, pairwise_sq_distances

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "FedAvgAccumulator",
    "FedOptState",
    "FedProxAccumulator",
    "Selection",
    "VectorSource",
    "bulyan",
    "check_proximal_mu",
    "fedadagrad_step",
    "fedadam_step",
    "fedavg",
    "fedavgm_step",
    "fedmedian",
    "fedtrimmedavg",
    "fedyogi_step",
    "krum",
    "multikrum",
    "pairwise_sq_distances",
]
